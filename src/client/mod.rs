//! The client side: a connection to the proxy speaking PROTOCOL.md, and the CLI on top of it.

pub mod cli;
pub mod syntax;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ciborium::Value;

use crate::config::Config;
use crate::net::endpoint::{self, LinkParams, NetError};
use crate::net::stream::{FramedRecv, FramedSend, RecvError};
use crate::net::tls::{CertRole, Identity, TlsError};
use crate::wire::CLIENT_ALPN;
use crate::wire::client::{Response, request_value};
use crate::wire::frame;

/// Errors a client sees, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("the connection was closed: {0}")]
    Closed(String),
    #[error("no answer within {0:?}; the service may be overloaded or down")]
    Timeout(Duration),
    #[error("the service sent something that is not a response: {0}")]
    BadResponse(String),
    #[error("the service ended the stream without answering")]
    EndOfStream,
}

/// One connection with one long-lived request stream.
pub struct Client {
    conn: quinn::Connection,
    send: FramedSend,
    recv: FramedRecv,
    next_id: u64,
    timeout: Duration,
    _ep: quinn::Endpoint,
}

impl Client {
    /// Connects to `sap` with the certificate `role` from `certs`.
    pub async fn connect(
        sap: &str,
        certs: &Path,
        role: CertRole,
        cfg: &Config,
    ) -> Result<Client, ClientError> {
        let addr: SocketAddr = endpoint::resolve_sap(sap)?;
        let id = Identity::load(certs, role.as_str())?;
        let params = LinkParams {
            idle_timeout: cfg.idle_timeout(),
            keep_alive: Some(cfg.keep_alive()),
            max_bidi_streams: 0,
            udp_buffer_bytes: 0,
        };
        let ep = endpoint::client_endpoint(addr, &params)?;
        let ccfg = endpoint::client_config(&id, CLIENT_ALPN, &params)?;
        let conn = endpoint::connect(
            &ep,
            ccfg,
            addr,
            &endpoint::sap_host(sap),
            cfg.connect_timeout(),
        )
        .await?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ClientError::Closed(endpoint::describe_connection_error(&e)))?;
        Ok(Client {
            conn,
            send: FramedSend::new(send),
            recv: FramedRecv::new(recv, cfg.max_response_bytes),
            next_id: 1,
            // The service answers `unavailable` after its request timeout; wait a little longer.
            timeout: cfg.request_timeout() + Duration::from_secs(5),
            _ep: ep,
        })
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Sends one request and waits for its answer.
    pub async fn request(
        &mut self,
        op: &str,
        args: Option<Value>,
    ) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_value(&request_value(id, op, args)).await?;
        self.read_response().await
    }

    /// Sends an arbitrary CBOR item as a request frame (for malformed-request tests).
    pub async fn send_value(&mut self, v: &Value) -> Result<(), ClientError> {
        self.send.queue(v);
        self.flush().await
    }

    /// Sends raw bytes (already framed or not: the caller decides).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send
            .inner()
            .write_all(bytes)
            .await
            .map_err(|e| ClientError::Closed(e.to_string()))
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        self.send.flush().await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => {
                ClientError::Closed(endpoint::describe_connection_error(&c))
            }
            other => ClientError::Closed(other.to_string()),
        })
    }

    /// Reads the next response frame.
    pub async fn read_response(&mut self) -> Result<Response, ClientError> {
        let body = match tokio::time::timeout(self.timeout, self.recv.next()).await {
            Err(_) => return Err(ClientError::Timeout(self.timeout)),
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => return Err(ClientError::EndOfStream),
            Ok(Err(RecvError::Read(quinn::ReadError::ConnectionLost(c)))) => {
                return Err(ClientError::Closed(endpoint::describe_connection_error(&c)));
            }
            Ok(Err(e)) => return Err(ClientError::Closed(e.to_string())),
        };
        let v = frame::decode_value(&body).map_err(|e| ClientError::BadResponse(e.to_string()))?;
        Response::from_value(&v).ok_or_else(|| ClientError::BadResponse(format!("{v:?}")))
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }

    /// Waits until the close has been sent (bounded), so the peer learns of it at once.
    pub async fn wait_closed(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self._ep.wait_idle()).await;
    }
}
