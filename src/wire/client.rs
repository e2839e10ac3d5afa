//! The client protocol of PROTOCOL.md: requests, responses, statuses, close codes.
//!
//! Parsing never panics and never trusts a length: anything odd becomes a `malformed` answer.

use ciborium::Value;
use serde::{Deserialize, Serialize};

use crate::space::{Pair, TupleLimits};
use crate::wire::cbor::{self, Head, RawItem, Reader};
use crate::wire::node::ReplicaInfo;

/// The backup as STATUS describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupState {
    /// No backup is registered.
    #[default]
    Absent,
    /// A backup is registered and receiving its initial copy (it cannot take over yet).
    Syncing,
    /// The backup holds every acknowledged write and acknowledges each new one.
    Synced,
}

impl BackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::Absent => "absent",
            BackupState::Syncing => "syncing",
            BackupState::Synced => "synced",
        }
    }
}

/// STATUS's `cluster` map (PROTOCOL.md §4): the one type the proxy answers with and the CLI, the
/// nemesis runner, tests and benches read. Keys added after the first version default when an
/// older proxy leaves them out; unknown keys are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The current epoch (+1 at each failover).
    pub epoch: u64,
    /// The replica requests are routed to.
    pub primary: Option<ReplicaInfo>,
    /// Its backup, while one is registered.
    pub backup: Option<ReplicaInfo>,
    /// The backup holds every acknowledged write (it may take over).
    pub backup_synced: bool,
    /// Connections open on CLIENT_SAP.
    pub clients: u64,
    /// Pairs in the space, counted by the primary after every write answered before the STATUS
    /// arrived (null: no primary, or it did not answer within `status_timeout_ms`).
    pub pairs: Option<u64>,
    /// Requests the proxy holds that are not answered yet.
    pub pending: u64,
    #[serde(default)]
    pub backup_state: BackupState,
    /// Updates the primary applied that its synchronised backup has not acknowledged yet, as of
    /// the primary's last heartbeat (null without a synchronised backup).
    #[serde(default)]
    pub replication_lag: Option<u64>,
}

impl ClusterStatus {
    /// Upper bound of its CBOR encoding (for the reply budgets).
    pub fn encoded_len(&self) -> usize {
        let mut out = Vec::new();
        match ciborium::into_writer(self, &mut out) {
            Ok(()) => out.len(),
            Err(_) => 4096,
        }
    }

    /// The process id of the primary (`who` = "primary") or the backup ("backup").
    pub fn pid_of(&self, who: &str) -> Option<u32> {
        match who {
            "primary" => self.primary.as_ref().map(|r| r.pid),
            "backup" => self.backup.as_ref().map(|r| r.pid),
            _ => None,
        }
    }
}

/// Response status (PROTOCOL.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Ok,
    Malformed,
    NotImplemented,
    Forbidden,
    TooLarge,
    Unavailable,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Malformed => "malformed",
            Status::NotImplemented => "not-implemented",
            Status::Forbidden => "forbidden",
            Status::TooLarge => "too-large",
            Status::Unavailable => "unavailable",
            Status::Unknown => "unknown",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "ok" => Status::Ok,
            "malformed" => Status::Malformed,
            "not-implemented" => Status::NotImplemented,
            "forbidden" => Status::Forbidden,
            "too-large" => Status::TooLarge,
            "unavailable" => Status::Unavailable,
            "unknown" => Status::Unknown,
            _ => return None,
        })
    }
}

/// QUIC application close codes (PROTOCOL.md §5; `SLOW_READER` is this implementation's
/// addition, docs/SECURITY.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    NoError = 0,
    ServiceRefused = 1,
    Forbidden = 2,
    FrameTooLarge = 3,
    ShuttingDown = 4,
    /// The client left too many answers unread for too long (or the proxy's memory for unread
    /// answers was full and this connection held the most).
    SlowReader = 5,
}

impl CloseCode {
    pub fn code(self) -> u32 {
        self as u32
    }
    pub fn from_code(code: u64) -> Option<CloseCode> {
        Some(match code {
            0 => CloseCode::NoError,
            1 => CloseCode::ServiceRefused,
            2 => CloseCode::Forbidden,
            3 => CloseCode::FrameTooLarge,
            4 => CloseCode::ShuttingDown,
            5 => CloseCode::SlowReader,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            CloseCode::NoError => "NO_ERROR",
            CloseCode::ServiceRefused => "SERVICE_REFUSED",
            CloseCode::Forbidden => "FORBIDDEN",
            CloseCode::FrameTooLarge => "FRAME_TOO_LARGE",
            CloseCode::ShuttingDown => "SHUTTING_DOWN",
            CloseCode::SlowReader => "SLOW_READER",
        }
    }
}

/// The operator of a request, ASCII case-insensitive on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Post,
    Delete,
    Shutdown,
    Status,
    Other(String),
}

impl Op {
    pub fn parse(s: &str) -> Op {
        const NAMED: [(&str, Op); 6] = [
            ("GET", Op::Get),
            ("PUT", Op::Put),
            ("POST", Op::Post),
            ("DELETE", Op::Delete),
            ("SHUTDOWN", Op::Shutdown),
            ("STATUS", Op::Status),
        ];
        NAMED
            .into_iter()
            .find(|(name, _)| s.eq_ignore_ascii_case(name))
            .map_or_else(|| Op::Other(s.to_owned()), |(_, op)| op)
    }
    pub fn is_data(&self) -> bool {
        matches!(self, Op::Get | Op::Put | Op::Post | Op::Delete)
    }
    pub fn is_admin(&self) -> bool {
        matches!(self, Op::Shutdown | Op::Status)
    }
}

/// A data operation with its argument checked for shape (not for content: a bad regex or an
/// ill-formed pair is the space's business, answered `ok`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Get {
        key: String,
        value: String,
        /// PROTOCOL.md §4a: at most this many pairs, the first in key order.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
        /// PROTOCOL.md §4a: if nothing matches, wait up to this long (capped by `max_wait_ms`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_ms: Option<u64>,
    },
    Put(Vec<RawItem>),
    Post(Vec<RawItem>),
    Delete {
        key: String,
        value: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_ms: Option<u64>,
    },
    /// Not a client operation: the proxy asks the primary how many pairs it holds (for STATUS),
    /// ordered like a read after every write answered before.
    Count,
}

impl Command {
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Command::Put(_) | Command::Post(_) | Command::Delete { .. }
        )
    }
    /// A plain GET of `[key, value]` (no limit, no wait).
    pub fn get(key: impl Into<String>, value: impl Into<String>) -> Command {
        Command::Get {
            key: key.into(),
            value: value.into(),
            limit: None,
            wait_ms: None,
        }
    }

    /// A plain DELETE of `[key, value]` (no limit, no wait).
    pub fn delete(key: impl Into<String>, value: impl Into<String>) -> Command {
        Command::Delete {
            key: key.into(),
            value: value.into(),
            limit: None,
            wait_ms: None,
        }
    }

    /// How long a GET or DELETE may wait for a match (PROTOCOL.md §4a), capped at `max_ms`;
    /// 0 for everything else.
    pub fn wait_ms(&self, max_ms: u64) -> u64 {
        match self {
            Command::Get { wait_ms, .. } | Command::Delete { wait_ms, .. } => {
                wait_ms.unwrap_or(0).min(max_ms)
            }
            _ => 0,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Get { .. } => "GET",
            Command::Put(_) => "PUT",
            Command::Post(_) => "POST",
            Command::Delete { .. } => "DELETE",
            Command::Count => "COUNT",
        }
    }

    /// Memory the command holds (what a pending request costs the proxy): strings and element
    /// bytes, plus one handle per element.
    pub fn mem_bytes(&self) -> usize {
        std::mem::size_of::<Command>()
            + match self {
                Command::Get { key, value, .. } | Command::Delete { key, value, .. } => {
                    key.capacity() + value.capacity()
                }
                Command::Put(e) | Command::Post(e) => e.iter().map(RawItem::mem_bytes).sum(),
                Command::Count => 0,
            }
    }
}

/// A request as read from a frame: `id` and `op` present and typed, `args` not yet checked (kept
/// as the bytes sent, never decoded into a value tree).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
    pub args: Option<RawItem>,
    /// `limit` (PROTOCOL.md §4a): absent, an unsigned integer, or `Err` for any other type.
    pub limit: Option<Result<u64, WrongType>>,
    /// `wait_ms` (PROTOCOL.md §4a), same.
    pub wait_ms: Option<Result<u64, WrongType>>,
}

/// An optional request key held a value of the wrong type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrongType;

/// A request that cannot be understood; answered `malformed` with whatever id could be read.
#[derive(Clone, Debug, PartialEq)]
pub struct Malformed {
    pub id: Option<u64>,
    pub message: String,
}

impl Malformed {
    pub fn response(self) -> Response {
        Response::error(self.id, Status::Malformed, self.message)
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

/// What one map entry of a request held, as far as the request cares.
enum Field {
    Id(Option<u64>),
    Op(Option<String>),
    Args(std::ops::Range<usize>),
    Limit(Result<u64, WrongType>),
    WaitMs(Result<u64, WrongType>),
    Other,
}

/// Reads a request from a frame body (PROTOCOL.md §3) without building a value tree: `id` and
/// `op` are read in place and `args` kept as its bytes (one copy of them; the frame buffer is not
/// pinned), in one walk that also checks the body is one well-formed CBOR item (each entry is
/// checked as it is read or skipped, at the depth `cbor::validate` allows it, and nothing may
/// follow the map). On a body that is not, the error is `cbor::validate`'s (the first fault).
/// Costs O(body) time and O(args) memory, whatever the body nests.
pub fn parse_request(body: &[u8]) -> Result<Request, Malformed> {
    let not_cbor = |e: crate::wire::frame::CborError| Malformed {
        id: None,
        message: format!(
            "request is not one CBOR item: {}",
            cbor::validate(body).err().unwrap_or(e)
        ),
    };
    let mut r = Reader::new(body);
    let not_map = || Malformed {
        id: None,
        message: "request must be a CBOR map with keys id, op, args".into(),
    };
    let n = match r.head().map_err(not_cbor)? {
        Head::Map(n) => n,
        _ => {
            cbor::validate(body).map_err(not_cbor)?;
            return Err(not_map());
        }
    };
    // The map's entries, as `cbor::validate` nests them.
    let depth = cbor::MAX_DEPTH - 1;
    let mut id_v: Option<Option<u64>> = None;
    let mut op_v: Option<Option<String>> = None;
    let mut args = None;
    let (mut limit, mut wait_ms) = (None, None);
    let mut seen = 0u64;
    loop {
        match n {
            Some(n) if seen == n => break,
            None if r.at_break().map_err(not_cbor)? => break,
            _ => {}
        }
        seen += 1;
        let field = match r.text().map_err(not_cbor)? {
            Some(k) if k == "id" => match r.peek().map_err(not_cbor)? {
                Head::Uint(i) => {
                    r.head().map_err(not_cbor)?;
                    Field::Id(Some(i))
                }
                _ => {
                    r.skip(depth).map_err(not_cbor)?;
                    Field::Id(None)
                }
            },
            Some(k) if k == "op" => match r.text().map_err(not_cbor)? {
                Some(op) => Field::Op(Some(op.into_owned())),
                None => {
                    r.skip(depth).map_err(not_cbor)?;
                    Field::Op(None)
                }
            },
            Some(k) if k == "limit" || k == "wait_ms" => {
                let v = match r.peek().map_err(not_cbor)? {
                    Head::Uint(i) => {
                        r.head().map_err(not_cbor)?;
                        Ok(i)
                    }
                    _ => {
                        r.skip(depth).map_err(not_cbor)?;
                        Err(WrongType)
                    }
                };
                if k == "limit" {
                    Field::Limit(v)
                } else {
                    Field::WaitMs(v)
                }
            }
            Some(k) if k == "args" => {
                let start = r.pos();
                r.skip(depth).map_err(not_cbor)?;
                Field::Args(start..r.pos())
            }
            Some(_) => {
                r.skip(depth).map_err(not_cbor)?;
                Field::Other
            }
            None => {
                // A key that is not text: skip it and its value (unknown keys are ignored).
                r.skip(depth).map_err(not_cbor)?;
                r.skip(depth).map_err(not_cbor)?;
                Field::Other
            }
        };
        // The last occurrence of a key wins.
        match field {
            Field::Id(v) => id_v = Some(v),
            Field::Op(v) => op_v = Some(v),
            Field::Args(span) => args = Some(span),
            Field::Limit(v) => limit = Some(v),
            Field::WaitMs(v) => wait_ms = Some(v),
            Field::Other => {}
        }
    }
    if r.remaining() > 0 {
        return Err(not_cbor(crate::wire::frame::CborError::TrailingBytes(
            r.remaining(),
        )));
    }
    let id = match id_v {
        None => {
            return Err(Malformed {
                id: None,
                message: "request has no `id`".into(),
            });
        }
        Some(Some(id)) => id,
        Some(None) => {
            return Err(Malformed {
                id: None,
                message: "`id` must be an unsigned integer below 2^64".into(),
            });
        }
    };
    let op = match op_v {
        Some(Some(op)) => Op::parse(&op),
        Some(None) => {
            return Err(Malformed {
                id: Some(id),
                message: "`op` must be a text string".into(),
            });
        }
        None => {
            return Err(Malformed {
                id: Some(id),
                message: "request has no `op`".into(),
            });
        }
    };
    let args = args.map(|span| RawItem::from_checked(bytes::Bytes::copy_from_slice(&body[span])));
    Ok(Request {
        id,
        op,
        args,
        limit,
        wait_ms,
    })
}

/// The usual GET, DELETE, PUT or POST, read in one pass without the general walk: a definite map
/// of exactly `id` (unsigned), `op` (`GET`/`DELETE`/`PUT`/`POST`, any case) and `args`, in this
/// order, short heads, nothing after; `args` is, for GET/DELETE, a definite array of two definite
/// text strings, for PUT/POST a definite array of at most `max_pairs` elements, each a definite
/// array of two definite arrays of definite text strings. `None` for anything else:
/// [`parse_request`] and [`command_of`] then decide, and for these shapes they give the same id
/// and command (unit tests compare them on every byte-level variation of such requests, and the
/// `client_frame` fuzz target). The general path walks a PUT/POST's `args` twice (once to check
/// it, once to cut out its elements), this one once. It reads heads itself rather than through
/// [`Reader`]: the same walk with `Reader::head` and `Reader::text` cost the proxy 2.17–2.27 µs
/// of CPU per GET at (16,16) against 2.08–2.11 µs (3 alternating rounds).
pub fn fast_command(body: &[u8], max_pairs: usize) -> Option<(u64, Command)> {
    let b = body.strip_prefix(&[0xa3, 0x62, b'i', b'd'])?;
    let (id, b) = fast_head(b, 0)?;
    let b = b.strip_prefix(&[0x62, b'o', b'p'])?;
    let (op, b) = fast_text(b)?;
    // `args`, as the general reader keeps it: the array's bytes.
    let args = b.strip_prefix(&[0x64, b'a', b'r', b'g', b's'])?;
    let cmd = if op.eq_ignore_ascii_case("GET") {
        let (key, value) = fast_patterns(args)?;
        Command::get(key, value)
    } else if op.eq_ignore_ascii_case("DELETE") {
        let (key, value) = fast_patterns(args)?;
        Command::delete(key, value)
    } else if op.eq_ignore_ascii_case("PUT") {
        Command::Put(fast_elements(args, max_pairs)?)
    } else if op.eq_ignore_ascii_case("POST") {
        Command::Post(fast_elements(args, max_pairs)?)
    } else {
        return None;
    };
    Some((id, cmd))
}

/// `[keyexp, valexp]`, exactly, as [`fast_command`] reads it.
fn fast_patterns(args: &[u8]) -> Option<(&str, &str)> {
    let b = args.strip_prefix(&[0x82])?;
    let (key, b) = fast_text(b)?;
    let (value, b) = fast_text(b)?;
    b.is_empty().then_some((key, value))
}

/// A PUT/POST's elements, exactly as [`fast_command`] reads them: slices of one copy of `args`.
fn fast_elements(args: &[u8], max_pairs: usize) -> Option<Vec<RawItem>> {
    let (n, mut b) = fast_head(args, 4)?;
    if n > max_pairs as u64 {
        return None;
    }
    let first = args.len() - b.len();
    // Cut from one copy of `args` (the frame buffer is not pinned), element by element; every
    // element takes at least three bytes, which bounds what is reserved.
    let whole = bytes::Bytes::copy_from_slice(args);
    let mut elems = Vec::with_capacity((n as usize).min(b.len() / 3));
    let mut start = first;
    for _ in 0..n {
        b = b.strip_prefix(&[0x82])?;
        for _ in 0..2 {
            let (k, mut rest) = fast_head(b, 4)?;
            // Every text takes at least one byte: a count beyond the bytes left is refused
            // before the loop.
            if k > rest.len() as u64 {
                return None;
            }
            for _ in 0..k {
                rest = fast_text(rest)?.1;
            }
            b = rest;
        }
        let end = args.len() - b.len();
        elems.push(RawItem::from_checked(whole.slice(start..end)));
        start = end;
    }
    b.is_empty().then_some(elems)
}

/// The argument of a head of major type `major` (definite, at most 8 bytes), and the rest.
fn fast_head(b: &[u8], major: u8) -> Option<(u64, &[u8])> {
    let (&ib, rest) = b.split_first()?;
    if ib >> 5 != major {
        return None;
    }
    let n = match ib & 0x1f {
        ai @ 0..=23 => return Some((u64::from(ai), rest)),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return None,
    };
    let (arg, rest) = rest.split_at_checked(n)?;
    Some((arg.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b)), rest))
}

/// A definite text string, and the rest.
fn fast_text(b: &[u8]) -> Option<(&str, &[u8])> {
    let (n, rest) = fast_head(b, 3)?;
    let (t, rest) = rest.split_at_checked(usize::try_from(n).ok()?)?;
    Some((std::str::from_utf8(t).ok()?, rest))
}

/// Checks the argument shape of a data operation (reading `args` in place).
pub fn command_of(req: Request, max_pairs: usize) -> Result<Command, Malformed> {
    let id = Some(req.id);
    let name = match req.op {
        Op::Get => "GET",
        Op::Delete => "DELETE",
        Op::Put => "PUT",
        Op::Post => "POST",
        Op::Shutdown | Op::Status | Op::Other(_) => {
            return Err(Malformed {
                id,
                message: "not a data operation".into(),
            });
        }
    };
    let bad = |message: String| Malformed { id, message };
    let Some(args) = req.args else {
        return Err(bad(match req.op {
            Op::Get | Op::Delete => {
                format!("{name} args must be an array of two text strings [keyexp, valexp]")
            }
            _ => format!("{name} needs `args`: an array of pairs"),
        }));
    };
    match req.op {
        Op::Get | Op::Delete => {
            let limit = match req.limit {
                None => None,
                Some(Ok(n)) if n >= 1 => Some(n),
                Some(_) => {
                    return Err(bad(format!(
                        "{name} `limit` must be an unsigned integer of at least 1"
                    )));
                }
            };
            let wait_ms = match req.wait_ms {
                None => None,
                Some(Ok(n)) => Some(n),
                Some(Err(WrongType)) => {
                    return Err(bad(format!(
                        "{name} `wait_ms` must be an unsigned integer (milliseconds)"
                    )));
                }
            };
            let (key, value) = patterns_of(&args).map_err(|two| {
                bad(if two {
                    format!("{name} args must be two text strings [keyexp, valexp]")
                } else {
                    format!("{name} args must be an array of two text strings [keyexp, valexp]")
                })
            })?;
            Ok(if req.op == Op::Get {
                Command::Get {
                    key,
                    value,
                    limit,
                    wait_ms,
                }
            } else {
                Command::Delete {
                    key,
                    value,
                    limit,
                    wait_ms,
                }
            })
        }
        _ => {
            let elems = elements_of(&args, max_pairs).map_err(|e| {
                bad(match e {
                    ElemsError::NotArray => {
                        format!("{name} args must be an array of pairs, not a single value")
                    }
                    ElemsError::TooMany(Some(n)) => format!(
                        "{name} carries {n} elements, more than the limit of {max_pairs}; split the request"
                    ),
                    ElemsError::TooMany(None) => format!(
                        "{name} carries more than the limit of {max_pairs} elements; split the request"
                    ),
                })
            })?;
            Ok(if req.op == Op::Put {
                Command::Put(elems)
            } else {
                Command::Post(elems)
            })
        }
    }
}

/// `[keyexp, valexp]`: Err(true) if it is a two-item array of something else.
fn patterns_of(args: &RawItem) -> Result<(String, String), bool> {
    let mut r = Reader::new(args.as_bytes());
    let n = match r.array() {
        Ok(Some(n)) => n,
        _ => return Err(false),
    };
    // Count the items first (cheap: the bytes were validated), so `[1, 2, 3]` is "not two".
    let mut count = r.clone();
    let mut items = 0u64;
    loop {
        match n {
            Some(n) if items == n => break,
            None if count.at_break().map_err(|_| false)? => break,
            _ => {}
        }
        if items == 2 || count.skip(cbor::MAX_DEPTH).is_err() {
            return Err(false);
        }
        items += 1;
    }
    if items != 2 {
        return Err(false);
    }
    let k = r.text().ok().flatten().ok_or(true)?.into_owned();
    let v = r.text().ok().flatten().ok_or(true)?.into_owned();
    Ok((k, v))
}

enum ElemsError {
    NotArray,
    /// More elements than allowed (how many, when the header says).
    TooMany(Option<u64>),
}

/// The elements of a PUT/POST as slices of `args` (no copy, no value tree).
fn elements_of(args: &RawItem, max_pairs: usize) -> Result<Vec<RawItem>, ElemsError> {
    let bytes = args.as_bytes();
    let whole = args.clone().into_bytes();
    let mut r = Reader::new(bytes);
    let n = match r.array() {
        Ok(Some(n)) => n,
        _ => return Err(ElemsError::NotArray),
    };
    if let Some(n) = n
        && n > max_pairs as u64
    {
        return Err(ElemsError::TooMany(Some(n)));
    }
    let mut out = Vec::with_capacity(n.map_or(0, |n| n as usize));
    loop {
        match n {
            Some(n) if out.len() as u64 == n => break,
            None if r.at_break().map_err(|_| ElemsError::NotArray)? => break,
            _ => {}
        }
        if out.len() == max_pairs {
            return Err(ElemsError::TooMany(None));
        }
        let start = r.pos();
        // A `RawItem` is well-formed (its constructors check it): only the element's end is
        // needed here.
        r.skip_checked().map_err(|_| ElemsError::NotArray)?;
        out.push(RawItem::from_checked(whole.slice(start..r.pos())));
    }
    Ok(out)
}

/// Reads a PUT/POST element as a [`Pair`], or `None` if it is not exactly `[key-tuple,
/// value-tuple]` with two well-formed tuples (same rule as [`crate::space::pair_from_value`],
/// read in place: a huge ill-formed element costs nothing).
pub fn pair_from_raw(e: &RawItem, limits: &TupleLimits) -> Option<Pair> {
    let mut r = Reader::new(e.as_bytes());
    let n = r.array().ok()??;
    if n.is_some_and(|n| n != 2) {
        return None;
    }
    let key = tuple_from_reader(&mut r, limits)?;
    let value = tuple_from_reader(&mut r, limits)?;
    if n.is_none() && !r.at_break().ok()? {
        return None;
    }
    Some(Pair { key, value })
}

fn tuple_from_reader(r: &mut Reader<'_>, limits: &TupleLimits) -> Option<String> {
    let n = r.array().ok()??;
    // Check arity before touching elements so a huge array costs nothing.
    if n.is_some_and(|n| n == 0 || n > limits.max_arity as u64) {
        return None;
    }
    let mut out = String::new();
    let mut index = 0usize;
    loop {
        match n {
            Some(n) if index as u64 == n => break,
            None if r.at_break().ok()? => break,
            _ => {}
        }
        if index == limits.max_arity {
            return None;
        }
        let e = r.text().ok()??;
        crate::space::tuple::check_element(index, &e, limits).ok()?;
        if index > 0 {
            out.push(',');
        }
        out.push_str(&e);
        index += 1;
    }
    (index > 0).then_some(out)
}

/// A response (PROTOCOL.md §4). Fields that do not apply are `None` and absent on the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub id: Option<u64>,
    pub status: Status,
    pub pairs: Option<Vec<Pair>>,
    /// PUT/POST elements not used, exactly as the client sent them.
    pub rejected: Option<Vec<RawItem>>,
    pub message: Option<String>,
    /// STATUS's answer (boxed: it is far larger than the other fields and rare).
    pub cluster: Option<Box<ClusterStatus>>,
}

impl Response {
    pub fn error(id: Option<u64>, status: Status, message: impl Into<String>) -> Response {
        Response {
            id,
            status,
            pairs: None,
            rejected: None,
            message: Some(message.into()),
            cluster: None,
        }
    }
    pub fn ok(id: Option<u64>) -> Response {
        Response {
            id,
            status: Status::Ok,
            pairs: None,
            rejected: None,
            message: None,
            cluster: None,
        }
    }

    /// The CBOR map sent to the client.
    pub fn to_value(&self) -> Value {
        let mut m = Vec::with_capacity(4);
        let t = |s: &str| Value::Text(s.to_owned());
        m.push((
            t("id"),
            self.id.map_or(Value::Null, |i| Value::Integer(i.into())),
        ));
        m.push((t("status"), t(self.status.as_str())));
        if let Some(pairs) = &self.pairs {
            m.push((
                t("pairs"),
                Value::Array(
                    pairs
                        .iter()
                        .map(|p| crate::space::pair_to_value(&p.key, &p.value))
                        .collect(),
                ),
            ));
        }
        if let Some(msg) = &self.message {
            m.push((t("message"), t(msg)));
        }
        if let Some(c) = &self.cluster {
            m.push((t("cluster"), Value::serialized(c).unwrap_or(Value::Null)));
        }
        // Last, as `encode_into` writes it.
        if let Some(r) = &self.rejected {
            m.push((
                t("rejected"),
                Value::Array(
                    r.iter()
                        .map(|x| x.to_value().unwrap_or(Value::Null))
                        .collect(),
                ),
            ));
        }
        Value::Map(m)
    }

    /// Appends this response as one frame, serialising straight from the fields (no CBOR value
    /// tree is built: this is the hot path of every answer).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        crate::wire::frame::encode_into(&WireResponse(self), out);
        if out.len() == start {
            return;
        }
        // `rejected` comes last, its elements copied as sent (serde cannot write raw CBOR): the
        // map head above already counts it.
        if let Some(r) = &self.rejected {
            cbor::write_text(out, "rejected");
            cbor::write_head(out, 4, r.len() as u64);
            for x in r {
                out.extend_from_slice(x.as_bytes());
            }
            crate::wire::frame::seal(out, start);
        }
    }

    /// Reads a response map (used by our client and tests).
    pub fn from_value(v: &Value) -> Option<Response> {
        let Value::Map(entries) = v else { return None };
        let get = |name: &str| {
            entries
                .iter()
                .find(|(k, _)| matches!(k, Value::Text(t) if t == name))
                .map(|(_, v)| v)
        };
        let id = match get("id") {
            Some(Value::Null) | None => None,
            Some(v) => Some(as_u64(v)?),
        };
        let status = match get("status") {
            Some(Value::Text(s)) => Status::parse(s)?,
            _ => return None,
        };
        let pairs = match get("pairs") {
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|p| {
                        crate::space::pair_from_value(
                            p,
                            &crate::space::TupleLimits {
                                max_arity: usize::MAX,
                                max_element_bytes: usize::MAX,
                            },
                        )
                    })
                    .collect::<Option<Vec<_>>>()?,
            ),
            Some(_) => return None,
            None => None,
        };
        let rejected = match get("rejected") {
            Some(Value::Array(a)) => Some(a.iter().map(RawItem::from_value).collect()),
            Some(_) => return None,
            None => None,
        };
        let message = match get("message") {
            Some(Value::Text(s)) => Some(s.clone()),
            _ => None,
        };
        let cluster = match get("cluster") {
            None | Some(Value::Null) => None,
            Some(c) => Some(Box::new(c.deserialized::<ClusterStatus>().ok()?)),
        };
        Some(Response {
            id,
            status,
            pairs,
            rejected,
            message,
            cluster,
        })
    }
}

/// Serialises a [`Response`] as the CBOR map of PROTOCOL.md §4.
struct WireResponse<'a>(&'a Response);

/// A tuple in text form, serialised as an array of its elements.
struct TextTuple<'a>(&'a str);

impl serde::Serialize for TextTuple<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let n = self.0.split(',').count();
        let mut seq = s.serialize_seq(Some(n))?;
        for e in self.0.split(',') {
            seq.serialize_element(e)?;
        }
        seq.end()
    }
}

struct WirePairs<'a>(&'a [Pair]);

impl serde::Serialize for WirePairs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for p in self.0 {
            seq.serialize_element(&(TextTuple(&p.key), TextTuple(&p.value)))?;
        }
        seq.end()
    }
}

impl serde::Serialize for WireResponse<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.0;
        // `rejected` is counted here and written by `Response::encode_into` after the map.
        let n = 2
            + usize::from(r.pairs.is_some())
            + usize::from(r.rejected.is_some())
            + usize::from(r.message.is_some())
            + usize::from(r.cluster.is_some());
        let mut m = s.serialize_map(Some(n))?;
        m.serialize_entry("id", &r.id)?;
        m.serialize_entry("status", r.status.as_str())?;
        if let Some(p) = &r.pairs {
            m.serialize_entry("pairs", &WirePairs(p))?;
        }
        if let Some(x) = &r.message {
            m.serialize_entry("message", x)?;
        }
        if let Some(x) = &r.cluster {
            m.serialize_entry("cluster", x)?;
        }
        m.end()
    }
}

/// Size in bytes of a CBOR head for a length/uint `n`.
pub fn cbor_head_len(n: usize) -> usize {
    match n {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Encoded size of a tuple given its text form (an array of text strings).
fn tuple_cbor_len(text: &str) -> usize {
    let mut n = 0;
    let mut total = 0;
    for e in text.split(',') {
        n += 1;
        total += cbor_head_len(e.len()) + e.len();
    }
    cbor_head_len(n) + total
}

/// The size of a `pairs` answer, counted pair by pair while it is built: the larger of its client
/// encoding and its node encoding (a relay reply or a replicated update carries pairs as
/// `{key: text, value: text}` maps). This is the one size rule: an answer under
/// `max_response_bytes` by it reaches the client and fits every node link.
#[derive(Clone, Copy, Debug, Default)]
pub struct AnswerSize {
    pairs: usize,
    client: usize,
    node: usize,
}

/// Room for the envelope of an answer: map head, `id`, `status`, a `message`-less reply.
const ANSWER_ENVELOPE: usize = 64;

impl AnswerSize {
    pub fn add(&mut self, key: &str, value: &str) {
        self.pairs += 1;
        self.client += 1 + tuple_cbor_len(key) + tuple_cbor_len(value);
        // map head, "key", "value", and the two texts with their heads
        self.node += 1
            + 4
            + 6
            + cbor_head_len(key.len())
            + key.len()
            + cbor_head_len(value.len())
            + value.len();
    }

    /// Takes back a pair counted by [`AnswerSize::add`].
    pub fn sub(&mut self, key: &str, value: &str) {
        let mut one = AnswerSize::default();
        one.add(key, value);
        self.pairs -= 1;
        self.client -= one.client;
        self.node -= one.node;
    }

    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// Upper bound of the answer's client encoding.
    pub fn client_bytes(&self) -> usize {
        ANSWER_ENVELOPE + cbor_head_len(self.pairs) + self.client
    }

    /// Upper bound of the answer's node encoding.
    pub fn node_bytes(&self) -> usize {
        ANSWER_ENVELOPE + cbor_head_len(self.pairs) + self.node
    }

    /// What counts against `max_response_bytes`.
    pub fn bytes(&self) -> usize {
        self.client_bytes().max(self.node_bytes())
    }
}

fn answer_size(pairs: &[Pair]) -> AnswerSize {
    let mut s = AnswerSize::default();
    for p in pairs {
        s.add(&p.key, &p.value);
    }
    s
}

/// About the size of a response in the client encoding (the reply budgets need a bound, not the
/// exact size).
pub fn response_len(r: &Response) -> usize {
    r.pairs
        .as_deref()
        .map_or(ANSWER_ENVELOPE, pairs_response_len)
        + r.rejected
            .as_deref()
            .map_or(0, |v| v.iter().map(|i| i.as_bytes().len()).sum())
        + r.message.as_ref().map_or(0, String::len)
        + r.cluster.as_ref().map_or(0, |c| c.encoded_len())
}

/// Upper bound of the encoded size of a `pairs` answer (client encoding).
pub fn pairs_response_len(pairs: &[Pair]) -> usize {
    answer_size(pairs).client_bytes()
}

/// Upper bound of the encoded size of `pairs` on the node links, so that an answer the client
/// check lets through always fits the node links too.
pub fn pairs_node_len(pairs: &[Pair]) -> usize {
    answer_size(pairs).node_bytes()
}

/// A request built by our own client.
pub fn request_value(id: u64, op: &str, args: Option<Value>) -> Value {
    request_value_with(id, op, args, MatchOpts::default())
}

/// PROTOCOL.md §4a options of a GET or DELETE (absent: the request does not carry the key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatchOpts {
    /// At most this many pairs, the first in key order.
    pub limit: Option<u64>,
    /// If nothing matches, wait up to this long for a write that makes something match.
    pub wait_ms: Option<u64>,
}

/// A request map with `limit` / `wait_ms` when set.
pub fn request_value_with(id: u64, op: &str, args: Option<Value>, opts: MatchOpts) -> Value {
    let mut m = vec![
        (Value::Text("id".into()), Value::Integer(id.into())),
        (Value::Text("op".into()), Value::Text(op.into())),
    ];
    if let Some(a) = args {
        m.push((Value::Text("args".into()), a));
    }
    if let Some(n) = opts.limit {
        m.push((Value::Text("limit".into()), Value::Integer(n.into())));
    }
    if let Some(w) = opts.wait_ms {
        m.push((Value::Text("wait_ms".into()), Value::Integer(w.into())));
    }
    Value::Map(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame;

    /// `bodies`, and every one-byte change (each byte xor-ed with a few masks, or set to each of
    /// `values`), cut and extra byte of them.
    fn byte_variants(bodies: &[Vec<u8>], values: &[u8]) -> Vec<Vec<u8>> {
        let mut variants = Vec::new();
        for body in bodies {
            variants.push(body.clone());
            for i in 0..body.len() {
                for x in [0x01u8, 0x02, 0x20, 0x40, 0x80, 0xff] {
                    let mut b = body.clone();
                    b[i] ^= x;
                    variants.push(b);
                }
                for &v in values {
                    let mut b = body.clone();
                    b[i] = v;
                    variants.push(b);
                }
                variants.push(body[..i].to_vec());
            }
            for extra in [0x00u8, 0xff] {
                let mut b = body.clone();
                b.push(extra);
                variants.push(b);
            }
        }
        variants
    }

    /// Whatever `fast_command` accepts of `variants`, the general reader reads as the same id
    /// and command; how many it accepted.
    fn agreeing_fast_reads(variants: &[Vec<u8>], max_pairs: usize) -> usize {
        let mut accepted = 0;
        for b in variants {
            if let Some((id, cmd)) = fast_command(b, max_pairs) {
                accepted += 1;
                let req = parse_request(b).unwrap_or_else(|e| panic!("{b:02x?}: {e:?}"));
                assert_eq!(req.id, id, "{b:02x?}");
                let general =
                    command_of(req, max_pairs).unwrap_or_else(|e| panic!("{b:02x?}: {e:?}"));
                assert_eq!(general, cmd, "{b:02x?}");
            }
        }
        accepted
    }

    /// `fast_command` accepts the usual GET/DELETE shapes, and whatever it accepts (the usual
    /// shapes, and every one-byte change, cut or extra byte of them) the general reader reads
    /// as the same id and command.
    #[test]
    fn the_fast_pattern_reader_agrees_with_the_general_one() {
        let mut usual = Vec::new();
        for (id, op) in [
            (0u64, "GET"),
            (23, "get"),
            (24, "DELETE"),
            (70_000, "Delete"),
            (u64::MAX, "gEt"),
        ] {
            for (k, v) in [
                ("user,c1s2", ".*"),
                ("", ""),
                ("ü,κ", "x{2}"),
                (&"k".repeat(23)[..], &"v".repeat(24)[..]),
                (&"k".repeat(255)[..], &"v".repeat(256)[..]),
            ] {
                let req = Value::Map(vec![
                    ("id".into(), id.into()),
                    ("op".into(), op.into()),
                    ("args".into(), Value::Array(vec![k.into(), v.into()])),
                ]);
                let body = frame::encode(&req)[4..].to_vec();
                let (got_id, cmd) = fast_command(&body, 100).expect("the usual shape");
                assert_eq!(got_id, id);
                let want = match Op::parse(op) {
                    Op::Get => Command::get(k, v),
                    _ => Command::delete(k, v),
                };
                assert_eq!(cmd, want);
                usual.push(body);
            }
        }
        let variants = byte_variants(&usual, &[0x00, 0x18, 0x1b, 0x1f, 0x7f, 0x9f, 0xbf, 0xff]);
        let accepted = agreeing_fast_reads(&variants, 100);
        assert!(accepted > usual.len(), "only {accepted} variants were read");
    }

    /// `fast_command` accepts the usual PUT/POST shapes, and whatever it accepts (those,
    /// and every one-byte change, cut or extra byte of them) the general reader reads as the same
    /// id and command; over `max_pairs` elements it leaves the refusal to the general reader.
    #[test]
    fn the_fast_write_reader_agrees_with_the_general_one() {
        let max_pairs = 3;
        let t = |s: &str| Value::Text(s.into());
        let pair = |k: &[&str], v: &[&str]| {
            Value::Array(vec![
                Value::Array(k.iter().map(|s| t(s)).collect()),
                Value::Array(v.iter().map(|s| t(s)).collect()),
            ])
        };
        let long = "v".repeat(300);
        let mut usual = Vec::new();
        for (id, op) in [
            (0u64, "PUT"),
            (23, "post"),
            (24, "POST"),
            (70_000, "Put"),
            (u64::MAX, "pOsT"),
        ] {
            for elems in [
                vec![],
                vec![pair(&["user", "c1s2"], &["ZZZZZZZZZZZZZZZZ"])],
                vec![
                    pair(&["ü", "κ"], &[""]),
                    pair(&["a"], &[long.as_str(), "b"]),
                ],
                vec![
                    pair(&[], &[]),
                    pair(&["x"; 24], &["y"]),
                    pair(&["k"], &["v"]),
                ],
            ] {
                let req = Value::Map(vec![
                    ("id".into(), id.into()),
                    ("op".into(), op.into()),
                    ("args".into(), Value::Array(elems.clone())),
                ]);
                let body = frame::encode(&req)[4..].to_vec();
                let (got_id, cmd) = fast_command(&body, max_pairs).expect("the usual shape");
                assert_eq!(got_id, id);
                let raw: Vec<RawItem> = elems.iter().map(RawItem::from_value).collect();
                let want = match Op::parse(op) {
                    Op::Put => Command::Put(raw),
                    _ => Command::Post(raw),
                };
                assert_eq!(cmd, want);
                assert_eq!(
                    fast_command(&body, elems.len().max(1) - 1).is_none(),
                    !elems.is_empty()
                );
                usual.push(body);
            }
        }
        let short = usual
            .iter()
            .filter(|b| b.len() < 200)
            .cloned()
            .collect::<Vec<_>>();
        let variants = byte_variants(
            &short,
            &[0x00, 0x18, 0x1b, 0x1f, 0x7f, 0x80, 0x82, 0x9f, 0xbf, 0xff],
        );
        let accepted = agreeing_fast_reads(&variants, max_pairs);
        assert!(accepted > usual.len(), "only {accepted} variants were read");
    }

    #[test]
    fn node_length_bounds_the_node_encoding_of_pairs() {
        use crate::wire::node::{RelayReply, Reply};
        for n in [0usize, 1, 30, 1000] {
            let pairs: Vec<Pair> = (0..n)
                .map(|i| Pair::new(format!("k,{i}"), "x".repeat(i % 300)))
                .collect();
            let r = RelayReply {
                rid: u64::MAX,
                reply: Reply::Pairs {
                    pairs: pairs.clone(),
                    message: None,
                },
            };
            let real = frame::encode(&r).len();
            assert!(
                real <= pairs_node_len(&pairs),
                "{n}: {real} > {}",
                pairs_node_len(&pairs)
            );
        }
    }

    fn req(v: Value) -> Result<Request, Malformed> {
        parse_request(&frame::encode(&v)[4..])
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    /// The hex of docs/PROTOCOL.md §6 with every blank removed.
    fn doc_hex() -> String {
        include_str!("../../docs/PROTOCOL.md")
            .split("```")
            .skip(1)
            .step_by(2)
            .map(|block| block.split_whitespace().collect::<String>())
            .collect::<Vec<_>>()
            .join("|")
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The examples of docs/PROTOCOL.md §6, as (request, expected answer) built by our own
    /// encoders: the reference client's `request_value` and the proxy's `Response::encode_into`.
    fn protocol_doc_examples() -> Vec<(Vec<u8>, Vec<u8>)> {
        let t = |s: &str| Value::Text(s.into());
        let tup = |xs: &[&str]| Value::Array(xs.iter().map(|x| t(x)).collect());
        let put = request_value(
            1,
            "PUT",
            Some(Value::Array(vec![
                Value::Array(vec![tup(&["user", "1"]), tup(&["alice"])]),
                Value::Array(vec![tup(&["user", "2"]), tup(&["bob"])]),
                t("junk"),
            ])),
        );
        let mut put_ok = Response::ok(Some(1));
        put_ok.rejected = Some(vec![RawItem::from_value(&t("junk"))]);
        let get = request_value(2, "GET", Some(Value::Array(vec![t(r"user,\d+"), t("a.*")])));
        let mut get_ok = Response::ok(Some(2));
        get_ok.pairs = Some(vec![Pair::new("user,1", "alice")]);
        let frob = request_value(3, "FROB", Some(Value::Array(vec![])));
        let frob_answer = Response::error(
            Some(3),
            Status::NotImplemented,
            "operator FROB is not implemented",
        );
        let not_map = Value::Integer(1.into());
        let not_map_answer = parse_request(&frame::encode(&not_map)[4..])
            .unwrap_err()
            .response();
        let enc = |r: &Response| {
            let mut out = vec![];
            r.encode_into(&mut out);
            out
        };
        vec![
            (frame::encode(&put), enc(&put_ok)),
            (frame::encode(&get), enc(&get_ok)),
            (frame::encode(&frob), enc(&frob_answer)),
            (frame::encode(&not_map), enc(&not_map_answer)),
        ]
    }

    #[test]
    fn protocol_doc_examples_are_what_the_code_sends() {
        let doc = doc_hex();
        let examples = protocol_doc_examples();
        assert_eq!(examples.len(), 4);
        for (req, answer) in &examples {
            for bytes in [req, answer] {
                let h = hex(bytes);
                assert!(
                    doc.split('|').any(|block| block == h),
                    "docs/PROTOCOL.md §6 has no block with exactly these bytes:\n{h}"
                );
            }
            // The request bytes read back as what they say, and so do the answers.
            let body = &req[4..];
            let _ = parse_request(body);
            let back = Response::from_value(&frame::decode_value(&answer[4..]).unwrap()).unwrap();
            assert!(back.id.is_some() || back.status == Status::Malformed);
        }
        let r = parse_request(&examples[0].0[4..]).unwrap();
        let Command::Put(elems) = command_of(r, 10).unwrap() else {
            panic!("the PUT example must be a PUT")
        };
        assert_eq!(elems.len(), 3);
        let r = parse_request(&examples[1].0[4..]).unwrap();
        assert_eq!(command_of(r, 10).unwrap(), Command::get(r"user,\d+", "a.*"));
        assert_eq!(
            parse_request(&examples[2].0[4..]).unwrap().op,
            Op::Other("FROB".into())
        );
        // The frame of length 0 in the same section.
        assert!(include_str!("../../docs/PROTOCOL.md").contains("`00 00 00 00`"));
    }

    #[test]
    fn parses_protocol_example() {
        let v = request_value(1, "put", Some(Value::Array(vec![text("junk")])));
        let r = req(v).unwrap();
        assert_eq!(r.id, 1);
        assert_eq!(r.op, Op::Put);
        let c = command_of(r, 10).unwrap();
        assert_eq!(c, Command::Put(vec![RawItem::from_value(&text("junk"))]));
        let get = req(request_value(
            2,
            "GET",
            Some(Value::Array(vec![text("a.*"), text(".*")])),
        ));
        assert_eq!(
            command_of(get.unwrap(), 10).unwrap(),
            Command::get("a.*", ".*")
        );
    }

    #[test]
    fn limit_and_wait_ms_are_read_and_checked() {
        let with = |op: &str, extra: Vec<(Value, Value)>| {
            let Value::Map(mut m) =
                request_value(5, op, Some(Value::Array(vec![text("job,.*"), text(".*")])))
            else {
                unreachable!()
            };
            m.extend(extra);
            command_of(req(Value::Map(m)).unwrap(), 10)
        };
        let n = |i: u64| Value::Integer(i.into());
        assert_eq!(
            with("get", vec![]).unwrap(),
            Command::get("job,.*", ".*"),
            "without the keys, a plain GET"
        );
        assert_eq!(
            with(
                "DELETE",
                vec![(text("limit"), n(1)), (text("wait_ms"), n(5000))]
            )
            .unwrap(),
            Command::Delete {
                key: "job,.*".into(),
                value: ".*".into(),
                limit: Some(1),
                wait_ms: Some(5000),
            }
        );
        let c = with("get", vec![(text("wait_ms"), n(0))]).unwrap();
        assert_eq!(c.wait_ms(60_000), 0);
        let c = with("get", vec![(text("wait_ms"), n(u64::MAX))]).unwrap();
        assert_eq!(c.wait_ms(60_000), 60_000, "capped by max_wait_ms");
        for (k, v) in [
            ("limit", text("1")),
            ("limit", n(0)),
            ("limit", Value::Integer((-1).into())),
            ("limit", Value::Null),
            ("wait_ms", text("5s")),
            ("wait_ms", Value::Float(1.5)),
            ("wait_ms", Value::Array(vec![])),
        ] {
            let e = with("get", vec![(text(k), v.clone())]).unwrap_err();
            assert_eq!(e.id, Some(5));
            assert!(e.message.contains(k), "{k}={v:?}: {}", e.message);
            assert!(with("delete", vec![(text(k), v)]).is_err());
        }
        // PUT and POST ignore them, like any unknown key.
        let Value::Map(mut m) = request_value(6, "put", Some(Value::Array(vec![]))) else {
            unreachable!()
        };
        m.push((text("limit"), text("x")));
        assert!(command_of(req(Value::Map(m)).unwrap(), 10).is_ok());
    }

    #[test]
    fn malformed_requests_keep_the_id_when_readable() {
        assert_eq!(req(Value::Integer(3.into())).unwrap_err().id, None);
        let no_op = Value::Map(vec![(text("id"), Value::Integer(7.into()))]);
        assert_eq!(req(no_op).unwrap_err().id, Some(7));
        let neg = Value::Map(vec![
            (text("id"), Value::Integer((-1).into())),
            (text("op"), text("GET")),
        ]);
        assert_eq!(req(neg).unwrap_err().id, None);
        let get_bad = req(request_value(9, "get", Some(text("x")))).unwrap();
        assert_eq!(command_of(get_bad, 10).unwrap_err().id, Some(9));
        let three = req(request_value(
            9,
            "get",
            Some(Value::Array(vec![text("a"), text("b"), text("c")])),
        ))
        .unwrap();
        assert!(
            command_of(three, 10)
                .unwrap_err()
                .message
                .contains("an array of two")
        );
        let ints = req(request_value(
            9,
            "get",
            Some(Value::Array(vec![text("a"), Value::Integer(1.into())])),
        ))
        .unwrap();
        assert!(
            command_of(ints, 10)
                .unwrap_err()
                .message
                .contains("must be two text strings")
        );
        let put_bad = req(request_value(9, "PUT", Some(text("x")))).unwrap();
        assert!(command_of(put_bad, 10).is_err());
        let many = req(request_value(
            9,
            "PUT",
            Some(Value::Array(vec![Value::Null; 11])),
        ))
        .unwrap();
        let e = command_of(many, 10).unwrap_err().message;
        assert!(e.contains("carries 11 elements"), "{e}");
        // Unknown and non-text keys are ignored; the last `id` wins.
        let odd = Value::Map(vec![
            (Value::Integer(1.into()), Value::Array(vec![])),
            (text("id"), Value::Integer(1.into())),
            (text("zz"), Value::Map(vec![])),
            (text("op"), text("status")),
            (text("id"), Value::Integer(2.into())),
        ]);
        let r = req(odd).unwrap();
        assert_eq!((r.id, r.op), (2, Op::Status));
        let e = parse_request(&[0xa1, 0x62, b'i', b'd']).unwrap_err();
        assert!(
            e.message.starts_with("request is not one CBOR item"),
            "{e:?}"
        );
    }

    #[test]
    fn indefinite_lengths_read_like_definite_ones() {
        // {_ "id": 5, "op": "PUT", "args": [_ [[_ "k"], ["v"]], 7]}
        let mut b = vec![
            0xbf, 0x62, b'i', b'd', 0x05, 0x62, b'o', b'p', 0x63, b'P', b'U', b'T',
        ];
        b.extend([0x64, b'a', b'r', b'g', b's', 0x9f]);
        b.extend([0x82, 0x9f, 0x61, b'k', 0xff, 0x81, 0x61, b'v']);
        b.extend([0x07, 0xff, 0xff]);
        let r = parse_request(&b).unwrap();
        let Command::Put(elems) = command_of(r, 10).unwrap() else {
            panic!()
        };
        assert_eq!(elems.len(), 2);
        let limits = TupleLimits::default();
        assert_eq!(pair_from_raw(&elems[0], &limits), Some(Pair::new("k", "v")));
        assert_eq!(pair_from_raw(&elems[1], &limits), None);
        assert_eq!(elems[1], Value::Integer(7.into()));
    }

    #[test]
    fn pair_from_raw_agrees_with_pair_from_value() {
        let limits = TupleLimits {
            max_arity: 3,
            max_element_bytes: 5,
        };
        let tup = |xs: &[&str]| Value::Array(xs.iter().map(|x| text(x)).collect());
        let samples = vec![
            Value::Array(vec![tup(&["a", "1"]), tup(&["b"])]),
            Value::Array(vec![tup(&["a"]), tup(&["b"]), tup(&["c"])]),
            Value::Array(vec![tup(&["a"])]),
            Value::Array(vec![tup(&[]), tup(&["b"])]),
            Value::Array(vec![tup(&["a", "b", "c", "d"]), tup(&["b"])]),
            Value::Array(vec![tup(&["toolong"]), tup(&["b"])]),
            Value::Array(vec![tup(&["a,b"]), tup(&["b"])]),
            Value::Array(vec![tup(&[""]), tup(&["b"])]),
            Value::Array(vec![tup(&["é"]), tup(&["日本"])]),
            Value::Array(vec![
                Value::Array(vec![Value::Tag(1, Box::new(text("a")))]),
                tup(&["b"]),
            ]),
            Value::Array(vec![
                Value::Array(vec![Value::Integer(1.into())]),
                tup(&["b"]),
            ]),
            text("junk"),
            Value::Null,
        ];
        for v in samples {
            assert_eq!(
                pair_from_raw(&RawItem::from_value(&v), &limits),
                crate::space::pair_from_value(&v, &limits),
                "{v:?}"
            );
        }
    }

    #[test]
    fn a_million_items_cost_no_value_tree() {
        // One element nesting a million integers: the frame is read in place and the element
        // kept as its bytes (the value tree would take 32 MB).
        let mut inner = vec![0x9a];
        inner.extend(1_000_000u32.to_be_bytes());
        inner.extend(std::iter::repeat_n(0x01, 1_000_000));
        let mut args = vec![0x81, 0x81];
        args.extend(&inner);
        let mut b = vec![
            0xa3, 0x62, b'i', b'd', 0x01, 0x62, b'o', b'p', 0x63, b'P', b'U', b'T',
        ];
        b.extend([0x64, b'a', b'r', b'g', b's']);
        b.extend(&args);
        let r = parse_request(&b).unwrap();
        let Command::Put(elems) = command_of(r, 10).unwrap() else {
            panic!()
        };
        assert_eq!(elems.len(), 1);
        let cmd = Command::Put(elems.clone());
        assert!(cmd.mem_bytes() < b.len() + 1024, "{}", cmd.mem_bytes());
        assert_eq!(pair_from_raw(&elems[0], &TupleLimits::default()), None);
        // A million elements at the top level are refused from the header alone.
        let mut top = b[..17].to_vec();
        top.push(0x9a);
        top.extend(1_000_000u32.to_be_bytes());
        top.extend(std::iter::repeat_n(0x01, 1_000_000));
        let e = command_of(parse_request(&top).unwrap(), 100_000).unwrap_err();
        assert!(e.message.contains("1000000 elements"), "{e:?}");
    }

    #[test]
    fn ops_are_case_insensitive_and_unknown_kept() {
        assert_eq!(Op::parse("dElEtE"), Op::Delete);
        assert_eq!(Op::parse("FROB"), Op::Other("FROB".into()));
    }

    #[test]
    fn response_round_trips_and_size_bound_holds() {
        let pairs = vec![
            Pair {
                key: "user,1".into(),
                value: "alice".into(),
            },
            Pair {
                key: "é,日本".into(),
                value: "x".repeat(300),
            },
        ];
        let mut r = Response::ok(Some(u64::MAX));
        r.pairs = Some(pairs.clone());
        let bytes = frame::encode(&r.to_value());
        assert!(bytes.len() - 4 <= pairs_response_len(&pairs));
        let back = Response::from_value(&frame::decode_value(&bytes[4..]).unwrap()).unwrap();
        assert_eq!(back, r);
        let mut direct = vec![];
        r.encode_into(&mut direct);
        assert_eq!(
            direct, bytes,
            "direct serialisation must equal the value-tree encoding"
        );
        // `rejected` echoes the elements' bytes as sent.
        let mut r = Response::ok(Some(3));
        r.message = Some("m".into());
        r.rejected = Some(vec![
            RawItem::from_value(&Value::Text("junk".into())),
            RawItem::from_value(&Value::Array(vec![Value::Integer(1.into())])),
        ]);
        let mut direct = vec![];
        r.encode_into(&mut direct);
        assert_eq!(direct, frame::encode(&r.to_value()));
        let back = Response::from_value(&frame::decode_value(&direct[4..]).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_request_is_refused_as_not_cbor_exactly_when_validate_refuses_it_with_its_error() {
        let text = |s: &str| Value::Text(s.into());
        let deep = |levels: usize| {
            let mut v = Value::Array(vec![]);
            for _ in 1..levels {
                v = Value::Array(vec![v]);
            }
            v
        };
        let pair = Value::Array(vec![
            Value::Array(vec![text("user"), text("c0s0")]),
            Value::Array(vec![text("v1")]),
        ]);
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        for v in [
            request_value(7, "POST", Some(Value::Array(vec![pair.clone()]))),
            request_value(7, "GET", Some(Value::Array(vec![text("a"), text(".*")]))),
            // args nested as deep as a body may nest (the map is one level), and one more.
            request_value(7, "PUT", Some(deep(cbor::MAX_DEPTH - 1))),
            request_value(7, "PUT", Some(deep(cbor::MAX_DEPTH))),
            Value::Map(vec![(Value::Integer(1.into()), deep(cbor::MAX_DEPTH))]),
            Value::Map(vec![(text("zz"), deep(cbor::MAX_DEPTH - 1))]),
            Value::Map(vec![(text("limit"), deep(cbor::MAX_DEPTH - 1))]),
            Value::Map(vec![(text("wait_ms"), deep(cbor::MAX_DEPTH))]),
            Value::Array(vec![text("id")]),
        ] {
            let b = frame::encode(&v)[4..].to_vec();
            // Every cut of it, and it with a byte after it.
            for cut in 0..b.len() {
                bodies.push(b[..cut].to_vec());
            }
            let mut more = b.clone();
            more.push(0);
            bodies.push(more);
            bodies.push(b);
        }
        bodies.extend([
            // A key and a value that are not UTF-8.
            vec![0xa1, 0x62, 0xff, 0xfe, 0x01],
            vec![0xa2, 0x62, b'i', b'd', 0x01, 0x62, b'o', b'p', 0x61, 0xff],
            // More entries announced than bytes follow; an indefinite map without its break.
            vec![0xbb, 0, 0, 0, 1, 0, 0, 0, 0, 0x62, b'i', b'd', 0x01],
            vec![0xbf, 0x62, b'i', b'd', 0x01],
            vec![0xbf, 0x62, b'i', b'd', 0x01, 0xff],
            // Not a map, and not well-formed either.
            vec![0x82, 0x01],
            vec![0xff],
        ]);
        for b in &bodies {
            let got = parse_request(b);
            match cbor::validate(b) {
                Err(e) => assert_eq!(
                    got.as_ref().map_err(|m| m.message.clone()).unwrap_err(),
                    format!("request is not one CBOR item: {e}"),
                    "{b:02x?}"
                ),
                Ok(()) => assert!(
                    !got.as_ref()
                        .is_err_and(|m| m.message.starts_with("request is not one CBOR item")),
                    "{b:02x?}: {got:?}"
                ),
            }
        }
    }
}
