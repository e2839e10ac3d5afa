//! A small CBOR reader for untrusted bytes: it walks the structure of a frame without building a
//! value tree, so reading a request costs no allocation per CBOR item.
//!
//! A decoded `ciborium::Value` takes 32 bytes per item however small its encoding (a 1 MB frame
//! of one-byte items becomes 32 MB of values, more while the vectors grow). The proxy therefore
//! checks a client frame with [`validate`] (well-formed, nesting bounded, text valid UTF-8, no
//! trailing bytes), reads the few fields it needs with a [`Reader`], and keeps each PUT/POST
//! element as the bytes the client sent ([`RawItem`]): the decoded form of a request is its
//! bytes plus one small handle per element.

use std::borrow::Cow;

use bytes::Bytes;
use ciborium::Value;
use serde::{Deserialize, Serialize};

use super::frame::CborError;

/// Deepest nesting (arrays, maps, tags) accepted in a client frame.
pub const MAX_DEPTH: usize = super::frame::CLIENT_RECURSION_LIMIT;

/// CBOR tag 24: "encoded CBOR data item" (RFC 8949 §3.4.5.1). A [`RawItem`] travels on node
/// links and in logs as this tag around a byte string holding the item's encoding.
pub const TAG_ENCODED_CBOR: u64 = 24;

/// One CBOR head: major type and argument (`None` = indefinite length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    Uint(u64),
    Nint(u64),
    Bytes(Option<u64>),
    Text(Option<u64>),
    Array(Option<u64>),
    Map(Option<u64>),
    Tag(u64),
    /// false, true, null, undefined (simple values 20..=23).
    Simple(u8),
    Float,
    Break,
}

fn invalid(what: impl Into<String>) -> CborError {
    CborError::Invalid(what.into())
}

/// A cursor over the bytes of one or more CBOR items. Never allocates, never panics; every length
/// is checked against the bytes that are actually there.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Offset of the next unread byte.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn byte(&mut self) -> Result<u8, CborError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| invalid("unexpected end of input"))?;
        self.pos += 1;
        Ok(b)
    }

    /// The next `n` bytes (the content of a string whose head was read).
    pub fn take(&mut self, n: u64) -> Result<&'a [u8], CborError> {
        if n > self.remaining() as u64 {
            return Err(invalid(format!(
                "an item announces {n} bytes but only {} follow",
                self.remaining()
            )));
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn argument(&mut self, ai: u8) -> Result<Option<u64>, CborError> {
        let mut be = |n: usize| -> Result<u64, CborError> {
            let s = self.take(n as u64)?;
            Ok(s.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        };
        Ok(Some(match ai {
            0..=23 => u64::from(ai),
            24 => be(1)?,
            25 => be(2)?,
            26 => be(4)?,
            27 => be(8)?,
            31 => return Ok(None),
            _ => return Err(invalid(format!("reserved additional information {ai}"))),
        }))
    }

    /// Reads the next head.
    pub fn head(&mut self) -> Result<Head, CborError> {
        let ib = self.byte()?;
        let (major, ai) = (ib >> 5, ib & 0x1f);
        let arg = self.argument(ai)?;
        let definite =
            |a: Option<u64>| a.ok_or_else(|| invalid("indefinite length not allowed here"));
        Ok(match major {
            0 => Head::Uint(definite(arg)?),
            1 => Head::Nint(definite(arg)?),
            2 => Head::Bytes(arg),
            3 => Head::Text(arg),
            4 => Head::Array(arg),
            5 => Head::Map(arg),
            6 => Head::Tag(definite(arg)?),
            _ => match ai {
                20..=23 => Head::Simple(ai),
                25..=27 => Head::Float,
                31 => Head::Break,
                _ => return Err(invalid(format!("unsupported simple value (0x{ib:02x})"))),
            },
        })
    }

    /// The next head, without consuming it.
    pub fn peek(&self) -> Result<Head, CborError> {
        self.clone().head()
    }

    /// Skips one complete item, checking it is well-formed: nesting at most `depth` levels, text
    /// valid UTF-8, indefinite strings made of definite chunks of their own type.
    pub fn skip(&mut self, depth: usize) -> Result<(), CborError> {
        let h = self.head()?;
        self.skip_body(h, depth, true)
    }

    /// Skips one item of bytes already checked by [`Reader::skip`] (or [`validate`]): the same
    /// walk without checking text again (lengths are still checked: it never reads past the
    /// end, never panics).
    pub fn skip_checked(&mut self) -> Result<(), CborError> {
        let h = self.head()?;
        self.skip_body(h, MAX_DEPTH, false)
    }

    fn skip_with(&mut self, depth: usize, utf8: bool) -> Result<(), CborError> {
        let h = self.head()?;
        self.skip_body(h, depth, utf8)
    }

    fn skip_body(&mut self, h: Head, depth: usize, utf8: bool) -> Result<(), CborError> {
        let nested = |depth: usize| {
            depth
                .checked_sub(1)
                .ok_or_else(|| invalid("nesting is too deep"))
        };
        match h {
            Head::Uint(_) | Head::Nint(_) | Head::Simple(_) | Head::Float => {}
            Head::Break => return Err(invalid("unexpected break")),
            Head::Bytes(Some(n)) => {
                self.take(n)?;
            }
            Head::Text(Some(n)) => {
                let s = self.take(n)?;
                if utf8 {
                    std::str::from_utf8(s)
                        .map_err(|e| invalid(format!("text is not UTF-8: {e}")))?;
                }
            }
            Head::Bytes(None) | Head::Text(None) => {
                let text = matches!(h, Head::Text(None));
                loop {
                    match (self.head()?, text) {
                        (Head::Break, _) => break,
                        (c @ Head::Text(Some(_)), true) | (c @ Head::Bytes(Some(_)), false) => {
                            self.skip_body(c, depth, utf8)?
                        }
                        _ => return Err(invalid("bad chunk in an indefinite-length string")),
                    }
                }
            }
            Head::Array(n) | Head::Map(n) => {
                let d = nested(depth)?;
                let per = if matches!(h, Head::Map(_)) { 2 } else { 1 };
                match n {
                    Some(n) => {
                        // Every item takes at least one byte: a count beyond the bytes left is
                        // refused before the loop, so a huge header costs nothing.
                        let items = n.saturating_mul(per);
                        if items > self.remaining() as u64 {
                            return Err(invalid(format!(
                                "a container announces {items} items but only {} bytes follow",
                                self.remaining()
                            )));
                        }
                        for _ in 0..items {
                            self.skip_with(d, utf8)?;
                        }
                    }
                    None => loop {
                        if self.peek()? == Head::Break {
                            self.head()?;
                            break;
                        }
                        for _ in 0..per {
                            self.skip_with(d, utf8)?;
                        }
                    },
                }
            }
            Head::Tag(_) => {
                let d = nested(depth)?;
                self.skip_with(d, utf8)?;
            }
        }
        Ok(())
    }

    /// Reads a text item (definite, or indefinite in chunks). `Ok(None)` if the next item is not
    /// text; then nothing is consumed.
    pub fn text(&mut self) -> Result<Option<Cow<'a, str>>, CborError> {
        let at = self.pos;
        match self.head()? {
            Head::Text(Some(n)) => {
                let s = self.take(n)?;
                let s = std::str::from_utf8(s)
                    .map_err(|e| invalid(format!("text is not UTF-8: {e}")))?;
                Ok(Some(Cow::Borrowed(s)))
            }
            Head::Text(None) => {
                let mut out = String::new();
                loop {
                    match self.head()? {
                        Head::Break => break,
                        Head::Text(Some(n)) => {
                            let s = self.take(n)?;
                            out.push_str(
                                std::str::from_utf8(s)
                                    .map_err(|e| invalid(format!("text is not UTF-8: {e}")))?,
                            );
                        }
                        _ => return Err(invalid("bad chunk in an indefinite-length string")),
                    }
                }
                Ok(Some(Cow::Owned(out)))
            }
            _ => {
                self.pos = at;
                Ok(None)
            }
        }
    }

    /// Reads the head of an array: `Ok(Some(n))` (`None` inside = indefinite), or `Ok(None)` if
    /// the next item is not an array (nothing consumed).
    pub fn array(&mut self) -> Result<Option<Option<u64>>, CborError> {
        let at = self.pos;
        match self.head()? {
            Head::Array(n) => Ok(Some(n)),
            _ => {
                self.pos = at;
                Ok(None)
            }
        }
    }

    /// Inside an indefinite-length container: consumes the break and returns true if it is next.
    pub fn at_break(&mut self) -> Result<bool, CborError> {
        let at = self.pos;
        if self.head()? == Head::Break {
            Ok(true)
        } else {
            self.pos = at;
            Ok(false)
        }
    }
}

/// Checks that `body` is exactly one well-formed CBOR item (see [`Reader::skip`]) nested at most
/// [`MAX_DEPTH`] levels, with nothing after it. O(bytes), no allocation.
pub fn validate(body: &[u8]) -> Result<(), CborError> {
    let mut r = Reader::new(body);
    r.skip(MAX_DEPTH)?;
    match r.remaining() {
        0 => Ok(()),
        n => Err(CborError::TrailingBytes(n)),
    }
}

/// Appends a CBOR head of major type `major` with argument `n` (shortest form).
pub fn write_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// Appends a definite-length text item.
pub fn write_text(out: &mut Vec<u8>, s: &str) {
    write_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// One well-formed CBOR item kept as the bytes it was sent in: a PUT/POST element, echoed in
/// `rejected` exactly as sent. Costs its encoding plus one handle, however many items it nests.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RawItem(Bytes);

impl RawItem {
    /// The item `bytes` holds; refused unless it is exactly one well-formed item.
    pub fn parse(bytes: Bytes) -> Result<RawItem, CborError> {
        validate(&bytes)?;
        Ok(RawItem(bytes))
    }

    /// Bytes already checked by [`validate`] (or a [`Reader::skip`] of them).
    pub(crate) fn from_checked(bytes: Bytes) -> RawItem {
        RawItem(bytes)
    }

    /// The encoding of `v`.
    pub fn from_value(v: &Value) -> RawItem {
        let mut out = Vec::new();
        if let Err(e) = ciborium::into_writer(v, &mut out) {
            // Writing a Value into a Vec cannot fail; keep a null rather than panic.
            tracing::error!("internal error: cannot encode a CBOR value: {e}");
            out = vec![0xf6];
        }
        RawItem(Bytes::from(out))
    }

    /// The item decoded into a value tree (for clients and tests: this is the allocation the
    /// service avoids). `None` if ciborium refuses it.
    pub fn to_value(&self) -> Option<Value> {
        super::frame::decode_value(&self.0).ok()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Memory this item holds: its bytes and its handle.
    pub fn mem_bytes(&self) -> usize {
        self.0.len() + std::mem::size_of::<RawItem>()
    }
}

impl std::fmt::Debug for RawItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.to_value() {
            Some(v) if self.0.len() <= 4096 => write!(f, "{v:?}"),
            _ => write!(f, "RawItem({} bytes)", self.0.len()),
        }
    }
}

impl PartialEq<Value> for RawItem {
    fn eq(&self, other: &Value) -> bool {
        self.to_value().as_ref() == Some(other)
    }
}

/// Serialises as a CBOR byte string.
struct ByteStr<'a>(&'a [u8]);

impl Serialize for ByteStr<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl Serialize for RawItem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ciborium::tag::Required::<_, TAG_ENCODED_CBOR>(ByteStr(&self.0)).serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawItem {
    /// Tag 24 around a byte string holding one well-formed item; any other value is taken as the
    /// item itself (records written before elements were kept raw held plain values).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Tag(TAG_ENCODED_CBOR, inner) => match *inner {
                Value::Bytes(b) => RawItem::parse(Bytes::from(b))
                    .map_err(|e| serde::de::Error::custom(format!("bad encoded item: {e}"))),
                other => Ok(RawItem::from_value(&Value::Tag(
                    TAG_ENCODED_CBOR,
                    Box::new(other),
                ))),
            },
            v => Ok(RawItem::from_value(&v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On checked bytes, `skip_checked` ends where `skip` ends; it reads no further than the
    /// bytes there are.
    #[test]
    fn skip_checked_ends_where_skip_ends() {
        let items = [
            Value::Array(vec![
                Value::Array(vec!["user".into(), "c0s0".into()]),
                Value::Array(vec!["x".repeat(300).into()]),
            ]),
            Value::Map(vec![(Value::Text("k".into()), Value::Bytes(vec![1; 70]))]),
            Value::Tag(24, Box::new(Value::Integer(7.into()))),
            Value::Text("é".repeat(40)),
        ];
        for v in &items {
            let mut b = Vec::new();
            ciborium::into_writer(v, &mut b).unwrap();
            b.extend_from_slice(&[0x01, 0x02]);
            let (mut a, mut c) = (Reader::new(&b), Reader::new(&b));
            a.skip(MAX_DEPTH).unwrap();
            c.skip_checked().unwrap();
            assert_eq!(a.pos(), c.pos(), "{v:?}");
            // Cut short: an error, not a panic.
            assert!(Reader::new(&b[..a.pos() - 1]).skip_checked().is_err());
        }
    }

    fn enc(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn validate_agrees_with_ciborium_on_samples() {
        let t = |s: &str| Value::Text(s.into());
        let samples = vec![
            Value::Null,
            Value::Bool(true),
            Value::Integer(u64::MAX.into()),
            Value::Integer((-5).into()),
            Value::Float(1.5),
            Value::Bytes(vec![1, 2, 3]),
            t("héllo"),
            Value::Array(vec![t("a"), Value::Array(vec![])]),
            Value::Map(vec![(t("k"), Value::Tag(7, Box::new(t("v"))))]),
        ];
        for v in samples {
            let b = enc(&v);
            validate(&b).unwrap_or_else(|e| panic!("{v:?}: {e}"));
            assert_eq!(RawItem::parse(Bytes::from(b)).unwrap(), v);
        }
        // Indefinite containers and chunked strings.
        let b = [0x9f, 0x7f, 0x61, b'a', 0x61, b'b', 0xff, 0x01, 0xff];
        validate(&b).unwrap();
        let mut r = Reader::new(&b);
        assert_eq!(r.array().unwrap(), Some(None));
        assert_eq!(r.text().unwrap().as_deref(), Some("ab"));
    }

    #[test]
    fn validate_refuses_bad_input_without_allocating() {
        for bad in [
            &[][..],
            &[0xff],                                                 // break alone
            &[0x61],                                                 // text missing its byte
            &[0x62, 0xc3, 0x28],                                     // bad UTF-8
            &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // 2^64 items announced
            &[0x5f, 0x61, b'a', 0xff],                               // text chunk in a byte string
            &[0x1c],                                                 // reserved
            &[0xf0],                                                 // unassigned simple value
        ] {
            assert!(validate(bad).is_err(), "{bad:x?}");
        }
        assert_eq!(validate(&[0x01, 0x02]), Err(CborError::TrailingBytes(1)));
        let deep = vec![0x81u8; MAX_DEPTH + 1];
        let mut deep = deep;
        deep.push(0x01);
        assert!(validate(&deep).is_err());
        let ok = [vec![0x81u8; MAX_DEPTH], vec![0x01]].concat();
        validate(&ok).unwrap();
        // The same depth limit as ciborium's decoder of client frames had.
        for n in MAX_DEPTH - 2..MAX_DEPTH + 3 {
            for inner in [0x01u8, 0x80] {
                let b = [vec![0x81u8; n], vec![inner]].concat();
                assert_eq!(
                    validate(&b).is_ok(),
                    super::super::frame::decode_value(&b).is_ok(),
                    "{n} levels, then {inner:#x}"
                );
            }
        }
    }

    #[test]
    fn raw_items_travel_as_tag_24_and_read_old_plain_values() {
        let v = Value::Array(vec![Value::Text("x".into()), Value::Integer(3.into())]);
        let raw = RawItem::from_value(&v);
        let wire = super::super::frame::encode(&raw);
        assert_eq!(wire[4], 0xd8, "tag 24 head");
        assert_eq!(wire[5], 24);
        let back: RawItem = super::super::frame::decode(&wire[4..]).unwrap();
        assert_eq!(back, raw);
        // A plain value (the old record format) is taken as the item itself.
        let old = super::super::frame::encode(&v);
        let back: RawItem = super::super::frame::decode(&old[4..]).unwrap();
        assert_eq!(back, raw);
        // A tag 24 whose bytes are not one item is refused.
        let bad = Value::Tag(24, Box::new(Value::Bytes(vec![0x61])));
        let wire = super::super::frame::encode(&bad);
        assert!(super::super::frame::decode::<RawItem>(&wire[4..]).is_err());
    }

    #[test]
    fn heads_are_shortest_form() {
        for n in [0u64, 23, 24, 255, 256, 65535, 65536, u32::MAX as u64 + 1] {
            let mut out = vec![];
            write_head(&mut out, 4, n);
            let mut r = Reader::new(&out);
            assert_eq!(r.head().unwrap(), Head::Array(Some(n)));
            assert_eq!(r.remaining(), 0);
            assert_eq!(out.len(), crate::wire::client::cbor_head_len(n as usize));
        }
    }
}
