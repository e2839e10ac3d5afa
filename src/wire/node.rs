//! Internal messages between proxy and servers and between primary and backup (ALPN
//! `tuplespace-node/1`). Same framing as the client protocol; CBOR via serde.
//!
//! Streams: each server holds one connection to the proxy with a *control* stream (hello,
//! heartbeats, grants, shutdown) and a *relay* stream (client requests and replies), so a burst of
//! requests never delays a heartbeat. Primary -> backup: a *replication* stream and a separate
//! *heartbeat* stream.

use serde::{Deserialize, Serialize};

use crate::space::{Change, Pair};
use crate::wire::cbor::{self, Head, RawItem, Reader, TAG_ENCODED_CBOR};
use crate::wire::client::{Command, Response, Status};
use crate::wire::frame::{self, CborError};

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
    /// These requests' client stream has gone (reset, stopped, or its connection closed): those
    /// still waiting for a match (PROTOCOL.md §4a) are answered empty and change nothing; a take
    /// already applied stays applied.
    Cancel { rids: Vec<u64> },
}

/// A [`Relay::Request`] by reference: the same bytes, without a copy of the command.
#[derive(Serialize)]
#[serde(rename = "Relay")]
pub enum RelayRequestRef<'a> {
    Request {
        rid: u64,
        client: Option<u64>,
        cmd: &'a Command,
    },
}

impl Relay {
    /// Appends one frame holding `m` (as [`crate::wire::frame::encode_into`] would): a PUT/POST
    /// request from a client written directly, the same bytes serde writes (a unit test compares
    /// them), anything else through serde.
    pub fn encode_into(m: &Relay, out: &mut Vec<u8>) {
        let Relay::Request {
            rid,
            client: Some(client),
            cmd: cmd @ (Command::Put(elems) | Command::Post(elems)),
        } = m
        else {
            return frame::encode_into(m, out);
        };
        let start = frame::open(out);
        cbor::write_head(out, 5, 1);
        cbor::write_text(out, "Request");
        cbor::write_head(out, 5, 3);
        cbor::write_text(out, "rid");
        cbor::write_head(out, 0, *rid);
        cbor::write_text(out, "client");
        cbor::write_head(out, 0, *client);
        cbor::write_text(out, "cmd");
        cbor::write_head(out, 5, 1);
        cbor::write_text(
            out,
            if matches!(cmd, Command::Put(_)) {
                "Put"
            } else {
                "Post"
            },
        );
        cbor::write_head(out, 4, elems.len() as u64);
        for e in elems {
            write_embedded(out, e.as_bytes());
        }
        frame::seal(out, start);
    }

    /// Reads a relay frame body. A request as the proxy writes it is read in place (its
    /// PUT/POST elements stay slices of `body`, each checked to be one well-formed item);
    /// anything else is read by serde, so the result is the same either way.
    pub fn read(body: &bytes::Bytes) -> Result<Relay, CborError> {
        match Self::read_request(body) {
            Some(r) => Ok(r),
            None => crate::wire::frame::decode(body),
        }
    }

    /// `{"Request": {"rid": n, "client": n | null, "cmd": {"Get" | "Delete": {"key": text,
    /// "value": text}} | {"Put" | "Post": [tag 24 bytes, ...]}}}`, exactly; None otherwise.
    fn read_request(body: &bytes::Bytes) -> Option<Relay> {
        let mut r = Reader::new(body);
        map_of(&mut r, 1)?;
        key_is(&mut r, "Request")?;
        map_of(&mut r, 3)?;
        key_is(&mut r, "rid")?;
        let rid = uint(&mut r)?;
        key_is(&mut r, "client")?;
        let client = match r.head().ok()? {
            Head::Uint(c) => Some(c),
            Head::Simple(22) => None,
            _ => return None,
        };
        key_is(&mut r, "cmd")?;
        map_of(&mut r, 1)?;
        let name = r.text().ok()??;
        let cmd = match &*name {
            "Get" | "Delete" => {
                map_of(&mut r, 2)?;
                key_is(&mut r, "key")?;
                let k = owned_text(&mut r)?;
                key_is(&mut r, "value")?;
                let value = owned_text(&mut r)?;
                // Exactly two keys: no `limit` or `wait_ms` (PROTOCOL.md §4a; those go by serde).
                if name == "Get" {
                    Command::get(k, value)
                } else {
                    Command::delete(k, value)
                }
            }
            "Put" | "Post" => {
                let Head::Array(Some(n)) = r.head().ok()? else {
                    return None;
                };
                // Each element takes at least two bytes: no larger than the frame allows.
                let mut elems = Vec::with_capacity((n as usize).min(r.remaining() / 2));
                for _ in 0..n {
                    if r.head().ok()? != Head::Tag(TAG_ENCODED_CBOR) {
                        return None;
                    }
                    let Head::Bytes(Some(len)) = r.head().ok()? else {
                        return None;
                    };
                    let at = r.pos();
                    r.take(len).ok()?;
                    elems.push(RawItem::parse(body.slice(at..r.pos())).ok()?);
                }
                if name == "Put" {
                    Command::Put(elems)
                } else {
                    Command::Post(elems)
                }
            }
            _ => return None,
        };
        (r.remaining() == 0).then_some(Relay::Request { rid, client, cmd })
    }
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

impl Reply {
    /// The client response carrying this reply (PROTOCOL §4).
    pub fn into_response(self, id: Option<u64>) -> Response {
        match self {
            Reply::Pairs { pairs, message } => Response {
                pairs: Some(pairs),
                message,
                ..Response::ok(id)
            },
            Reply::Rejected(r) => Response {
                rejected: Some(r),
                ..Response::ok(id)
            },
            Reply::TooLarge(m) => Response::error(id, Status::TooLarge, m),
            Reply::Malformed(m) => Response::error(id, Status::Malformed, m),
            // Internal (STATUS): never a client's answer; `RelayAnswer` carries it as a count.
            Reply::Count(_) => Response::error(
                id,
                Status::Malformed,
                "internal error: a count answered a client request",
            ),
        }
    }
}

/// A replica's answer to a relayed request, as its store and replica machine keep it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayReply {
    pub rid: u64,
    pub reply: Reply,
}

/// Server -> proxy on the relay stream: the answer to request `rid`, already in the client's
/// encoding (PROTOCOL §4) with a null `id`, so that the proxy only puts the client's id in and
/// forwards the rest as is (no decoding, no re-encoding). The answer to the internal
/// [`Command::Count`] (STATUS) is the map `{"id": null, "status": "ok", "count": n}`, which the
/// proxy reads ([`RelayAnswer::count`]) and never forwards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayAnswer {
    pub rid: u64,
    pub response: RawItem,
}

/// The client encoding of the answer to a PUT or POST that used every element (`{"id": null,
/// "status": "ok", "rejected": []}`), as the primary writes it (a unit test compares them).
const PLAIN_WRITE_ANSWER: &[u8] = b"\xa3\x62id\xf6\x66status\x62ok\x68rejected\x80";

impl RelayAnswer {
    /// Appends the frame of the answer `reply` to request `rid` (the bytes serde would write for
    /// a `RelayAnswer`, without building one); `scratch` is working space.
    pub fn encode_into(rid: u64, reply: Reply, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
        scratch.clear();
        match reply {
            Reply::Count(n) => {
                scratch.extend_from_slice(&[0; 4]);
                cbor::write_head(scratch, 5, 3);
                scratch.extend_from_slice(b"\x62id\xf6\x66status\x62ok\x65count");
                cbor::write_head(scratch, 0, n);
            }
            // The commonest answer, as `into_response(None).encode_into` writes it (unit test).
            Reply::Rejected(r) if r.is_empty() => {
                scratch.extend_from_slice(&[0; 4]);
                scratch.extend_from_slice(PLAIN_WRITE_ANSWER);
            }
            r => r.into_response(None).encode_into(scratch),
        }
        let body = scratch.get(4..).unwrap_or_default();
        let start = frame::open(out);
        cbor::write_head(out, 5, 2);
        cbor::write_text(out, "rid");
        cbor::write_head(out, 0, rid);
        cbor::write_text(out, "response");
        write_embedded(out, body);
        frame::seal(out, start);
    }

    /// The count an answer to [`Command::Count`] carries; None for any other answer.
    pub fn count(response: &RawItem) -> Option<u64> {
        let Some(ciborium::Value::Map(m)) = response.to_value() else {
            return None;
        };
        m.iter().find_map(|(k, v)| match (k, v) {
            (ciborium::Value::Text(k), ciborium::Value::Integer(n)) if k == "count" => {
                u64::try_from(*n).ok()
            }
            _ => None,
        })
    }

    /// Reads a frame body written by [`RelayAnswer::encode_into`] in place: the response stays
    /// a slice of `body` (checked to be one well-formed item). Anything else is read by serde.
    pub fn read(body: &bytes::Bytes) -> Result<RelayAnswer, CborError> {
        let fast = || -> Option<(u64, usize)> {
            let mut r = Reader::new(body);
            map_of(&mut r, 2)?;
            key_is(&mut r, "rid")?;
            let rid = uint(&mut r)?;
            key_is(&mut r, "response")?;
            if r.head().ok()? != Head::Tag(TAG_ENCODED_CBOR) {
                return None;
            }
            let Head::Bytes(Some(n)) = r.head().ok()? else {
                return None;
            };
            (n == r.remaining() as u64).then_some((rid, r.pos()))
        };
        match fast() {
            Some((rid, at)) => {
                let response = body.slice(at..);
                // The commonest answer is known well-formed; any other is walked to check it.
                let response = if response == PLAIN_WRITE_ANSWER {
                    RawItem::from_checked(response)
                } else {
                    RawItem::parse(response)?
                };
                Ok(RelayAnswer { rid, response })
            }
            None => crate::wire::frame::decode(body),
        }
    }
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

impl Repl {
    /// Reads a replication frame body: an `Update` of the usual shapes (a change of pairs or
    /// keys, answered `Rejected` with nothing rejected or with `Pairs`) read in place, without
    /// serde; anything else, or anything this reader does not expect, through serde (which also
    /// words the error). The same value either way (unit tests compare both).
    pub fn read(body: &[u8]) -> Result<Repl, CborError> {
        let mut r = Reader::new(body);
        match read_update(&mut r) {
            Some(u) if r.remaining() == 0 => Ok(u),
            _ => crate::wire::frame::decode(body),
        }
    }
}

impl Repl {
    /// Appends one frame holding `m` (as [`crate::wire::frame::encode_into`] would): an `Update`
    /// of the usual shapes written directly, the same bytes serde writes (unit tests compare
    /// them), anything else through serde.
    pub fn encode_into(m: &Repl, out: &mut Vec<u8>) {
        if let Repl::Update {
            seq,
            rid,
            change,
            reply,
        } = m
            && reply_is_plain(reply)
        {
            let start = frame::open(out);
            cbor::write_head(out, 5, 1);
            cbor::write_text(out, "Update");
            cbor::write_head(out, 5, 4);
            cbor::write_text(out, "seq");
            cbor::write_head(out, 0, *seq);
            cbor::write_text(out, "rid");
            cbor::write_head(out, 0, *rid);
            cbor::write_text(out, "change");
            write_change(out, change);
            cbor::write_text(out, "reply");
            write_reply(out, reply);
            frame::seal(out, start);
        } else {
            frame::encode_into(m, out);
        }
    }
}

/// Writes one encoded CBOR item as serde writes a [`RawItem`]: tag 24 over its bytes.
fn write_embedded(out: &mut Vec<u8>, item: &[u8]) {
    cbor::write_head(out, 6, TAG_ENCODED_CBOR);
    cbor::write_head(out, 2, item.len() as u64);
    out.extend_from_slice(item);
}

fn write_pairs(out: &mut Vec<u8>, pairs: &[Pair]) {
    cbor::write_head(out, 4, pairs.len() as u64);
    for p in pairs {
        cbor::write_head(out, 5, 2);
        cbor::write_text(out, "key");
        cbor::write_text(out, &p.key);
        cbor::write_text(out, "value");
        cbor::write_text(out, &p.value);
    }
}

/// Writes a change as serde writes it (`{VARIANT: [..]}`).
pub fn write_change(out: &mut Vec<u8>, c: &Change) {
    cbor::write_head(out, 5, 1);
    match c {
        Change::Insert(p) => {
            cbor::write_text(out, "Insert");
            write_pairs(out, p);
        }
        Change::Replace(p) => {
            cbor::write_text(out, "Replace");
            write_pairs(out, p);
        }
        Change::Remove(keys) => {
            cbor::write_text(out, "Remove");
            cbor::write_head(out, 4, keys.len() as u64);
            for k in keys {
                cbor::write_text(out, k);
            }
        }
    }
}

/// True for the replies [`write_reply`] writes: a write's (nothing rejected) and a take's.
pub fn reply_is_plain(r: &Reply) -> bool {
    match r {
        Reply::Rejected(v) => v.is_empty(),
        Reply::Pairs { .. } => true,
        _ => false,
    }
}

/// Writes a reply for which [`reply_is_plain`] holds as serde writes it.
pub fn write_reply(out: &mut Vec<u8>, r: &Reply) {
    cbor::write_head(out, 5, 1);
    match r {
        Reply::Pairs { pairs, message } => {
            cbor::write_text(out, "Pairs");
            cbor::write_head(out, 5, 2);
            cbor::write_text(out, "pairs");
            write_pairs(out, pairs);
            cbor::write_text(out, "message");
            match message {
                None => out.push(0xf6),
                Some(m) => cbor::write_text(out, m),
            }
        }
        _ => {
            cbor::write_text(out, "Rejected");
            cbor::write_head(out, 4, 0);
        }
    }
}

// Small readers shared by the in-place readers of this module (`Relay::read`,
// `RelayAnswer::read`, `Repl::read`): each consumes what it expects or answers None, and the
// caller then reads the frame through serde.

/// Consumes a map head of exactly `n` entries.
fn map_of(r: &mut Reader<'_>, n: u64) -> Option<()> {
    (r.head().ok()? == Head::Map(Some(n))).then_some(())
}

/// Consumes a text item equal to `want`.
/// (Definite text only, compared as bytes: equal bytes are valid UTF-8. Anything else is
/// `None`, and the caller falls back to serde.)
fn key_is(r: &mut Reader<'_>, want: &str) -> Option<()> {
    match r.head().ok()? {
        Head::Text(Some(n)) if n == want.len() as u64 => {
            (r.take(n).ok()? == want.as_bytes()).then_some(())
        }
        _ => None,
    }
}

fn uint(r: &mut Reader<'_>) -> Option<u64> {
    match r.head().ok()? {
        Head::Uint(n) => Some(n),
        _ => None,
    }
}

fn owned_text(r: &mut Reader<'_>) -> Option<String> {
    Some(r.text().ok()??.into_owned())
}

/// A definite array's length (bounded by the bytes left: every element takes at least one).
fn array_len(r: &mut Reader<'_>) -> Option<usize> {
    let n = r.array().ok()??? as usize;
    (n <= r.remaining()).then_some(n)
}

fn pairs(r: &mut Reader<'_>) -> Option<Vec<Pair>> {
    let n = array_len(r)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        map_of(r, 2)?;
        key_is(r, "key")?;
        let key = owned_text(r)?;
        key_is(r, "value")?;
        out.push(Pair {
            key,
            value: owned_text(r)?,
        });
    }
    Some(out)
}

/// `Repl::Update` as serde writes it: `{"Update": {"seq", "rid", "change": {VARIANT: ..},
/// "reply": {"Rejected": []} | {"Pairs": {"pairs": [..], "message": null | text}}}}`.
fn read_update(r: &mut Reader<'_>) -> Option<Repl> {
    map_of(r, 1)?;
    key_is(r, "Update")?;
    map_of(r, 4)?;
    key_is(r, "seq")?;
    let seq = uint(r)?;
    key_is(r, "rid")?;
    let rid = uint(r)?;
    key_is(r, "change")?;
    map_of(r, 1)?;
    let change = match r.text().ok()??.as_ref() {
        "Insert" => Change::Insert(pairs(r)?),
        "Replace" => Change::Replace(pairs(r)?),
        "Remove" => {
            let n = array_len(r)?;
            let mut keys = Vec::with_capacity(n);
            for _ in 0..n {
                keys.push(owned_text(r)?);
            }
            Change::Remove(keys)
        }
        _ => return None,
    };
    key_is(r, "reply")?;
    map_of(r, 1)?;
    let reply = match r.text().ok()??.as_ref() {
        "Rejected" => {
            (array_len(r)? == 0).then_some(())?;
            Reply::Rejected(Vec::new())
        }
        "Pairs" => {
            map_of(r, 2)?;
            key_is(r, "pairs")?;
            let pairs = pairs(r)?;
            key_is(r, "message")?;
            let message = match r.peek().ok()? {
                Head::Simple(22) => {
                    r.head().ok()?;
                    None
                }
                _ => Some(owned_text(r)?),
            };
            Reply::Pairs { pairs, message }
        }
        _ => return None,
    };
    Some(Repl::Update {
        seq,
        rid,
        change,
        reply,
    })
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
        /// The last update the backup has applied (received; its log may not hold it yet). 0
        /// from a sender that does not say.
        #[serde(default)]
        received: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The request the proxy writes by reference, or directly (`Relay::encode_into`), is byte for
    /// byte the owned one, and reads back as it.
    #[test]
    fn a_request_by_reference_is_the_same_frame() {
        let elems = |n: usize| {
            (0..n)
                .map(|i| {
                    let v = ciborium::Value::Array(vec![
                        ciborium::Value::Array(vec!["k".into(), format!("{i}").into()]),
                        ciborium::Value::Array(vec!["v".into()]),
                    ]);
                    RawItem::from_value(&v)
                })
                .collect::<Vec<_>>()
        };
        let cmds = [
            Command::get("user,c1s2", ".*"),
            Command::Get {
                key: "a".into(),
                value: "b".into(),
                limit: Some(1),
                wait_ms: Some(5000),
            },
            Command::delete("k", "ü"),
            Command::Put(elems(3)),
            Command::Post(elems(1)),
            Command::Post(elems(30)),
            Command::Put(vec![]),
            Command::Post(vec![RawItem::from_value(&ciborium::Value::Text(
                "x".repeat(300),
            ))]),
            Command::Count,
        ];
        for (i, cmd) in cmds.iter().enumerate() {
            for client in [None, Some(7), Some(u64::MAX)] {
                let rid = u64::MAX - i as u64;
                let by_ref = frame::encode(&RelayRequestRef::Request { rid, client, cmd });
                let owned = Relay::Request {
                    rid,
                    client,
                    cmd: cmd.clone(),
                };
                assert_eq!(by_ref, frame::encode(&owned));
                // Written by hand (PUT/POST) or by serde, the frame is the same bytes.
                let mut direct = vec![0xee];
                Relay::encode_into(&owned, &mut direct);
                assert_eq!(direct[1..], by_ref[..], "{owned:?}");
                let body = bytes::Bytes::copy_from_slice(&by_ref[4..]);
                assert_eq!(Relay::read(&body).unwrap(), owned);
            }
        }
    }

    /// Every shape of update (and other messages) reads the same through the in-place reader
    /// as through serde, and a frame the reader does not expect falls back to serde.
    #[test]
    fn replication_frames_read_in_place_equal_serde() {
        let p = |k: &str, v: &str| Pair::new(k, v);
        let msgs = vec![
            Repl::Update {
                seq: 1,
                rid: u64::MAX,
                change: Change::Insert(vec![p("a,b", "1"), p("c", "")]),
                reply: Reply::Rejected(vec![]),
            },
            Repl::Update {
                seq: 1 << 40,
                rid: 7,
                change: Change::Replace(vec![
                    p("k", &"v".repeat(300)),
                    p(&"k".repeat(70_000), "w"),
                ]),
                reply: Reply::Rejected(vec![]),
            },
            Repl::Update {
                seq: 3,
                rid: 300,
                change: Change::Remove(vec!["x".into(), "y".into()]),
                reply: Reply::Pairs {
                    pairs: vec![p("x", "1"), p("y", "2")],
                    message: None,
                },
            },
            Repl::Update {
                seq: 4,
                rid: 24,
                change: Change::Remove(vec![]),
                reply: Reply::Pairs {
                    pairs: vec![],
                    message: Some("timed out".into()),
                },
            },
            Repl::Update {
                seq: 5,
                rid: 25,
                change: Change::Insert(vec![]),
                reply: Reply::Rejected(vec![RawItem::from_value(&ciborium::Value::Integer(
                    3.into(),
                ))]),
            },
            Repl::Update {
                seq: 6,
                rid: 26,
                change: Change::Insert(vec![]),
                reply: Reply::Count(9),
            },
            Repl::Watermark(12),
            Repl::Stop,
        ];
        for (i, m) in msgs.into_iter().enumerate() {
            let mut body = Vec::new();
            ciborium::into_writer(&m, &mut body).unwrap();
            // The first four are the shapes read in place; the rest go through serde.
            let fast = read_update(&mut Reader::new(&body));
            assert_eq!(fast.is_some(), i < 4, "message {i}");
            if let Some(f) = fast {
                assert_eq!(f, m);
            }
            assert_eq!(Repl::read(&body).unwrap(), m);
            // Written by hand or by serde, the frame is the same bytes.
            let (mut mine, mut serde) = (Vec::new(), Vec::new());
            Repl::encode_into(&m, &mut mine);
            crate::wire::frame::encode_into(&m, &mut serde);
            assert_eq!(mine, serde, "message {i}");
            // A body cut short or with bytes after it is refused, as serde refuses it.
            assert!(Repl::read(&body[..body.len() - 1]).is_err());
            body.push(0);
            assert!(Repl::read(&body).is_err());
        }
    }
    use crate::space::Pair;

    fn replies() -> Vec<Reply> {
        let raw = |v: ciborium::Value| RawItem::from_value(&v);
        vec![
            Reply::Pairs {
                pairs: vec![Pair::new("a,b", "1")],
                message: None,
            },
            Reply::Pairs {
                pairs: vec![],
                message: Some("not computed".into()),
            },
            Reply::Rejected(vec![raw(ciborium::Value::Text("junk".into()))]),
            Reply::Rejected(vec![]),
            Reply::TooLarge("too large".into()),
            Reply::Malformed("bad".into()),
        ]
    }

    #[test]
    fn the_plain_write_answer_is_what_the_primary_writes_and_reads_back_as_serde_does() {
        let mut general = Vec::new();
        Reply::Rejected(vec![])
            .into_response(None)
            .encode_into(&mut general);
        assert_eq!(&general[4..], PLAIN_WRITE_ANSWER);
        let (mut scratch, mut f) = (Vec::new(), Vec::new());
        RelayAnswer::encode_into(7, Reply::Rejected(vec![]), &mut scratch, &mut f);
        let body = bytes::Bytes::copy_from_slice(&f[4..]);
        let a = RelayAnswer::read(&body).unwrap();
        assert_eq!(a.response.as_bytes(), PLAIN_WRITE_ANSWER);
        assert_eq!(a, crate::wire::frame::decode::<RelayAnswer>(&body).unwrap());
        assert!(crate::wire::cbor::validate(PLAIN_WRITE_ANSWER).is_ok());
    }

    #[test]
    fn a_count_is_carried_as_a_map_the_proxy_reads_and_no_other_answer_has_one() {
        for n in [0, 23, 24, 1 << 40, u64::MAX] {
            let (mut scratch, mut f) = (Vec::new(), Vec::new());
            RelayAnswer::encode_into(9, Reply::Count(n), &mut scratch, &mut f);
            let a = RelayAnswer::read(&bytes::Bytes::copy_from_slice(&f[4..])).unwrap();
            assert_eq!(a.rid, 9);
            assert_eq!(RelayAnswer::count(&a.response), Some(n));
            let v = a.response.to_value().unwrap();
            let r = Response::from_value(&v).expect("a well-formed client response");
            assert_eq!((r.id, r.status), (None, Status::Ok));
        }
        for reply in replies() {
            let (mut scratch, mut f) = (Vec::new(), Vec::new());
            RelayAnswer::encode_into(9, reply, &mut scratch, &mut f);
            let a = RelayAnswer::read(&bytes::Bytes::copy_from_slice(&f[4..])).unwrap();
            assert_eq!(RelayAnswer::count(&a.response), None);
        }
    }

    #[test]
    fn a_relayed_request_is_read_in_place_as_serde_reads_it() {
        let raw = |v: ciborium::Value| RawItem::from_value(&v);
        let text = |s: &str| ciborium::Value::Text(s.into());
        let cmds = [
            Command::get("a,b", ".*"),
            Command::delete("a", "x|y"),
            Command::Put(vec![
                raw(ciborium::Value::Array(vec![text("k"), text("v")])),
                raw(text("junk")),
            ]),
            Command::Post(vec![]),
        ];
        for (i, cmd) in cmds.iter().enumerate() {
            for client in [None, Some(7), Some(1 << 40)] {
                let m = Relay::Request {
                    rid: 1 << (i * 9),
                    client,
                    cmd: cmd.clone(),
                };
                let mut f = Vec::new();
                crate::wire::frame::encode_into(&m, &mut f);
                let body = bytes::Bytes::copy_from_slice(&f[4..]);
                assert!(Relay::read_request(&body).is_some(), "{m:?}");
                assert_eq!(Relay::read(&body).unwrap(), m);
            }
        }
        // With `limit` / `wait_ms` (PROTOCOL.md §4a) serde reads it, to the same result.
        for cmd in [
            Command::Delete {
                key: "job,.*".into(),
                value: ".*".into(),
                limit: Some(1),
                wait_ms: Some(30_000),
            },
            Command::Get {
                key: "a".into(),
                value: ".*".into(),
                limit: None,
                wait_ms: Some(0),
            },
        ] {
            let m = Relay::Request {
                rid: 9,
                client: Some(3),
                cmd,
            };
            let mut f = Vec::new();
            crate::wire::frame::encode_into(&m, &mut f);
            let body = bytes::Bytes::copy_from_slice(&f[4..]);
            assert!(Relay::read_request(&body).is_none(), "{m:?}");
            assert_eq!(Relay::read(&body).unwrap(), m);
        }
        for m in [Relay::Watermark(5), Relay::ClientGone { client: 3 }] {
            let mut f = Vec::new();
            crate::wire::frame::encode_into(&m, &mut f);
            assert_eq!(
                Relay::read(&bytes::Bytes::copy_from_slice(&f[4..])).unwrap(),
                m
            );
        }
    }

    #[test]
    fn a_relay_answer_is_written_as_serde_would_and_read_back_in_place() {
        for (i, reply) in replies().into_iter().enumerate() {
            let rid = 1 << (i * 9);
            let (mut scratch, mut fast) = (Vec::new(), Vec::new());
            RelayAnswer::encode_into(rid, reply.clone(), &mut scratch, &mut fast);
            let mut client = Vec::new();
            reply.clone().into_response(None).encode_into(&mut client);
            let answer = RelayAnswer {
                rid,
                response: RawItem::parse(bytes::Bytes::copy_from_slice(&client[4..])).unwrap(),
            };
            let mut slow = Vec::new();
            crate::wire::frame::encode_into(&answer, &mut slow);
            assert_eq!(fast, slow, "{reply:?}");
            let read = RelayAnswer::read(&bytes::Bytes::copy_from_slice(&fast[4..])).unwrap();
            assert_eq!(read, answer);
        }
    }
}
