//! Requests as values, built without a connection and encoded to the frames of
//! docs/PROTOCOL.md (§2 frames, §3 requests); answers decoded from their bytes (§4).

use ciborium::Value;

use super::ClientError;
use crate::wire::client::{Response, request_value};
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
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    op: String,
    args: Option<Value>,
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

    /// The request as the CBOR map `{"id": id, "op": ..., "args": ...}`.
    pub fn to_value(&self, id: u64) -> Value {
        request_value(id, &self.op, self.args.clone())
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
}
