//! Internal messages between proxy and servers and between primary and backup (ALPN
//! `tuplespace-node/1`). Same framing as the client protocol; CBOR via serde.
//!
//! Streams: each server holds one connection to the proxy with a *control* stream (hello,
//! heartbeats, grants, shutdown) and a *relay* stream (client requests and replies), so a burst of
//! requests never delays a heartbeat. Primary -> backup: a *replication* stream and a separate
//! *heartbeat* stream.

use serde::{Deserialize, Serialize};

use crate::space::{Change, Pair};
use crate::wire::cbor::RawItem;
use crate::wire::client::Command;

/// What a server believes it is when it says hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Backup,
}

/// Description of a replica as the proxy reports it in STATUS.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// SPEC §2 handle: pid when local, SHUTDOWN_SAP when remote.
    pub handle: String,
    /// The SAP this replica serves on in its current role.
    pub sap: String,
    pub pid: u32,
}

/// First frame on any stream a server opens to the proxy: says what the stream is for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StreamKind {
    Control,
    Relay { epoch: u64 },
}

/// Server -> proxy on the control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToProxy {
    Hello {
        role: Role,
        epoch: u64,
        info: ReplicaInfo,
        /// A backup's PRIMARY_HANDLE: which primary started it.
        primary: Option<String>,
    },
    Heartbeat {
        epoch: u64,
        /// The sender as it is now (a promoted backup serves on the primary's SAPs).
        info: ReplicaInfo,
        pairs: u64,
        /// Primary only: the handle of its backup when that backup holds every acknowledged
        /// update and acknowledges synchronously (it may be promoted).
        synced_backup: Option<String>,
        /// The last `HeartbeatAck::n` received from the proxy.
        echo: u64,
        /// Primary only: updates applied that its synchronised backup has not acknowledged yet
        /// (None without one). Reported in STATUS.
        #[serde(default)]
        lag: Option<u64>,
    },
    /// A backup that lost its primary asks to be promoted; a primary that lost its backup asks to
    /// go on alone. The proxy decides (it is the witness).
    PeerLost { epoch: u64 },
    /// Answer to `Shutdown`.
    ShutdownDone { saved: Option<String>, pairs: u64 },
}

/// Proxy -> server on the control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToServer {
    Welcome {
        role: Role,
        epoch: u64,
    },
    /// `n` counts the acks on this link; the server echoes the last one it got in its next
    /// heartbeat, so the proxy can tell its own messages still arrive (one-way cuts).
    HeartbeatAck {
        epoch: u64,
        n: u64,
    },
    /// The witness grants promotion (to a backup) or solo service (to a primary) at `epoch`.
    Grant {
        epoch: u64,
    },
    /// You are deposed: stop serving at once.
    Fence {
        epoch: u64,
    },
    /// Stop the backup, save, answer `ShutdownDone`, exit.
    Shutdown,
}

/// Proxy -> server on the relay stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Relay {
    /// `client` is the connection indicator; a request without one is refused.
    Request {
        rid: u64,
        client: Option<u64>,
        cmd: Command,
    },
    /// Every request with rid < this has been answered to its client: dedupe entries below it
    /// may be dropped.
    Watermark(u64),
    /// The client connection `client` has ended: its reads still queued need not be computed
    /// (they are answered empty; nobody is there to read them). Writes are applied as sent.
    ClientGone { client: u64 },
}

/// What a replica answers to a relayed request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Pairs {
        pairs: Vec<Pair>,
        message: Option<String>,
    },
    /// PUT/POST elements not used, as the client sent them.
    Rejected(Vec<RawItem>),
    TooLarge(String),
    Malformed(String),
    /// Answer to [`Command::Count`]: pairs in the space.
    Count(u64),
}

impl Reply {
    /// Estimated memory the reply holds (at least its encoded size on a node link): used to bound
    /// the dedupe table in bytes and to cut it into chunks.
    pub fn mem_bytes(&self) -> usize {
        std::mem::size_of::<Reply>()
            + match self {
                Reply::Pairs { pairs, message } => {
                    pairs.capacity() * std::mem::size_of::<Pair>()
                        + pairs
                            .iter()
                            .map(|p| p.key.capacity() + p.value.capacity() + 16)
                            .sum::<usize>()
                        + message.as_ref().map_or(0, |m| m.capacity())
                }
                Reply::Rejected(r) => r.iter().map(|x| x.mem_bytes() + 16).sum(),
                Reply::TooLarge(m) | Reply::Malformed(m) => m.capacity(),
                Reply::Count(_) => 0,
            }
    }
}

/// Server -> proxy on the relay stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayReply {
    pub rid: u64,
    pub reply: Reply,
}

/// Primary -> backup on the replication stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Repl {
    Hello {
        epoch: u64,
        primary: ReplicaInfo,
    },
    /// Part of the initial copy, ascending by key.
    Snapshot {
        pairs: Vec<(String, String)>,
    },
    /// Part of the initial copy's dedupe table (after the pairs, before `SnapshotDone`): the
    /// table may be far larger than one frame.
    Dedupe(Vec<(u64, Reply)>),
    /// End of the initial copy: the space as of update `seq`, with the rest of the dedupe table
    /// (empty: it travels in `Dedupe` chunks).
    SnapshotDone {
        seq: u64,
        dedupe: Vec<(u64, Reply)>,
    },
    /// The primary is shutting down the service: stop without saving.
    Stop,
    /// One applied update with the reply given, so a new primary can answer a re-sent request.
    Update {
        seq: u64,
        rid: u64,
        change: Change,
        reply: Reply,
    },
    Watermark(u64),
}

/// Backup -> primary on the replication stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ReplAck {
    /// The initial copy is in; `handle` is the backup's own (as it registers with the proxy).
    Synced {
        seq: u64,
        handle: String,
    },
    Ack {
        seq: u64,
    },
}

/// Either direction on the primary<->backup heartbeat stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Beat {
    Ping {
        epoch: u64,
        n: u64,
    },
    Pong {
        epoch: u64,
        n: u64,
    },
    /// An authenticated, epoch-fenced terminate (remote deposed primary).
    Terminate {
        epoch: u64,
    },
}
