//! quinn endpoints with everything explicit: ALPN, idle timeout, keep-alive, stream limits, UDP
//! buffers, and a connect timeout (quinn alone retries a dead port until the idle timeout).

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::net::tls::{self, Identity, TlsError};

/// Errors opening endpoints or connecting.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{0}` is not a SAP: expected IP:PORT, HOST:PORT or [IPv6]:PORT")]
    BadSap(String),
    #[error(
        "cannot open UDP socket on {addr}: {source}; is the port in use or the address not local?"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("invalid QUIC configuration: {0}")]
    Config(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("no answer from {addr} within {timeout:?}; is the service running there?")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
}

/// Resolves a SAP (`IP:PORT`, `HOST:PORT`, `[::1]:PORT`).
pub fn resolve_sap(sap: &str) -> Result<SocketAddr, NetError> {
    if let Ok(a) = sap.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !sap.contains(':') {
        return Err(NetError::BadSap(sap.to_owned()));
    }
    sap.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| NetError::BadSap(sap.to_owned()))
}

/// The host part of a SAP, used as the TLS server name.
pub fn sap_host(sap: &str) -> String {
    let host = match sap.rsplit_once(':') {
        Some((h, _)) => h,
        None => sap,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// Timeouts and limits of one kind of link.
#[derive(Clone, Copy, Debug)]
pub struct LinkParams {
    pub idle_timeout: Duration,
    /// `None`: the peer is expected to send keep-alives (server side of client links).
    pub keep_alive: Option<Duration>,
    pub max_bidi_streams: u32,
    pub udp_buffer_bytes: usize,
}

/// Limits on the connection attempts of one listening endpoint (`Config`: `max_handshakes`,
/// `max_incoming`, `incoming_buffer_bytes`, `connect_timeout_ms`).
#[derive(Clone, Copy, Debug)]
pub struct ListenLimits {
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// Of those, for addresses not yet validated.
    pub max_unvalidated_handshakes: usize,
    /// Attempts held before their handshake starts (quinn refuses new ones beyond).
    pub max_incoming: usize,
    /// Bytes quinn buffers for attempts not yet started, all together.
    pub incoming_buffer_bytes: u64,
    /// Deadline of a peer's handshake, waiting for a slot included.
    pub handshake_timeout: Duration,
}

impl ListenLimits {
    pub fn from_config(cfg: &crate::config::Config) -> ListenLimits {
        ListenLimits {
            max_handshakes: cfg.max_handshakes,
            max_unvalidated_handshakes: cfg.max_unvalidated_handshakes,
            max_incoming: cfg.max_incoming,
            incoming_buffer_bytes: cfg.incoming_buffer_bytes,
            handshake_timeout: cfg.connect_timeout(),
        }
    }
}

/// Serves every connection attempt on `ep` until the endpoint is closed or `stop` is cancelled.
/// No attempt waits for another: each handshake runs in a task of its own with a deadline, at
/// most `max_handshakes` at once, of which at most `max_unvalidated_handshakes` for addresses QUIC
/// has not validated. Beyond that an unvalidated attempt gets a stateless Retry (nothing is kept
/// until the peer comes back with the token, which a peer that spoofs its address or never
/// completes does not), and a validated one waits for a slot until its deadline. So a flood of
/// Initials that never complete holds at most `max_unvalidated_handshakes` slots, and a real peer
/// (validated by the Retry if need be) finds one free. `serve` gets each established connection,
/// in that task.
pub async fn accept_each<F, Fut>(
    ep: quinn::Endpoint,
    limits: ListenLimits,
    stop: CancellationToken,
    serve: F,
) where
    F: Fn(quinn::Connection) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes));
    let unvalidated = Arc::new(tokio::sync::Semaphore::new(
        limits.max_unvalidated_handshakes,
    ));
    let serve = Arc::new(serve);
    loop {
        let incoming = tokio::select! {
            i = ep.accept() => match i { Some(i) => i, None => break },
            _ = stop.cancelled() => break,
        };
        let slot = if incoming.remote_address_validated() {
            slots.clone().try_acquire_owned().ok().map(|s| (s, None))
        } else {
            let taken = unvalidated.clone().try_acquire_owned().ok().and_then(|u| {
                let s = slots.clone().try_acquire_owned().ok()?;
                Some((s, Some(u)))
            });
            if taken.is_none() {
                debug!(remote = %incoming.remote_address(), "handshakes of unvalidated addresses at their limit: stateless retry");
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            taken
        };
        let slots = slots.clone();
        let serve = serve.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
            let slot = match slot {
                Some(s) => s,
                None => match tokio::time::timeout_at(deadline, slots.acquire_owned()).await {
                    Ok(Ok(s)) => (s, None),
                    _ => {
                        debug!(remote = %incoming.remote_address(), "no handshake slot in time: attempt dropped");
                        incoming.ignore();
                        return;
                    }
                },
            };
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout_at(deadline, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    debug!(%remote, "handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "handshake not done within {:?}: abandoned", limits.handshake_timeout);
                    return;
                }
            };
            drop(slot);
            serve(conn).await;
        });
    }
}

fn transport(p: &LinkParams) -> Result<Arc<TransportConfig>, NetError> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(p.idle_timeout).map_err(|e| NetError::Config(e.to_string()))?,
    ));
    t.keep_alive_interval(p.keep_alive);
    t.max_concurrent_bidi_streams(VarInt::from_u32(p.max_bidi_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Bigger windows so a pipelined client is limited by the service, not by flow control.
    t.stream_receive_window(VarInt::from_u32(4 << 20));
    t.receive_window(VarInt::from_u32(16 << 20));
    t.send_window(16 << 20);
    Ok(Arc::new(t))
}

fn udp_socket(addr: SocketAddr, buf: usize) -> Result<std::net::UdpSocket, NetError> {
    let err = |source| NetError::Bind { addr, source };
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(err)?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    if buf > 0 {
        // The kernel may cap these (net.core.rmem_max): best effort, never fatal.
        let _ = s.set_recv_buffer_size(buf);
        let _ = s.set_send_buffer_size(buf);
    }
    s.bind(&addr.into()).map_err(err)?;
    Ok(s.into())
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    buf: usize,
) -> Result<quinn::Endpoint, NetError> {
    let sock = udp_socket(addr, buf)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| NetError::Config("no async runtime for quinn".into()))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, sock, runtime)
        .map_err(|source| NetError::Bind { addr, source })
}

/// A listening endpoint that demands client certificates and `alpn`. It can also dial out
/// (with [`client_config`] per connection).
pub fn server_endpoint(
    addr: SocketAddr,
    id: &Identity,
    alpn: &[u8],
    p: &LinkParams,
    limits: &ListenLimits,
) -> Result<quinn::Endpoint, NetError> {
    tls::install_crypto_provider();
    let crypto = tls::server_config(id, alpn)?;
    let quic = QuicServerConfig::try_from(crypto).map_err(|e| NetError::Config(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(transport(p)?);
    sc.max_incoming(limits.max_incoming);
    sc.incoming_buffer_size(limits.incoming_buffer_bytes);
    sc.incoming_buffer_size_total(limits.incoming_buffer_bytes);
    endpoint(addr, Some(sc), p.udp_buffer_bytes)
}

/// A client-only endpoint on an ephemeral port of the right address family.
pub fn client_endpoint(remote: SocketAddr, p: &LinkParams) -> Result<quinn::Endpoint, NetError> {
    tls::install_crypto_provider();
    let local: SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| NetError::BadSap("0.0.0.0:0".into()))?
    } else {
        "[::]:0"
            .parse()
            .map_err(|_| NetError::BadSap("[::]:0".into()))?
    };
    endpoint(local, None, p.udp_buffer_bytes)
}

/// quinn client configuration for dialing with our identity.
pub fn client_config(
    id: &Identity,
    alpn: &[u8],
    p: &LinkParams,
) -> Result<quinn::ClientConfig, NetError> {
    tls::install_crypto_provider();
    let crypto = tls::client_config(id, alpn)?;
    let quic = QuicClientConfig::try_from(crypto).map_err(|e| NetError::Config(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    cc.transport_config(transport(p)?);
    Ok(cc)
}

/// Connects with a deadline; `server_name` is checked against the peer's certificate.
pub async fn connect(
    ep: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<quinn::Connection, NetError> {
    let connecting = ep
        .connect_with(cfg, addr, server_name)
        .map_err(|e| NetError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    match tokio::time::timeout(timeout, connecting).await {
        // Every dialer in the service dials a node (proxy, server, backup, primary): the name
        // dialled is checked by TLS against the certificate's SANs, the role here.
        Ok(Ok(c)) if crate::net::tls::peer_allowed(&c, crate::net::tls::SapKind::Node) => Ok(c),
        Ok(Ok(c)) => {
            c.close(
                crate::wire::client::CloseCode::Forbidden.code().into(),
                b"forbidden: the peer is not a node",
            );
            Err(NetError::Connect {
                addr,
                reason: format!(
                    "the peer presented a certificate without the node role ({:?}): refusing to talk to it",
                    crate::net::tls::peer_roles(&c)
                ),
            })
        }
        Ok(Err(e)) => Err(NetError::Connect {
            addr,
            reason: describe_connection_error(&e),
        }),
        Err(_) => Err(NetError::ConnectTimeout { addr, timeout }),
    }
}

/// A readable explanation of why a connection ended, naming our close codes.
pub fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let code = c.error_code.into_inner();
            let name = crate::wire::client::CloseCode::from_code(code)
                .map(|c| c.name())
                .unwrap_or("UNKNOWN");
            format!(
                "closed by peer: {name} (0x{code:x}) {}",
                String::from_utf8_lossy(&c.reason)
            )
        }
        quinn::ConnectionError::ConnectionClosed(c) => {
            let s = c.to_string();
            if s.contains("certificate") || s.contains("alert") {
                format!(
                    "TLS handshake refused: {s}; check that your certificate is from the cluster CA and has the right role"
                )
            } else {
                format!("connection closed: {s}")
            }
        }
        quinn::ConnectionError::TimedOut => "timed out (peer silent)".into(),
        other => other.to_string(),
    }
}
