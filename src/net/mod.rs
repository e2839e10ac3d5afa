//! QUIC plumbing: certificates and roles, endpoints with explicit timeouts, framed streams.

pub mod endpoint;
pub mod stream;
pub mod tls;
