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
    let ep = endpoint::server_endpoint("127.0.0.1:0".parse().unwrap(), id, NODE_ALPN, &params())
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
        let st = cl.status().await;
        let pending = get(&st, "pending").and_then(as_u64).unwrap_or(0);
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
