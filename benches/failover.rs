//! Failover and resync measurements with real processes (run: `cargo bench --bench failover`).
//!
//! 1. Failover time: a writer PUTs continuously (one request at a time); the primary is killed
//!    with SIGKILL; the time from the kill to the acknowledgement of the first write sent after
//!    it (necessarily by the new primary) is recorded. Repeated `TS_KILLS` times (default 20) at default settings.
//! 2. Resync: with `TS_RESYNC_PAIRS` pairs (default 1,000,000) stored, GETs run continuously while
//!    the backup is killed and a new one is synchronised; GET latency p50/p99/max during the resync
//!    is compared with the same load before it.
//!
//! Not a test: it prints figures for docs/BENCHMARKS.md.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ciborium::Value;
use common::{Cluster, client_cfg};
use hdrhistogram::Histogram;
use tuplespace::client::Client;
use tuplespace::net::tls::CertRole;
use tuplespace::wire::client::Status;

fn env_or(name: &str, d: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// (epoch, primary pid, backup pid) once a synchronised backup exists.
async fn wait_synced(c: &Cluster, min_epoch: u64) -> (u64, i32, i32) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = c.cluster_status().await
            && st.backup_synced
            && st.epoch >= min_epoch
            && let (Some(p), Some(b)) = (st.pid_of("primary"), st.pid_of("backup"))
        {
            return (st.epoch, p as i32, b as i32);
        }
        assert!(
            Instant::now() < deadline,
            "no synchronised backup within 120 s\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pair(k: &str, v: &str) -> Value {
    let t = |s: &str| Value::Array(s.split(',').map(|e| Value::Text(e.into())).collect());
    Value::Array(vec![t(k), t(v)])
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

async fn failover_times(kills: u64) {
    let c = Cluster::builder().start().await;
    let (mut epoch, _, _) = wait_synced(&c, 1).await;
    // (sent, acknowledged) of every write.
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(Instant, Instant)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (sap, certs, acked, stop) = (
            c.client_sap.clone(),
            c.certs.clone(),
            acked.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut cl = Client::connect(&sap, &certs, CertRole::Client, &client_cfg())
                .await
                .expect("writer connects");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let sent = Instant::now();
                let r = cl
                    .request(
                        "PUT",
                        Some(Value::Array(vec![pair(&format!("f,{n}"), "x")])),
                    )
                    .await
                    .expect("PUT answered");
                assert_eq!(r.status, Status::Ok, "a client saw {r:?}");
                acked.lock().expect("lock").push((sent, Instant::now()));
            }
        })
    };
    let mut h = hist();
    let mut all = vec![];
    for round in 0..kills {
        let (e, primary, _) = wait_synced(&c, epoch).await;
        epoch = e;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        kill(primary);
        let first = loop {
            // The first write sent after the kill: a reply already on its way from the old
            // primary does not count.
            if let Some((_, t)) = acked
                .lock()
                .expect("lock")
                .iter()
                .rev()
                .take_while(|(sent, _)| *sent > t0)
                .last()
                .copied()
            {
                break t;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "round {round}: no write acknowledged 30 s after the kill\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let ms = first.duration_since(t0).as_micros() as u64;
        let _ = h.record(ms);
        all.push(ms as f64 / 1000.0);
        eprintln!(
            "kill {}: first acknowledged write after {:.1} ms",
            round + 1,
            ms as f64 / 1000.0
        );
        epoch += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    println!(
        "failover (kill -9 of the primary -> first acknowledged write), {kills} kills: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, min {:.1} ms",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        h.min() as f64 / 1000.0
    );
}

async fn get_load(
    c: &Cluster,
    keys: u64,
    stop: Arc<AtomicBool>,
    clients: usize,
) -> Vec<tokio::task::JoinHandle<Histogram<u64>>> {
    (0..clients)
        .map(|i| {
            let (sap, certs, stop) = (c.client_sap.clone(), c.certs.clone(), stop.clone());
            tokio::spawn(async move {
                let mut cl = Client::connect(&sap, &certs, CertRole::Client, &client_cfg())
                    .await
                    .expect("reader connects");
                let mut h = hist();
                let mut k = i as u64 * 7919;
                while !stop.load(Ordering::Relaxed) {
                    k = (k + 104_729) % keys;
                    let t0 = Instant::now();
                    let r = cl
                        .request(
                            "GET",
                            Some(Value::Array(vec![
                                Value::Text(format!("r,{k}")),
                                Value::Text(".*".into()),
                            ])),
                        )
                        .await
                        .expect("GET answered");
                    assert_eq!(r.status, Status::Ok);
                    let _ = h.record(t0.elapsed().as_micros() as u64);
                }
                h
            })
        })
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>) -> Histogram<u64> {
    let mut h = hist();
    for t in tasks {
        let _ = h.add(t.await.expect("reader"));
    }
    h
}

async fn resync(pairs: u64) {
    let c = Cluster::builder()
        .set(&format!("backup_sync_timeout_ms={}", 600_000))
        .start()
        .await;
    wait_synced(&c, 1).await;
    let t0 = Instant::now();
    let mut cl = Client::connect(&c.client_sap, &c.certs, CertRole::Client, &client_cfg())
        .await
        .expect("loader");
    let batch = 5_000;
    let mut k = 0;
    while k < pairs {
        let end = (k + batch).min(pairs);
        let items = (k..end)
            .map(|i| pair(&format!("r,{i}"), &format!("v{i}")))
            .collect();
        let r = cl
            .request("PUT", Some(Value::Array(items)))
            .await
            .expect("load");
        assert_eq!(r.status, Status::Ok);
        k = end;
    }
    eprintln!(
        "loaded {pairs} pairs in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let (epoch, _, backup) = wait_synced(&c, 1).await;
    // Baseline: the same GET load with a steady pair.
    let stop = Arc::new(AtomicBool::new(false));
    let base = get_load(&c, pairs, stop.clone(), 4).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let base = collect(base).await;
    // During resync: kill the backup, measure until a new one is synchronised.
    let stop = Arc::new(AtomicBool::new(false));
    let during = get_load(&c, pairs, stop.clone(), 4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t_kill = Instant::now();
    kill(backup);
    wait_synced(&c, epoch + 1).await;
    let resync_s = t_kill.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let during = collect(during).await;
    let f = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "resync of {pairs} pairs took {resync_s:.1} s (kill -9 of the backup -> new backup synchronised)\n  GET latency, 4 clients, steady:      p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} GETs)\n  GET latency, 4 clients, during resync: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} GETs)",
        f(&base, 0.5),
        f(&base, 0.99),
        base.max() as f64 / 1000.0,
        base.len(),
        f(&during, 0.5),
        f(&during, 0.99),
        during.max() as f64 / 1000.0,
        during.len()
    );
}

fn main() {
    // `cargo bench` passes --bench; anything else (e.g. a filter) is ignored.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        if env_or("TS_SKIP_FAILOVER", 0) == 0 {
            failover_times(env_or("TS_KILLS", 20)).await;
        }
        if env_or("TS_SKIP_RESYNC", 0) == 0 {
            resync(env_or("TS_RESYNC_PAIRS", 1_000_000)).await;
        }
    });
}
