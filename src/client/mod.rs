//! The Rust client library: a connection to the proxy speaking docs/PROTOCOL.md, and the CLI
//! (`tuplespace client`, module [`cli`]) built on exactly this API.
//!
//! - [`Client::connect`] opens a mutual-TLS QUIC connection with a certificate from a
//!   certificate directory (`ca.pem`, `ROLE.pem`, `ROLE.key`, as `tuplespace certs` writes them)
//!   and one long-lived request stream.
//! - [`Request`] builds the requests (`GET`, `PUT`, `POST`, `DELETE`, `STATUS`, `SHUTDOWN`, or any
//!   operator); [`Client::call`] sends one and waits for its [`Response`].
//! - Coordination (PROTOCOL.md §4a): [`Request::take`] removes the first matching pair (a Linda
//!   `in`); [`Request::limit`] keeps a GET or DELETE to the first N matches in key order, and
//!   [`Request::wait`] makes it wait, when nothing matches, for a PUT or POST that matches.
//! - Pipelining: [`Client::send`] (or [`Client::queue`] several, then [`Client::flush`]) returns
//!   the request's id at once; [`Client::read_response`] returns the answers as they come, which
//!   may be in another order than the requests (match them by [`Response::id`]). Keep at most
//!   `max_outstanding_per_stream` (1024 by default) unanswered: beyond it the proxy stops reading
//!   the stream until answers are read.
//! - Every answer has a [`Status`]; everything that is not an answer is a [`ClientError`], a
//!   connection the service closed with a code of PROTOCOL.md §5 being
//!   [`ClientError::ClosedByService`] with its [`CloseCode`].
//!
//! ```no_run
//! use tuplespace::client::{CertRole, Client, ClientError, Request, Status};
//! use tuplespace::config::Config;
//! use std::time::Duration;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), ClientError> {
//! let cfg = Config::default();
//! let mut c = Client::connect("127.0.0.1:7400", "certs".as_ref(), CertRole::Client, &cfg).await?;
//!
//! // One request, one answer.
//! let r = c.call(&Request::put([("user,1", "alice"), ("user,2", "bob")])).await?;
//! assert_eq!(r.status, Status::Ok);
//!
//! // Pipelined: 100 requests in flight, then their answers, matched by id.
//! let mut ids = std::collections::BTreeSet::new();
//! for i in 0..100 {
//!     ids.insert(c.queue(&Request::put([(format!("n,{i}"), "x")])));
//! }
//! c.flush().await?;
//! while !ids.is_empty() {
//!     let r = c.read_response().await?;
//!     assert!(r.id.is_some_and(|id| ids.remove(&id)));
//! }
//!
//! // A work-queue consumer: take the first job, waiting up to 5 s for one.
//! let job = c.call(&Request::take(r"job,\d+", ".*").wait(Duration::from_secs(5))).await?;
//! match job.pairs.as_deref() {
//!     Some([pair]) => println!("took {pair:?}"), // removed by this take, by no other
//!     _ => println!("no job within 5 s"),         // `ok`, no pairs: nothing was removed
//! }
//!
//! match c.call(&Request::get(r"user,\d+", ".*")).await?.status {
//!     Status::Ok => {}                       // `pairs` holds the matches
//!     Status::Unavailable => {}              // not applied: safe to retry
//!     Status::Unknown => {}                  // a write that may or may not have been applied
//!     other => eprintln!("refused: {}", other.as_str()),
//! }
//! c.close();
//! # Ok(())
//! # }
//! ```
//!
//! A complete program that handles every status and close code: `examples/client.rs`
//! (`cargo run --release --example client -- --help`).

pub mod cli;
mod request;
pub mod syntax;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ciborium::Value;

pub use self::request::{Request, decode_response};
pub use crate::net::tls::CertRole;
pub use crate::space::Pair;
pub use crate::wire::client::{BackupState, CloseCode, ClusterStatus, Response, Status};

use crate::config::Config;
use crate::net::endpoint::{self, LinkParams, NetError};
use crate::net::stream::{FramedRecv, FramedSend, RecvError};
use crate::net::tls::{Identity, TlsError};
use crate::wire::CLIENT_ALPN;

/// Errors a client sees, each saying what to do. An answer with a status other than `ok` is not
/// an error: it is a [`Response`] whose [`Status`] says what happened.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The certificate directory could not be read or holds no usable certificate.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The address is not valid, nothing answered, or the handshake was refused.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The service closed the connection with a code of PROTOCOL.md §5; requests without an
    /// answer may or may not have taken effect.
    #[error(
        "the connection was closed by the service: {} (0x{:x}) {reason}; {}",
        .code.name(),
        .code.code(),
        close_advice(*.code)
    )]
    ClosedByService { code: CloseCode, reason: String },
    /// The connection ended otherwise (idle timeout, TLS alert, local error).
    #[error("the connection was closed: {0}")]
    Closed(String),
    /// No answer in time.
    #[error("no answer within {0:?}; the service may be overloaded or down")]
    Timeout(Duration),
    /// A frame that is not a response of PROTOCOL.md §4.
    #[error("the service sent something that is not a response: {0}")]
    BadResponse(String),
    /// The service finished the stream.
    #[error("the service ended the stream without answering")]
    EndOfStream,
}

impl ClientError {
    /// The close code, when the service closed the connection with one.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            ClientError::ClosedByService { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// What to do about a close code.
fn close_advice(code: CloseCode) -> &'static str {
    match code {
        CloseCode::NoError => "the service ended the connection normally; connect again",
        CloseCode::ServiceRefused => {
            "the proxy has reached its client limit (max_clients, or max_connections_per_identity \
             for this certificate); try again later"
        }
        CloseCode::Forbidden => {
            "your certificate's role is not allowed there (data needs client/admin, status and \
             shutdown need admin)"
        }
        CloseCode::FrameTooLarge => {
            "a request frame was empty or larger than max_request_bytes; send smaller requests"
        }
        CloseCode::ShuttingDown => "the service is shutting down; connect again once it is back",
        CloseCode::SlowReader => {
            "answers were left unread for too long; read them as they come or keep fewer requests \
             in flight"
        }
    }
}

/// A lost connection as an error: typed when the service closed it with a code.
fn lost(e: &quinn::ConnectionError) -> ClientError {
    if let quinn::ConnectionError::ApplicationClosed(c) = e
        && let Some(code) = CloseCode::from_code(c.error_code.into_inner())
    {
        return ClientError::ClosedByService {
            code,
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        };
    }
    ClientError::Closed(endpoint::describe_connection_error(e))
}

/// One connection with one long-lived request stream. Requests are numbered from 1.
pub struct Client {
    conn: quinn::Connection,
    send: FramedSend,
    recv: FramedRecv,
    next_id: u64,
    timeout: Duration,
    /// Sent requests that may wait for a match (PROTOCOL.md §4a), by id, until answered: their
    /// wait is added to the time an answer may take.
    waiting: std::collections::HashMap<u64, Duration>,
    _ep: quinn::Endpoint,
}

impl Client {
    /// Connects to `sap` (`HOST:PORT`; the name or address must be in the service's certificate)
    /// with the certificate `role` (`client` for data, `admin` for data and the admin SAP) from
    /// the directory `certs`, and opens the request stream. `cfg` gives the connect, idle and
    /// request timeouts and the largest response accepted (`Config::default()` for the shipped
    /// defaults).
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
        let (send, recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        Ok(Client {
            conn,
            send: FramedSend::new(send),
            recv: FramedRecv::new(recv, cfg.max_response_bytes),
            next_id: 1,
            // The service answers `unavailable` after its request timeout; wait a little longer.
            timeout: cfg.request_timeout() + Duration::from_secs(5),
            waiting: std::collections::HashMap::new(),
            _ep: ep,
        })
    }

    /// The QUIC connection (to watch for its close, or read its statistics).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Sends `req` and waits for its answer. With other requests in flight (see [`Client::send`])
    /// the next answer to arrive may be another one's: then read answers with
    /// [`Client::read_response`] and match them by id instead.
    ///
    /// A request that may wait ([`Request::wait`]) is given its wait on top of the timeout.
    pub async fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.send(req).await?;
        self.read_response().await
    }

    /// Sends `req` without waiting for its answer and returns its id (pipelining).
    pub async fn send(&mut self, req: &Request) -> Result<u64, ClientError> {
        let id = self.queue(req);
        self.flush().await?;
        Ok(id)
    }

    /// Adds `req` to the requests to send at the next [`Client::flush`] (one write for many
    /// requests) and returns its id.
    pub fn queue(&mut self, req: &Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send.queue(&req.to_value(id));
        if let Some(w) = req.wait_time().filter(|w| !w.is_zero()) {
            self.waiting.insert(id, w);
        }
        id
    }

    /// Sends every queued request; waits while QUIC flow control holds them back.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.send.flush().await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => lost(&c),
            other => ClientError::Closed(other.to_string()),
        })
    }

    /// Sends one request with operator `op` and argument `args`, and waits for its answer (as
    /// [`Client::call`] with [`Request::op`]).
    pub async fn request(
        &mut self,
        op: &str,
        args: Option<Value>,
    ) -> Result<Response, ClientError> {
        self.call(&Request::op(op, args)).await
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
            .map_err(|e| match e {
                quinn::WriteError::ConnectionLost(c) => lost(&c),
                other => ClientError::Closed(other.to_string()),
            })
    }

    /// Reads the next answer to arrive, waiting at most the request timeout (plus 5 s), plus the
    /// longest [`Request::wait`] among the requests not answered yet.
    pub async fn read_response(&mut self) -> Result<Response, ClientError> {
        let wait = self.waiting.values().max().copied().unwrap_or_default();
        let r = self.read_response_within(self.timeout + wait).await?;
        if let Some(id) = r.id {
            self.waiting.remove(&id);
        }
        Ok(r)
    }

    /// Reads the next answer to arrive, waiting at most `max`.
    pub async fn read_response_within(&mut self, max: Duration) -> Result<Response, ClientError> {
        let body = match tokio::time::timeout(max, self.recv.next()).await {
            Err(_) => return Err(ClientError::Timeout(max)),
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => return Err(ClientError::EndOfStream),
            Ok(Err(RecvError::Read(quinn::ReadError::ConnectionLost(c)))) => {
                return Err(lost(&c));
            }
            Ok(Err(e)) => return Err(ClientError::Closed(e.to_string())),
        };
        decode_response(&body)
    }

    /// Closes the connection (NO_ERROR): requests not yet answered may still take effect.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }

    /// Waits until the close has been sent (bounded), so the peer learns of it at once.
    pub async fn wait_closed(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self._ep.wait_idle()).await;
    }
}
