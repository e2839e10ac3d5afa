//! tuplespace: a fault-tolerant tuple space service over authenticated QUIC.
//!
//! Layers, bottom up: `space` (the tuple space, pure), `wire` (frames and messages, no sockets),
//! `ha` (failover decisions, sans-IO), `net` (QUIC and TLS), then the processes: `proxy`,
//! `server`, `client`, `up`. Binaries stay thin: see `src/main.rs`.

pub mod bench;
pub mod client;
pub mod config;
pub mod durable;
pub mod fuzzing;
pub mod ha;
pub mod metrics;
pub mod nemesis;
pub mod net;
pub mod notify;
pub mod plot;
pub mod proxy;
pub mod server;
pub mod sim;
pub mod space;
pub mod up;
pub mod wire;

/// Waits for SIGINT or SIGTERM.
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install SIGTERM handler: {e}");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
