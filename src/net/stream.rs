//! Framed reading and batched writing on long-lived QUIC streams.

use bytes::Bytes;
use serde::Serialize;

use crate::wire::frame::{self, CborError, FrameDecoder, FrameError};

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
}

/// A receive stream cut into frames.
pub struct FramedRecv {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl FramedRecv {
    pub fn new(recv: quinn::RecvStream, max_frame: usize) -> Self {
        FramedRecv {
            recv,
            dec: FrameDecoder::new(max_frame),
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Bytes>, RecvError> {
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(Some(f));
            }
            match self.recv.read_chunk(256 * 1024, true).await? {
                Some(chunk) => self.dec.push(&chunk.bytes),
                None => {
                    self.dec.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// Waits for one frame, then takes every frame already buffered, decoded: one batch to act
    /// on at once (many frames arrive per packet). `Ok(None)` at a clean end of stream. A frame
    /// error met while draining ends the batch and is returned by the next call.
    pub async fn next_batch<T: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Result<Option<Vec<Result<T, CborError>>>, RecvError> {
        self.next_batch_by(|b| frame::decode(b)).await
    }

    /// [`Self::next_batch`] with the frame bodies read by `read`.
    pub async fn next_batch_by<T>(
        &mut self,
        read: impl Fn(&[u8]) -> Result<T, CborError>,
    ) -> Result<Option<Vec<Result<T, CborError>>>, RecvError> {
        let Some(first) = self.next().await? else {
            return Ok(None);
        };
        let mut batch = vec![read(&first)];
        while let Ok(Some(b)) = self.try_next() {
            batch.push(read(&b));
        }
        Ok(Some(batch))
    }

    /// A frame already buffered, without waiting: lets a reader drain a batch before acting.
    pub fn try_next(&mut self) -> Result<Option<Bytes>, RecvError> {
        Ok(self.dec.next_frame()?)
    }
}

/// Most bytes gathered into one write by [`FramedSend::pump`].
pub const BATCH_BYTES: usize = 256 * 1024;

/// Accumulates frames and writes them in one call, so many frames share a packet.
pub struct FramedSend {
    send: quinn::SendStream,
    buf: Vec<u8>,
}

impl FramedSend {
    pub fn new(send: quinn::SendStream) -> Self {
        FramedSend {
            send,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    pub fn queue<T: Serialize + ?Sized>(&mut self, item: &T) {
        frame::encode_into(item, &mut self.buf);
    }

    /// Queues a client response (serialised without an intermediate value tree).
    pub fn queue_response(&mut self, r: &crate::wire::client::Response) {
        r.encode_into(&mut self.buf);
    }

    /// Queues frames already encoded (length prefix included) by `write`.
    pub fn queue_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.buf);
    }

    pub fn queued(&self) -> usize {
        self.buf.len()
    }

    pub async fn flush(&mut self) -> Result<(), quinn::WriteError> {
        if !self.buf.is_empty() {
            self.send.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    pub async fn send<T: Serialize + ?Sized>(&mut self, item: &T) -> Result<(), quinn::WriteError> {
        self.queue(item);
        self.flush().await
    }

    /// Writes every message from `rx` until the channel closes or the stream fails, draining
    /// what is already queued (up to [`BATCH_BYTES`]) into one write so many frames share a
    /// packet. Messages for which `keep` is false are skipped.
    pub async fn pump<T: Serialize>(
        &mut self,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
        keep: impl Fn(&T) -> bool,
    ) {
        self.pump_with(rx, |out, m| {
            if keep(&m) {
                out.queue(&m);
            }
        })
        .await
    }

    /// [`FramedSend::pump`] with the caller's way of queueing each message.
    pub async fn pump_with<T>(
        &mut self,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
        mut queue: impl FnMut(&mut FramedSend, T),
    ) {
        while let Some(m) = rx.recv().await {
            queue(self, m);
            while self.queued() < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(m) => queue(self, m),
                    Err(_) => break,
                }
            }
            if self.flush().await.is_err() {
                break;
            }
        }
    }

    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    pub fn inner(&mut self) -> &mut quinn::SendStream {
        &mut self.send
    }
}
