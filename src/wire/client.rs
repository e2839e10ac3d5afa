//! The client protocol of PROTOCOL.md: requests, responses, statuses, close codes.
//!
//! Parsing never panics and never trusts a length: anything odd becomes a `malformed` answer.

use ciborium::Value;
use serde::{Deserialize, Serialize};

use crate::space::Pair;

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

/// QUIC application close codes (PROTOCOL.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    NoError = 0,
    ServiceRefused = 1,
    Forbidden = 2,
    FrameTooLarge = 3,
    ShuttingDown = 4,
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
        match s.to_ascii_uppercase().as_str() {
            "GET" => Op::Get,
            "PUT" => Op::Put,
            "POST" => Op::Post,
            "DELETE" => Op::Delete,
            "SHUTDOWN" => Op::Shutdown,
            "STATUS" => Op::Status,
            _ => Op::Other(s.to_owned()),
        }
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
    Get { key: String, value: String },
    Put(Vec<Value>),
    Post(Vec<Value>),
    Delete { key: String, value: String },
}

impl Command {
    pub fn is_write(&self) -> bool {
        !matches!(self, Command::Get { .. })
    }
    pub fn name(&self) -> &'static str {
        match self {
            Command::Get { .. } => "GET",
            Command::Put(_) => "PUT",
            Command::Post(_) => "POST",
            Command::Delete { .. } => "DELETE",
        }
    }
}

/// A request as read from a frame: `id` and `op` present and typed, `args` not yet checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
    pub args: Option<Value>,
}

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

/// Reads a request from a decoded CBOR item (PROTOCOL.md §3).
pub fn parse_request(v: Value) -> Result<Request, Malformed> {
    let Value::Map(entries) = v else {
        return Err(Malformed {
            id: None,
            message: "request must be a CBOR map with keys id, op, args".into(),
        });
    };
    let mut id_v = None;
    let mut op_v = None;
    let mut args = None;
    for (k, val) in entries {
        match k {
            Value::Text(k) if k == "id" => id_v = Some(val),
            Value::Text(k) if k == "op" => op_v = Some(val),
            Value::Text(k) if k == "args" => args = Some(val),
            _ => {} // unknown keys are ignored (forward compatibility)
        }
    }
    let id = match id_v {
        None => {
            return Err(Malformed {
                id: None,
                message: "request has no `id`".into(),
            });
        }
        Some(v) => match as_u64(&v) {
            Some(id) => id,
            None => {
                return Err(Malformed {
                    id: None,
                    message: "`id` must be an unsigned integer below 2^64".into(),
                });
            }
        },
    };
    let op = match op_v {
        Some(Value::Text(op)) => Op::parse(&op),
        Some(_) => {
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
    Ok(Request { id, op, args })
}

/// Checks the argument shape of a data operation.
pub fn command_of(req: Request, max_pairs: usize) -> Result<Command, Malformed> {
    let id = Some(req.id);
    let patterns = |args: Option<Value>, name: &str| -> Result<(String, String), Malformed> {
        match args {
            Some(Value::Array(mut a)) if a.len() == 2 => {
                let v = a.pop();
                let k = a.pop();
                match (k, v) {
                    (Some(Value::Text(k)), Some(Value::Text(v))) => Ok((k, v)),
                    _ => Err(Malformed {
                        id,
                        message: format!("{name} args must be two text strings [keyexp, valexp]"),
                    }),
                }
            }
            _ => Err(Malformed {
                id,
                message: format!(
                    "{name} args must be an array of two text strings [keyexp, valexp]"
                ),
            }),
        }
    };
    let list = |args: Option<Value>, name: &str| -> Result<Vec<Value>, Malformed> {
        match args {
            Some(Value::Array(a)) if a.len() <= max_pairs => Ok(a),
            Some(Value::Array(a)) => Err(Malformed {
                id,
                message: format!(
                    "{name} carries {} elements, more than the limit of {max_pairs}; split the request",
                    a.len()
                ),
            }),
            Some(_) => Err(Malformed {
                id,
                message: format!("{name} args must be an array of pairs, not a single value"),
            }),
            None => Err(Malformed {
                id,
                message: format!("{name} needs `args`: an array of pairs"),
            }),
        }
    };
    match req.op {
        Op::Get => patterns(req.args, "GET").map(|(key, value)| Command::Get { key, value }),
        Op::Delete => {
            patterns(req.args, "DELETE").map(|(key, value)| Command::Delete { key, value })
        }
        Op::Put => list(req.args, "PUT").map(Command::Put),
        Op::Post => list(req.args, "POST").map(Command::Post),
        Op::Shutdown | Op::Status | Op::Other(_) => Err(Malformed {
            id,
            message: "not a data operation".into(),
        }),
    }
}

/// A response (PROTOCOL.md §4). Fields that do not apply are `None` and absent on the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub id: Option<u64>,
    pub status: Status,
    pub pairs: Option<Vec<Pair>>,
    pub rejected: Option<Vec<Value>>,
    pub message: Option<String>,
    pub cluster: Option<Value>,
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
        if let Some(r) = &self.rejected {
            m.push((t("rejected"), Value::Array(r.clone())));
        }
        if let Some(msg) = &self.message {
            m.push((t("message"), t(msg)));
        }
        if let Some(c) = &self.cluster {
            m.push((t("cluster"), c.clone()));
        }
        Value::Map(m)
    }

    /// Appends this response as one frame, serialising straight from the fields (no CBOR value
    /// tree is built: this is the hot path of every answer).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        crate::wire::frame::encode_into(&WireResponse(self), out);
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
            Some(Value::Array(a)) => Some(a.clone()),
            Some(_) => return None,
            None => None,
        };
        let message = match get("message") {
            Some(Value::Text(s)) => Some(s.clone()),
            _ => None,
        };
        Ok::<_, ()>(Response {
            id,
            status,
            pairs,
            rejected,
            message,
            cluster: get("cluster").cloned(),
        })
        .ok()
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
        if let Some(x) = &r.rejected {
            m.serialize_entry("rejected", x)?;
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

/// Upper bound of the encoded size of a `pairs` answer, computed before anything is changed so
/// that a too-large DELETE can be refused without touching the space.
pub fn pairs_response_len(pairs: &[Pair]) -> usize {
    // 64 bytes covers the map head, `id`, `status`, `message`-less envelope.
    64 + cbor_head_len(pairs.len())
        + pairs
            .iter()
            .map(|p| 1 + tuple_cbor_len(&p.key) + tuple_cbor_len(&p.value))
            .sum::<usize>()
}

/// Upper bound of the encoded size of `pairs` on the node links (a relay reply or a replicated
/// update carries them as `{key: text, value: text}` maps), so that an answer the client check
/// lets through always fits the node links too.
pub fn pairs_node_len(pairs: &[Pair]) -> usize {
    64 + cbor_head_len(pairs.len())
        + pairs
            .iter()
            .map(|p| {
                // map head, "key", "value", and the two texts with their heads
                1 + 4
                    + 6
                    + cbor_head_len(p.key.len())
                    + p.key.len()
                    + cbor_head_len(p.value.len())
                    + p.value.len()
            })
            .sum::<usize>()
}

/// A request built by our own client.
pub fn request_value(id: u64, op: &str, args: Option<Value>) -> Value {
    let mut m = vec![
        (Value::Text("id".into()), Value::Integer(id.into())),
        (Value::Text("op".into()), Value::Text(op.into())),
    ];
    if let Some(a) = args {
        m.push((Value::Text("args".into()), a));
    }
    Value::Map(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame;

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
        parse_request(v)
    }

    #[test]
    fn parses_protocol_example() {
        let v = request_value(
            1,
            "put",
            Some(Value::Array(vec![Value::Text("junk".into())])),
        );
        let r = req(v).unwrap();
        assert_eq!(r.id, 1);
        assert_eq!(r.op, Op::Put);
        let c = command_of(r, 10).unwrap();
        assert_eq!(c, Command::Put(vec![Value::Text("junk".into())]));
    }

    #[test]
    fn malformed_requests_keep_the_id_when_readable() {
        assert_eq!(req(Value::Integer(3.into())).unwrap_err().id, None);
        let no_op = Value::Map(vec![(Value::Text("id".into()), Value::Integer(7.into()))]);
        assert_eq!(req(no_op).unwrap_err().id, Some(7));
        let neg = Value::Map(vec![
            (Value::Text("id".into()), Value::Integer((-1).into())),
            (Value::Text("op".into()), Value::Text("GET".into())),
        ]);
        assert_eq!(req(neg).unwrap_err().id, None);
        let get_bad = req(request_value(9, "get", Some(Value::Text("x".into())))).unwrap();
        assert_eq!(command_of(get_bad, 10).unwrap_err().id, Some(9));
        let put_bad = req(request_value(9, "PUT", Some(Value::Text("x".into())))).unwrap();
        assert!(command_of(put_bad, 10).is_err());
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
    }
}
