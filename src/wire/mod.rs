//! Bytes <-> messages. No sockets, no async: the codecs here are driven by `net/` and tested alone.

pub mod cbor;
pub mod client;
pub mod frame;
pub mod node;

/// ALPN of the client protocol (PROTOCOL.md §1).
pub const CLIENT_ALPN: &[u8] = b"tuplespace/1";
/// ALPN of links between proxy and servers and between the two servers.
pub const NODE_ALPN: &[u8] = b"tuplespace-node/1";
