//! Length-prefixed CBOR frames: a 4-byte big-endian length N, then N bytes holding one CBOR item.
//!
//! The decoder is sans-IO (push bytes, pop frames) and never buffers more than one frame plus one
//! read chunk, so a peer cannot make it allocate beyond the configured limit.

use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;

/// Why a frame could not be read. Both are protocol violations that close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length 0 is not allowed")]
    Empty,
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended in the middle of a frame")]
    Truncated,
}

/// Why a frame's body is not one CBOR item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CborError {
    #[error("not valid CBOR: {0}")]
    Invalid(String),
    #[error("{0} bytes left over after the CBOR item")]
    TrailingBytes(usize),
}

/// Incremental frame decoder.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::with_capacity(16 * 1024),
            max: max_frame_bytes,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame body, `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            // Reserve once so a large frame does not reallocate chunk by chunk.
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(4);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Call at end of stream: an incomplete frame left over is an error.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

/// Starts a frame at the end of `out`: room for its length prefix, written by [`seal`] once
/// the body follows. Returns where the frame starts.
pub fn open(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    start
}

/// Writes the length prefix of the frame [`open`]ed at `start`: everything after it is its body.
pub fn seal(out: &mut [u8], start: usize) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends one frame holding `item` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(item: &T, out: &mut Vec<u8>) {
    let start = open(out);
    // Writing CBOR into a Vec cannot fail for our own (serde-derived, string-keyed) types.
    if let Err(e) = ciborium::into_writer(item, &mut *out) {
        tracing::error!("internal error: cannot encode a CBOR frame: {e}");
        out.truncate(start);
        return;
    }
    seal(out, start);
}

/// One frame holding `item`.
pub fn encode<T: Serialize + ?Sized>(item: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(item, &mut out);
    out
}

/// Deepest nesting accepted in a client frame. Lower than ciborium's default (256) so that a
/// request the proxy accepts still decodes at the servers after being wrapped in a relay message.
pub const CLIENT_RECURSION_LIMIT: usize = 128;

/// Decodes a client frame body that must hold exactly one CBOR item.
pub fn decode_value(body: &[u8]) -> Result<ciborium::Value, CborError> {
    let mut rest = body;
    let v: ciborium::Value =
        ciborium::de::from_reader_with_recursion_limit(&mut rest, CLIENT_RECURSION_LIMIT)
            .map_err(|e| CborError::Invalid(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CborError::TrailingBytes(rest.len()));
    }
    Ok(v)
}

/// Decodes a frame body into `T`; bytes after the item are an error.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, CborError> {
    let mut rest = body;
    let v: T = ciborium::from_reader(&mut rest).map_err(|e| CborError::Invalid(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CborError::TrailingBytes(rest.len()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_reassemble() {
        let mut bytes = encode(&"hello");
        bytes.extend(encode(&42u32));
        for cut in 0..bytes.len() {
            let mut d = FrameDecoder::new(100);
            d.push(&bytes[..cut]);
            let mut got = vec![];
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.push(&bytes[cut..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 2);
            assert_eq!(decode::<String>(&got[0]).unwrap(), "hello");
            assert_eq!(decode::<u32>(&got[1]).unwrap(), 42);
            d.finish().unwrap();
        }
    }

    #[test]
    fn zero_and_oversized_lengths_are_errors() {
        let mut d = FrameDecoder::new(10);
        d.push(&[0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::Empty));
        let mut d = FrameDecoder::new(10);
        d.push(&[0, 0, 0, 11]);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        let mut d = FrameDecoder::new(10);
        d.push(&[0, 0]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated));
    }

    #[test]
    fn trailing_bytes_and_garbage_are_cbor_errors() {
        let mut body = encode(&1u8)[4..].to_vec();
        body.push(0);
        assert_eq!(decode_value(&body), Err(CborError::TrailingBytes(1)));
        assert!(matches!(
            decode_value(&[0xff, 0xff]),
            Err(CborError::Invalid(_))
        ));
        // A huge declared array length in a tiny body must not allocate it.
        assert!(decode_value(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
