//! Hostile peers: a certificate of the cluster that is not a node's must never be taken for a
//! proxy, a server or a backup by any dialer of the service.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tuplespace::net::endpoint::{self, LinkParams};
use tuplespace::net::tls::{self, CertRole, Identity};
use tuplespace::wire::NODE_ALPN;
use tuplespace::wire::client::Status;

use ciborium::Value;
use common::*;

fn params() -> LinkParams {
    LinkParams {
        idle_timeout: Duration::from_secs(5),
        keep_alive: Some(Duration::from_millis(500)),
        max_bidi_streams: 8,
        udp_buffer_bytes: 0,
    }
}

/// A certificate as the first versions of `certs` made every leaf: serverAuth + clientAuth and
/// the loopback names, here with role `role`, signed by the cluster CA in `dir`; written as
/// `fake.pem` / `fake.key` (with `ca.pem`) into `out`.
fn legacy_leaf(dir: &Path, role: CertRole, out: &Path) {
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut p =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    p.subject_alt_names.push(rcgen::SanType::URI(
        format!("urn:tuplespace:role:{}", role.as_str())
            .try_into()
            .unwrap(),
    ));
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("fake.pem"), cert.pem()).unwrap();
    std::fs::write(out.join("fake.key"), key.serialize_pem()).unwrap();
    std::fs::write(out.join("ca.pem"), ca_pem).unwrap();
}

/// A QUIC server on a free loopback port presenting `id` with the node ALPN; counts the bytes
/// any peer sends it on any stream.
async fn fake_node(id: &Identity) -> (SocketAddr, tokio::sync::watch::Receiver<usize>) {
    let limits = endpoint::ListenLimits::from_config(&tuplespace::config::Config::default());
    let ep = endpoint::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        id,
        NODE_ALPN,
        &params(),
        &limits,
    )
    .unwrap();
    let addr = ep.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        while let Some(inc) = ep.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                while let Ok((_, mut recv)) = conn.accept_bi().await {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 4096];
                        while let Ok(Some(n)) = recv.read(&mut buf).await {
                            tx.send_modify(|t| *t += n);
                        }
                    });
                }
            });
        }
    });
    (addr, rx)
}

async fn dial(dir: &Path, addr: SocketAddr) -> Result<quinn::Connection, String> {
    let node = Identity::load(dir, "node").unwrap();
    let cc = endpoint::client_config(&node, NODE_ALPN, &params()).unwrap();
    let ep = endpoint::client_endpoint(addr, &params()).unwrap();
    endpoint::connect(&ep, cc, addr, "127.0.0.1", Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_client_or_admin_certificate_cannot_pose_as_a_node() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("certs");
    tls::create_cluster(&dir, &[], false).unwrap();

    // Today's client and admin certificates carry no serverAuth and no server names: the TLS
    // handshake itself fails.
    for role in ["client", "admin"] {
        let id = Identity::load(&dir, role).unwrap();
        let (addr, got) = fake_node(&id).await;
        let e = dial(&dir, addr).await.unwrap_err();
        assert!(!e.is_empty(), "{role}: dial must fail");
        assert_eq!(*got.borrow(), 0, "{role}: nothing may be sent to it");
    }

    // A certificate made like the old ones (serverAuth and loopback names) but with the client
    // role passes TLS; the dialer's role check refuses it before anything is sent.
    let legacy = t.path().join("legacy");
    legacy_leaf(&dir, CertRole::Client, &legacy);
    let id = Identity::load(&legacy, "fake").unwrap();
    let (addr, got) = fake_node(&id).await;
    let e = dial(&dir, addr).await.unwrap_err();
    assert!(e.contains("without the node role"), "{e}");
    assert_eq!(*got.borrow(), 0);

    // The control: a real node certificate is accepted.
    let legacy_node = t.path().join("legacy-node");
    legacy_leaf(&dir, CertRole::Node, &legacy_node);
    let id = Identity::load(&legacy_node, "fake").unwrap();
    let (addr, _) = fake_node(&id).await;
    dial(&dir, addr)
        .await
        .expect("a node certificate is accepted");
}

/// An answer just under `max_response_bytes` in the client encoding is larger in the node
/// encoding between primary and proxy: once that frame killed the proxy's relay stream for good.
/// Now the store checks both encodings: the GET and the DELETE are `too-large`, nothing changes,
/// and the service keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_at_the_size_limit_is_too_large_and_the_service_keeps_serving() {
    let cl = Cluster::builder()
        .set("max_request_bytes=65536")
        .set("max_response_bytes=1048576")
        .start()
        .await;
    let mut c = cl.client().await;
    const N: usize = 80_000;
    for chunk in (0..N).collect::<Vec<_>>().chunks(3000) {
        let args: Vec<Value> = chunk
            .iter()
            .map(|i| pair(&["k", &i.to_string()], &["x"]))
            .collect();
        let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
        assert_eq!(r.status, Status::Ok, "{r:?}\n{}", cl.logs());
    }
    let client_len = tuplespace::wire::client::pairs_response_len(
        &(0..N)
            .map(|i| tuplespace::space::Pair::new(format!("k,{i}"), "x"))
            .collect::<Vec<_>>(),
    );
    assert!(
        client_len < 1_048_576,
        "the client encoding ({client_len}) must be under the limit for this test to mean anything"
    );
    for op in ["GET", "DELETE"] {
        let t0 = std::time::Instant::now();
        let r = c.request(op, pats(".*", ".*")).await.unwrap();
        assert_eq!(
            r.status,
            Status::TooLarge,
            "{op}: {:?} {:?}\n{}",
            r.message,
            r.pairs.map(|p| p.len()),
            cl.logs()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{op} took {:?}",
            t0.elapsed()
        );
    }
    // Nothing was deleted, and reads and writes on this and a new connection still work.
    let r = c.request("GET", pats(r"k,7999\d", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r).len(), 10, "{r:?}");
    let mut c2 = cl.client().await;
    let r = c2
        .request("PUT", Some(Value::Array(vec![tpair("after", "1")])))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let r = c.request("GET", pats("after", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("after", "1")]), "{r:?}");
}

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

/// Open a stream, write 1024 GETs with large answers, reset it, again and again: requests of
/// reset streams still count against the connection until answered, so the flood stays bounded
/// (it once grew the primary past 4 GiB), and another client keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_flood_stays_bounded_and_others_are_served() {
    const LIMIT: u64 = 512;
    let cl = Cluster::builder()
        .set(&format!("max_pending_per_connection={LIMIT}"))
        .start()
        .await;
    let mut c = cl.client().await;
    let value = "v".repeat(100);
    for chunk in (0..2000).collect::<Vec<_>>().chunks(500) {
        let args: Vec<Value> = chunk
            .iter()
            .map(|i| pair(&["k", &i.to_string()], &[&value]))
            .collect();
        let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
        assert_eq!(r.status, Status::Ok);
    }
    let raw = raw_connect(
        &cl.client_sap,
        &cl.certs,
        "client",
        tuplespace::wire::CLIENT_ALPN,
    )
    .await
    .unwrap();
    let one = framed(&cbor(&req(1, "GET", pats(".*", ".*"))));
    let batch = one.repeat(1024);
    let mut max_pending = 0;
    for _ in 0..16 {
        let mut s = raw.open().await;
        // The proxy stops reading once the connection's budget is spent: the write then waits.
        let _ = tokio::time::timeout(Duration::from_millis(500), s.write(&batch)).await;
        let _ = s.send.reset(0u32.into());
        let pending = cl.status().await.pending;
        max_pending = max_pending.max(pending);
    }
    assert!(
        max_pending <= LIMIT,
        "pending {max_pending} exceeds the per-connection limit {LIMIT}"
    );
    // Another client is answered while the flood's requests drain.
    let t0 = std::time::Instant::now();
    let r = c.request("GET", pats("k,1", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r).len(), 1, "{:?}", r.status);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    for (name, pid) in [("proxy", cl.proxy_pid()), ("primary", cl.server_pid())] {
        let rss = rss_mib(pid);
        assert!(rss < 1024, "{name} RSS {rss} MiB");
        println!("{name} RSS {rss} MiB, max pending {max_pending}");
    }
}

/// Puts `n` pairs `k,I = <value of `len` bytes>` in chunks that fit one request.
async fn fill(c: &mut tuplespace::client::Client, n: usize, len: usize) {
    let value = "v".repeat(len);
    let per = ((512 << 10) / (len + 16)).max(1);
    for chunk in (0..n).collect::<Vec<_>>().chunks(per) {
        let args: Vec<Value> = chunk
            .iter()
            .map(|i| pair(&["k", &i.to_string()], &[&value]))
            .collect();
        let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
        assert_eq!(r.status, Status::Ok, "{r:?}");
    }
}

/// QUIC Initial packets from a peer that never completes a handshake: a real quinn client (no
/// certificate) dials a local relay socket, and the relay forwards the first datagram of each
/// attempt (its Initial: a new destination connection id) to `target`, and nothing else; what
/// `target` answers is read and dropped. `rate` attempts per second until the handle is dropped;
/// the counter says how many Initials were sent.
struct InitialFlood {
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for InitialFlood {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl InitialFlood {
    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn start(target: SocketAddr, rate: u32, certs: &Path) -> InitialFlood {
        use std::collections::HashSet;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        tls::install_crypto_provider();
        let relay = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let relay_addr = relay.local_addr().unwrap();
        let id = Identity::load(certs, "client").unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(id.roots.clone())
            .with_no_client_auth();
        crypto.alpn_protocols = vec![NODE_ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
        let cc = quinn::ClientConfig::new(Arc::new(quic));
        let ep = endpoint::client_endpoint(relay_addr, &params()).unwrap();
        let client_addr: SocketAddr = format!("127.0.0.1:{}", ep.local_addr().unwrap().port())
            .parse()
            .unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let count = sent.clone();
        let forward = tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = relay.recv_from(&mut buf).await else {
                    return;
                };
                // A long header: flags, version (4), DCID length, DCID.
                if from != client_addr || n < 7 || buf[0] & 0x80 == 0 {
                    continue;
                }
                let len = buf[5] as usize;
                if n < 6 + len || !seen.insert(buf[6..6 + len].to_vec()) {
                    continue;
                }
                if relay.send_to(&buf[..n], target).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let dial = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
            let mut attempts = std::collections::VecDeque::new();
            loop {
                tick.tick().await;
                if let Ok(c) = ep.connect_with(cc.clone(), relay_addr, "localhost") {
                    attempts.push_back(c);
                }
                // Kept alive a while so that they are not closed at once (a close is not
                // forwarded anyway); dropped later to bound the test's own memory.
                if attempts.len() > 4 * rate as usize {
                    attempts.pop_front();
                }
            }
        });
        InitialFlood {
            sent,
            tasks: vec![forward, dial],
        }
    }
}

/// The pid of the backup if it is synchronised.
async fn synced_backup(cl: &Cluster) -> Option<u32> {
    let st = cl.cluster_status().await?;
    if st.backup_synced {
        st.pid_of("backup")
    } else {
        None
    }
}

/// A client connection that sends keep-alives every 500 ms (so it hears a close at once even
/// when it reads nothing), with certificate `name`.
async fn keepalive_client(cl: &Cluster, name: &str) -> RawConn {
    let addr = endpoint::resolve_sap(&cl.client_sap).unwrap();
    let id = Identity::load(&cl.certs, name).unwrap();
    let ep = endpoint::client_endpoint(addr, &params()).unwrap();
    let cc = endpoint::client_config(&id, tuplespace::wire::CLIENT_ALPN, &params()).unwrap();
    let conn = endpoint::connect(&ep, cc, addr, "127.0.0.1", Duration::from_secs(5))
        .await
        .unwrap();
    RawConn { ep, conn }
}

/// The highest RSS of `pids` seen while `f` runs (sampled every 50 ms), in MiB.
struct RssPeak {
    peak: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    fn start(pids: Vec<u32>) -> RssPeak {
        let peak = std::sync::Arc::new(std::sync::Mutex::new(vec![0; pids.len()]));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let mut g = p.lock().unwrap();
                for (i, pid) in pids.iter().enumerate() {
                    g[i] = g[i].max(rss_mib(*pid));
                }
            }
        });
        RssPeak { peak, task }
    }

    fn get(&self) -> Vec<u64> {
        self.peak.lock().unwrap().clone()
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A well-behaved client asking again and again while an attack goes on: every answer must be
/// `ok`; the slowest is recorded.
struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(u32, Duration, Vec<String>)>,
}

impl Prober {
    async fn start(cl: &Cluster) -> Prober {
        use std::sync::atomic::Ordering;
        let mut c = cl.client().await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let task = tokio::spawn(async move {
            let (mut n, mut slowest, mut bad) = (0u32, Duration::ZERO, vec![]);
            while !halt.load(Ordering::Relaxed) {
                let t0 = std::time::Instant::now();
                let key = format!("probe,{n}");
                match c
                    .request("PUT", Some(Value::Array(vec![tpair(&key, "1")])))
                    .await
                {
                    Ok(r) if r.status == Status::Ok => {}
                    other => bad.push(format!("PUT {key}: {other:?}")),
                }
                match c.request("GET", pats(&key, ".*")).await {
                    Ok(r) if pairs_of(&r).len() == 1 => {}
                    other => bad.push(format!("GET {key}: {other:?}")),
                }
                slowest = slowest.max(t0.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (n, slowest, bad)
        });
        Prober { stop, task }
    }

    /// Stops; (rounds, slowest round, failures).
    async fn finish(self) -> (u32, Duration, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// A client that stops reading, with ~1 MB answers: 1024 GETs per stream. Once it grew the proxy
/// by 1 GiB per stream and the primary without bound. Now its unread answers count against its
/// connection's budget (its streams stop reading, then it is cut after `slow_reader_timeout_ms`)
/// and against the proxy's (the connection holding the most is cut at once); the primary stops
/// answering ahead of what the proxy reads; memory comes back when the connection is gone, and
/// another client keeps being served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_throttled_then_cut_and_others_are_served() {
    const GLOBAL: u64 = 128; // MiB: max_reply_bytes below
    const RELAY: u64 = 64; // MiB: max_relay_reply_bytes, the default
    let cl = Cluster::builder()
        .set("slow_reader_timeout_ms=2000")
        .set(&format!("max_reply_bytes={}", GLOBAL << 20))
        .start()
        .await;
    let mut c = cl.client().await;
    fill(&mut c, 1000, 1000).await;
    let answer = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&answer).len(), 1000);
    let (proxy, primary) = (cl.proxy_pid(), cl.server_pid());
    let base = [rss_mib(proxy), rss_mib(primary)];
    let peak = RssPeak::start(vec![proxy, primary]);
    let probe = Prober::start(&cl).await;
    let one = framed(&cbor(&req(1, "GET", pats(".*", ".*"))));
    let slow_reader = |how: &Ended, what: &str| match how {
        Ended::App { code: 5, reason } if reason.contains(what) => {}
        other => panic!(
            "expected SLOW_READER naming {what}: {other:?}\n{}",
            cl.logs()
        ),
    };

    // 1. ~100 MB of unread answers on one connection: over its budget (64 MiB), under the
    //    proxy's. Its streams stop reading; after slow_reader_timeout_ms it is closed.
    let slow = keepalive_client(&cl, "client").await;
    let mut s = slow.open().await;
    s.write(&one.repeat(100)).await.unwrap();
    let t0 = std::time::Instant::now();
    let how = slow.ended(Duration::from_secs(20)).await;
    let took = t0.elapsed();
    slow_reader(&how, "max_reply_bytes_per_connection");
    assert!(
        took >= Duration::from_secs(2),
        "cut after {took:?}, before the timeout"
    );
    println!("over its own budget: cut after {took:?}: {how:?}");

    // 2. Three connections with ~56 MB unread each: each under its budget, together over the
    //    proxy's: the one holding the most is cut at once, the others are left alone.
    let mut three = vec![];
    for _ in 0..3 {
        let c = keepalive_client(&cl, "client").await;
        let mut s = c.open().await;
        s.write(&one.repeat(60)).await.unwrap();
        three.push((c, s));
    }
    let cut = wait_until(Duration::from_secs(20), || async {
        three.iter().any(|(c, _)| c.conn.close_reason().is_some())
    })
    .await;
    assert!(cut, "none of the three was cut\n{}", cl.logs());
    let mut cut = 0;
    for (c, _) in &three {
        match c.ended(Duration::from_millis(500)).await {
            Ended::Open => {}
            how => {
                slow_reader(&how, "max_reply_bytes ");
                println!("over the proxy's budget: {how:?}");
                cut += 1;
            }
        }
    }
    assert_eq!(cut, 1, "exactly the largest holder is cut");
    drop(three);

    // 3. The issue's row: four streams of 1024 GETs (~4 GB of answers) on one connection.
    let flood = keepalive_client(&cl, "client").await;
    let mut streams = vec![];
    for _ in 0..4 {
        let mut s = flood.open().await;
        s.write(&one.repeat(1024)).await.unwrap();
        streams.push(s);
    }
    let how = flood.ended(Duration::from_secs(20)).await;
    match &how {
        // QUIC sends the close once, best effort: here the flood of answers can fill the
        // client's receive buffer so that it is lost, and the client's next packet, once the
        // proxy has forgotten the connection, gets a stateless reset (seen in ~1 of 16 runs, at
        // 6b5b82e7 too). Then the proxy's log must show that it cut this connection (after the
        // one of step 2) for the same reason.
        Ended::Other(r) if r.contains("reset by peer") => {
            let logs = cl.logs();
            let cuts = logs
                .matches("closing the client connection holding the most unread answers")
                .count();
            assert!(cuts >= 2, "reset without a SLOW_READER cut\n{logs}");
        }
        how => slow_reader(how, "slow reader"),
    }
    println!("4 x 1024 GETs: {how:?}");
    drop(streams);

    // Memory comes back once the connections are gone; the other client was served throughout.
    let t_cut = std::time::Instant::now();
    let settled = wait_until(Duration::from_secs(15), || async {
        rss_mib(proxy) < base[0] + 64 && rss_mib(primary) < base[1] + 64
    })
    .await;
    let back_after = t_cut.elapsed();
    let (rounds, slowest, bad) = probe.finish().await;
    let peaks = peak.get();
    println!(
        "RSS MiB: proxy {} -> peak {} -> {}; primary {} -> peak {} -> {} (both back within 64 MiB after {back_after:.1?}); other client: {rounds} rounds, slowest {slowest:?}",
        base[0],
        peaks[0],
        rss_mib(proxy),
        base[1],
        peaks[1],
        rss_mib(primary)
    );
    assert!(bad.is_empty(), "the other client was not served: {bad:?}");
    assert!(
        rounds > 0 && slowest < Duration::from_secs(5),
        "slowest round {slowest:?}"
    );
    // The documented bounds (docs/SECURITY.md): the proxy holds max_reply_bytes of answers for
    // its clients (as much again while cut connections are being freed) and max_relay_reply_bytes
    // read from the primary, plus QUIC's windows (16 MiB); the primary max_relay_reply_bytes
    // plus QUIC's window and the answers between its store and the link (not counted). (When a
    // stream's unread answers were one growing buffer, its doubling alone took 123 + 247 MiB at
    // once and the proxy peaked at up to 420 MiB: docs/BENCHMARKS.md, slow reader.)
    let (proxy_bound, primary_bound) = (2 * GLOBAL + RELAY + 32, RELAY + 128);
    assert!(
        peaks[0] < base[0] + proxy_bound,
        "proxy peak {} MiB, bound {} + {proxy_bound}",
        peaks[0],
        base[0]
    );
    assert!(
        peaks[1] < base[1] + primary_bound,
        "primary peak {} MiB, bound {} + {primary_bound}",
        peaks[1],
        base[1]
    );
    assert!(
        settled,
        "memory not given back: proxy {} MiB, primary {} MiB",
        rss_mib(proxy),
        rss_mib(primary)
    );
}

/// 20 QUIC Initial packets per second (no certificate, never completing) to the backup's
/// BACKUP_SAP, then `kill -9` of the backup: each attempt once held the replication listener for
/// its whole handshake deadline, so the primary's own connection never got through (backup
/// starts failed one after another and the primary went down). Now handshakes run side by side
/// and the new backup is synchronised while the flood goes on, twice at 20/s and once at 500/s
/// (far more attempts than `max_unvalidated_handshakes` within a handshake deadline: the rest get
/// a stateless Retry, and the primary, validated by its Retry, finds a slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_flood_on_backup_sap_does_not_stop_backup_restarts() {
    let cl = Cluster::start().await;
    let first = wait_until(Duration::from_secs(20), || async {
        synced_backup(&cl).await.is_some()
    });
    assert!(first.await, "no backup\n{}", cl.logs());
    let target: SocketAddr = cl.backup_sap.parse().unwrap();
    let flood = InitialFlood::start(target, 20, &cl.certs).await;
    assert!(wait_until(Duration::from_secs(5), || async { flood.sent() >= 40 }).await);
    let probe = Prober::start(&cl).await;
    let mut restarts = vec![];
    let mut faster = None;
    for round in 0..3 {
        if round == 2 {
            let f = InitialFlood::start(target, 480, &cl.certs).await;
            assert!(wait_until(Duration::from_secs(5), || async { f.sent() >= 1000 }).await);
            faster = Some(f);
        }
        let old = synced_backup(&cl).await.expect("a synchronised backup");
        signal(old, nix::sys::signal::Signal::SIGKILL);
        let t0 = std::time::Instant::now();
        let ok = wait_until(Duration::from_secs(15), || async {
            synced_backup(&cl).await.is_some_and(|p| p != old)
        })
        .await;
        assert!(
            ok,
            "no new backup synchronised within 15 s of kill -9 while the flood goes on ({} Initials sent)\n{}",
            flood.sent() + faster.as_ref().map_or(0, |f| f.sent()),
            cl.logs()
        );
        restarts.push(t0.elapsed());
        assert!(alive(cl.server_pid()), "the primary exited\n{}", cl.logs());
    }
    let sent = (flood.sent(), faster.as_ref().map_or(0, |f| f.sent()));
    let (rounds, slowest, bad) = probe.finish().await;
    let backup = synced_backup(&cl).await.expect("a synchronised backup");
    let rss = [
        rss_mib(cl.server_pid()),
        rss_mib(backup),
        rss_mib(cl.proxy_pid()),
    ];
    println!(
        "backup synchronised again after {restarts:?} (20, 20, 500 Initials/s); {} + {} Initials sent; other client {rounds} rounds, slowest {slowest:?}; RSS MiB primary {} backup {} proxy {}",
        sent.0, sent.1, rss[0], rss[1], rss[2]
    );
    assert!(bad.is_empty(), "the client was not served: {bad:?}");
    assert!(rss.iter().all(|r| *r < 256), "RSS {rss:?} MiB");
    // Without a share of the slots kept from unvalidated addresses, the flood held every slot
    // and the primary waited for one to time out (+2.7 s measured).
    let calm = restarts[0].max(restarts[1]);
    assert!(
        restarts[2] < calm + Duration::from_millis(1500),
        "at 500 Initials/s the restart took {:?}, at 20/s {calm:?}",
        restarts[2]
    );
}

/// One client certificate cannot take every client slot: past `max_connections_per_identity`
/// its connections are refused (SERVICE_REFUSED) while another certificate still gets in, and a
/// slot given back can be taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_cannot_hold_every_client_slot() {
    let cl = Cluster::builder()
        .max_clients(8)
        .set("max_connections_per_identity=3")
        .start()
        .await;
    let served = |c: &RawConn| {
        let conn = c.conn.clone();
        async move {
            let Ok((send, recv)) = conn.open_bi().await else {
                return false;
            };
            let mut s = RawStream {
                send,
                recv: tuplespace::net::stream::FramedRecv::new(recv, 1 << 20),
            };
            s.write_value(&req(1, "GET", pats(".*", ".*"))).await;
            matches!(s.read().await, Read::Answer(r) if r.status == Status::Ok)
        }
    };
    let mut held = vec![];
    for _ in 0..3 {
        let c = keepalive_client(&cl, "client").await;
        assert!(served(&c).await, "{}", cl.logs());
        held.push(c);
    }
    // The fourth with the same certificate: the handshake succeeds, then it is closed.
    let fourth = keepalive_client(&cl, "client").await;
    match fourth.ended(Duration::from_secs(5)).await {
        Ended::App { code, reason } => {
            assert_eq!(code, 1, "SERVICE_REFUSED: {reason}");
            assert!(
                reason.starts_with("service refused") && reason.contains("certificate"),
                "{reason}"
            );
        }
        other => panic!("a fourth connection with one certificate was not refused: {other:?}"),
    }
    // Another client's certificate gets in (max_clients is 8).
    tls::issue(
        &cl.certs,
        CertRole::Client,
        "other",
        &[],
        &cl.certs.join("other"),
    )
    .unwrap();
    std::fs::rename(
        cl.certs.join("other/client.pem"),
        cl.certs.join("other.pem"),
    )
    .unwrap();
    std::fs::rename(
        cl.certs.join("other/client.key"),
        cl.certs.join("other.key"),
    )
    .unwrap();
    let other = keepalive_client(&cl, "other").await;
    assert!(served(&other).await, "another certificate is served");
    // Held connections are unaffected; one leaving gives its slot back.
    assert!(served(&held[0]).await);
    let gone = held.pop().unwrap();
    gone.conn.close(0u32.into(), b"bye");
    let _ = tokio::time::timeout(Duration::from_secs(2), gone.ep.wait_idle()).await;
    let again = wait_until(Duration::from_secs(10), || async {
        let c = keepalive_client(&cl, "client").await;
        let ok = served(&c).await;
        c.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), c.ep.wait_idle()).await;
        ok
    })
    .await;
    assert!(again, "a slot given back must be usable again");
}
