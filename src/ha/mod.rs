//! The decisions, sans-IO: inputs and time in, actions out. No sockets, no tokio, no clocks read
//! here, so every failure scenario is a deterministic unit test.

pub mod witness;
