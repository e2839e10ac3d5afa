//! Requests as values, built without a connection and encoded to the frames of
//! docs/PROTOCOL.md (§2 frames, §3 requests); answers decoded from their bytes (§4).

use std::time::Duration;

use ciborium::Value;

use super::ClientError;
use crate::wire::client::{MatchOpts, Response, request_value_with};
use crate::wire::frame;

/// One request of PROTOCOL.md §3: an operator and its argument, without an `id` (the
/// [`Client`](super::Client) numbers its requests; [`Request::encode`] takes one).
///
/// Tuples are written in text form, their elements joined by commas: `"user,1"` is the tuple
/// `["user", "1"]`. Patterns are regular expressions that must match a whole text form.
///
/// ```
/// use tuplespace::client::Request;
///
/// // Request 2 of PROTOCOL.md §6, byte for byte: 4-byte length, then the CBOR map.
/// let frame = Request::get(r"user,\d+", "a.*").encode(2);
/// assert_eq!(&frame[..4], &[0, 0, 0, 0x1f]);
/// assert_eq!(frame.len(), 4 + 0x1f);
/// assert_eq!(&frame[4..9], &[0xa3, 0x62, b'i', b'd', 0x02]); // {"id": 2, ...
///
/// let put = Request::put([("user,1", "alice"), ("user,2", "bob")]);
/// assert_eq!(put.op_name(), "PUT");
///
/// // PROTOCOL.md §4a: a take waits up to 5 s for a job; a GET returns the first 10 matches.
/// let take = Request::take(r"job,\d+", ".*").wait(std::time::Duration::from_secs(5));
/// assert_eq!((take.op_name(), take.limit_count()), ("DELETE", Some(1)));
/// let page = Request::get(r"user,\d+", ".*").limit(10);
/// assert_eq!(page.limit_count(), Some(10));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    op: String,
    args: Option<Value>,
    /// PROTOCOL.md §4a `limit` and `wait_ms` (sent only when set).
    opts: MatchOpts,
}

impl Request {
    /// `GET [keyexp, valexp]`: every pair whose key and value match (Linda `rd`, all of them).
    pub fn get(key_pattern: &str, value_pattern: &str) -> Request {
        Request::op("GET", Some(patterns(key_pattern, value_pattern)))
    }

    /// `DELETE [keyexp, valexp]`: removes and returns every matching pair.
    pub fn delete(key_pattern: &str, value_pattern: &str) -> Request {
        Request::op("DELETE", Some(patterns(key_pattern, value_pattern)))
    }

    /// A take (Linda `in`, PROTOCOL.md §4a): `DELETE` with `limit` 1, which removes and returns
    /// the first matching pair in key order. With [`Request::wait`] it waits for one when there
    /// is none; a pair goes to one take only. An answer `ok` without pairs removed nothing.
    pub fn take(key_pattern: &str, value_pattern: &str) -> Request {
        Request::delete(key_pattern, value_pattern).limit(1)
    }

    /// At most `n` pairs, the first in key order (PROTOCOL.md §4a `limit`; GET and DELETE: a
    /// DELETE removes only those). The service refuses 0 as `malformed`.
    pub fn limit(mut self, n: u64) -> Request {
        self.opts.limit = Some(n);
        self
    }

    /// If nothing matches, wait up to `d` for a PUT or POST that makes something match, then
    /// answer at once (PROTOCOL.md §4a `wait_ms`, in whole milliseconds; GET and DELETE). The
    /// service caps the wait at its `max_wait_ms`; when it runs out the answer is `ok` with no
    /// pairs and a message, and nothing changed. Waiters are served in the order they came.
    pub fn wait(mut self, d: Duration) -> Request {
        self.opts.wait_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// The `limit` set by [`Request::limit`] (or [`Request::take`]).
    pub fn limit_count(&self) -> Option<u64> {
        self.opts.limit
    }

    /// The wait set by [`Request::wait`].
    pub fn wait_time(&self) -> Option<Duration> {
        self.opts.wait_ms.map(Duration::from_millis)
    }

    /// `PUT`: inserts each `(key, value)` whose key is absent; the others come back in
    /// `rejected`. Keys and values in text form (`"user,1"`).
    pub fn put<K: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>) -> Request {
        Request::op("PUT", Some(pair_array(pairs)))
    }

    /// `POST`: replaces the value of each present key; the others come back in `rejected`.
    pub fn post<K: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>) -> Request {
        Request::op("POST", Some(pair_array(pairs)))
    }

    /// `STATUS` (on the admin SAP, with an admin certificate): the cluster's state.
    pub fn status() -> Request {
        Request::op("STATUS", None)
    }

    /// `SHUTDOWN` (on the admin SAP, with an admin certificate): stops the service, saving it.
    pub fn shutdown() -> Request {
        Request::op("SHUTDOWN", None)
    }

    /// Any operator with any argument, sent as given (the service answers `not-implemented` to
    /// one it does not know, `malformed` to a bad argument).
    pub fn op(name: &str, args: Option<Value>) -> Request {
        Request {
            op: name.to_owned(),
            args,
            opts: MatchOpts::default(),
        }
    }

    /// The operator, as it goes on the wire.
    pub fn op_name(&self) -> &str {
        &self.op
    }

    /// The argument (`None`: no `args` key).
    pub fn args(&self) -> Option<&Value> {
        self.args.as_ref()
    }

    /// The request as the CBOR map `{"id": id, "op": ..., "args": ...}` (with `limit` and
    /// `wait_ms` when set).
    pub fn to_value(&self, id: u64) -> Value {
        request_value_with(id, &self.op, self.args.clone(), self.opts)
    }

    /// One whole frame: the 4-byte big-endian length, then the CBOR map.
    pub fn encode(&self, id: u64) -> Vec<u8> {
        frame::encode(&self.to_value(id))
    }
}

/// Decodes the body of a response frame (the bytes after its 4-byte length) into a
/// [`Response`]; what is not a response of PROTOCOL.md §4 is [`ClientError::BadResponse`].
///
/// ```
/// use tuplespace::client::{Status, decode_response};
/// use tuplespace::space::Pair;
///
/// // Answer 2 of PROTOCOL.md §6 without its length: {"id": 2, "status": "ok",
/// // "pairs": [[["user","1"],["alice"]]]}
/// let body = [
///     0xa3, 0x62, 0x69, 0x64, 0x02, 0x66, 0x73, 0x74, 0x61, 0x74, 0x75, 0x73, 0x62, 0x6f,
///     0x6b, 0x65, 0x70, 0x61, 0x69, 0x72, 0x73, 0x81, 0x82, 0x82, 0x64, 0x75, 0x73, 0x65,
///     0x72, 0x61, 0x31, 0x81, 0x65, 0x61, 0x6c, 0x69, 0x63, 0x65,
/// ];
/// let r = decode_response(&body)?;
/// assert_eq!(r.id, Some(2));
/// assert_eq!(r.status, Status::Ok);
/// assert_eq!(r.pairs, Some(vec![Pair::new("user,1", "alice")]));
///
/// // Bytes that are not a response are an error, not a panic.
/// assert!(decode_response(&[0x01]).is_err());
/// # Ok::<(), tuplespace::client::ClientError>(())
/// ```
pub fn decode_response(body: &[u8]) -> Result<Response, ClientError> {
    let v = frame::decode_value(body).map_err(|e| ClientError::BadResponse(e.to_string()))?;
    Response::from_value(&v).ok_or_else(|| ClientError::BadResponse(format!("{v:?}")))
}

/// `[keyexp, valexp]`.
fn patterns(key: &str, value: &str) -> Value {
    Value::Array(vec![Value::Text(key.into()), Value::Text(value.into())])
}

/// A tuple in text form as the array of its elements.
fn tuple(text: &str) -> Value {
    Value::Array(text.split(',').map(|e| Value::Text(e.into())).collect())
}

fn pair_array<K: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>) -> Value {
    Value::Array(
        pairs
            .into_iter()
            .map(|(k, v)| Value::Array(vec![tuple(k.as_ref()), tuple(v.as_ref())]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request 1 of PROTOCOL.md §6 without its "junk" element, and Request 2, byte for byte.
    #[test]
    fn encodings_match_the_protocol_example() {
        let get = Request::get(r"user,\d+", "a.*").encode(2);
        let want =
            hex::decode("0000001fa362696402626f706347455464617267738268757365722c5c642b63612e2a")
                .unwrap();
        assert_eq!(get, want);
        let put = Request::put([("user,1", "alice"), ("user,2", "bob")]).to_value(1);
        let want = crate::wire::client::request_value(
            1,
            "PUT",
            Some(Value::Array(vec![
                Value::Array(vec![tuple("user,1"), tuple("alice")]),
                Value::Array(vec![tuple("user,2"), tuple("bob")]),
            ])),
        );
        assert_eq!(put, want);
        assert_eq!(Request::status().args(), None);
    }

    /// `limit` and `wait_ms` go on the wire only when set, as unsigned integers.
    #[test]
    fn limit_and_wait_are_encoded() {
        let keys = |r: &Request| match r.to_value(7) {
            Value::Map(m) => m
                .into_iter()
                .map(|(k, v)| (k.into_text().unwrap(), v))
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let plain = keys(&Request::get("a", "b"));
        assert_eq!(
            plain.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["id", "op", "args"]
        );
        let take = keys(&Request::take("job,.*", ".*").wait(Duration::from_millis(2500)));
        assert_eq!(take[1].1, Value::Text("DELETE".into()));
        assert_eq!(take[3], ("limit".into(), Value::Integer(1.into())));
        assert_eq!(take[4], ("wait_ms".into(), Value::Integer(2500.into())));
        let r = Request::get("a", "b").limit(3).wait(Duration::from_secs(1));
        assert_eq!(r.limit_count(), Some(3));
        assert_eq!(r.wait_time(), Some(Duration::from_secs(1)));
        let parsed = crate::wire::client::parse_request(&r.encode(9)[4..]).unwrap();
        let cmd = crate::wire::client::command_of(parsed, 10).unwrap();
        assert_eq!(
            cmd,
            crate::wire::client::Command::Get {
                key: "a".into(),
                value: "b".into(),
                limit: Some(3),
                wait_ms: Some(1000),
            }
        );
    }
}
