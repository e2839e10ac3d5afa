//! The decisions, sans-IO: inputs and time in, actions out. No sockets, no tokio, no clocks read
//! here, so every failure scenario is a deterministic test, and the same machines run inside the
//! simulator (`crate::sim`) and the model checker (`tests/model.rs`).
//!
//! - [`witness`]: the proxy's view of the pair (who is primary, the epoch, who may be promoted).
//! - [`router`]: the proxy's request table (rids, pending, re-send, `unknown` vs `unavailable`),
//!   wrapping the witness: one state machine per proxy.
//! - [`replica`]: a server's side (commit, release, solo service, grants, promotion, backups).

pub mod replica;
pub mod router;
pub mod witness;

/// Time as the state machines see it: milliseconds since an origin chosen by the executor.
pub type Millis = u64;
