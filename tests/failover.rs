//! Failover under load with real processes (issue: hot backup). Each fault is repeated for several
//! rounds while clients write continuously; afterwards every acknowledged write must be present
//! exactly once with its last acknowledged value, no client may have seen an error, the service
//! must be back to two synchronised replicas, and the epoch must have gone up by one per fault.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ciborium::Value;
use common::{Cluster, client_cfg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tuplespace::client::Client;
use tuplespace::net::tls::CertRole;
use tuplespace::wire::client::Status;

/// Polls `f` until it yields Some, or gives up at the deadline.
async fn wait_until<T, F, Fut>(max: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + max;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Default)]
struct Log {
    /// key -> last acknowledged value
    acked: BTreeMap<String, String>,
    errors: Vec<String>,
}

fn pair(k: &str, v: &str) -> Value {
    let t = |s: &str| Value::Array(s.split(',').map(|e| Value::Text(e.into())).collect());
    Value::Array(vec![t(k), t(v)])
}

/// One closed-loop writer: PUT of fresh keys, POST to the previous key, DELETE now and then.
async fn writer(c: Cluster2, id: usize, stop: Arc<AtomicBool>, acks: Arc<AtomicU64>) -> Log {
    let mut log = Log::default();
    let mut cl = match Client::connect(&c.client_sap, &c.certs, CertRole::Client, &c.cfg).await {
        Ok(cl) => cl,
        Err(e) => {
            log.errors.push(format!("connect: {e}"));
            return log;
        }
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("w{id},{n}");
        let val = format!("v{n}");
        let prev1 = format!("w{id},{}", n.saturating_sub(1));
        let prev2 = format!("w{id},{}", n.saturating_sub(2));
        let (op, args, target) = if n.is_multiple_of(3) {
            (
                "POST",
                Value::Array(vec![pair(&prev1, &format!("p{n}"))]),
                (prev1, format!("p{n}")),
            )
        } else if n.is_multiple_of(7) {
            (
                "DELETE",
                Value::Array(vec![Value::Text(prev2.clone()), Value::Text(".*".into())]),
                (prev2, String::new()),
            )
        } else {
            (
                "PUT",
                Value::Array(vec![pair(&key, &val)]),
                (key.clone(), val.clone()),
            )
        };
        let (k, v) = target;
        match cl.request(op, Some(args)).await {
            Ok(r) if r.status == Status::Ok => {
                let rejected = r.rejected.as_ref().map(|x| x.len()).unwrap_or(0);
                let present = log.acked.contains_key(&k);
                match op {
                    // A fresh key: a rejection means the PUT was applied twice.
                    "PUT" => {
                        if rejected != 0 {
                            log.errors
                                .push(format!("PUT {k}={v} rejected: applied twice?"));
                        }
                        log.acked.insert(k, v);
                    }
                    // POST applies iff we own a live key there.
                    "POST" => {
                        if rejected != usize::from(!present) {
                            log.errors.push(format!(
                                "POST {k}: rejected {rejected}, key present: {present}"
                            ));
                        }
                        if present {
                            log.acked.insert(k, v);
                        }
                    }
                    _ => {
                        let removed = r.pairs.as_ref().map(|p| p.len()).unwrap_or(0);
                        if removed != usize::from(present) {
                            log.errors.push(format!(
                                "DELETE {k}: removed {removed}, key present: {present}"
                            ));
                        }
                        log.acked.remove(&k);
                    }
                }
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => log
                .errors
                .push(format!("{op} {key}: {:?} {:?}", r.status, r.message)),
            Err(e) => {
                log.errors.push(format!("{op} {key}: {e}"));
                return log;
            }
        }
    }
    cl.close();
    log
}

#[derive(Clone)]
struct Cluster2 {
    client_sap: String,
    certs: std::path::PathBuf,
    cfg: tuplespace::config::Config,
}

async fn synced(c: &Cluster) -> Option<(u64, i32, i32)> {
    let st = c.cluster_status().await?;
    if !st.backup_synced {
        return None;
    }
    Some((
        st.epoch,
        st.pid_of("primary")? as i32,
        st.pid_of("backup")? as i32,
    ))
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillPrimary,
    StopPrimary,
    KillBackup,
}

/// One scenario at a time. Run side by side (three loaded clusters with `fsync = "always"` on two
/// cores and one disk), a fresh-clone CI run once saw a proxy count neither replica's heartbeats
/// for ~0.9 s right after a new backup synchronised: both were dropped, one failover more than the
/// test allows. One loaded cluster at a time is what the test is about.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run_rounds(fault: Fault, rounds: usize) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let c = Cluster::builder()
        .set("proxy_loss_timeout_ms=3000")
        .start()
        .await;
    let shared = Cluster2 {
        client_sap: c.client_sap.clone(),
        certs: c.certs.clone(),
        cfg: client_cfg(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|i| tokio::spawn(writer(shared.clone(), i, stop.clone(), acks.clone())))
        .collect();
    let mut epoch = wait_until(Duration::from_secs(20), || async { synced(&c).await })
        .await
        .expect("two synchronised replicas")
        .0;
    for round in 0..rounds {
        let (e, primary, backup) =
            wait_until(Duration::from_secs(20), || async { synced(&c).await })
                .await
                .unwrap_or_else(|| panic!("round {round}: not back to two synchronised replicas"));
        assert_eq!(e, epoch, "round {round}: epoch changed without a fault");
        let before = acks.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(10), || async {
            (acks.load(Ordering::Relaxed) >= before + 50).then_some(())
        })
        .await
        .expect("load is flowing");
        let victim = match fault {
            Fault::KillPrimary => {
                kill(Pid::from_raw(primary), Signal::SIGKILL).expect("kill primary");
                primary
            }
            Fault::StopPrimary => {
                kill(Pid::from_raw(primary), Signal::SIGSTOP).expect("stop primary");
                primary
            }
            Fault::KillBackup => {
                kill(Pid::from_raw(backup), Signal::SIGKILL).expect("kill backup");
                backup
            }
        };
        let (e2, p2, b2) = wait_until(Duration::from_secs(30), || async {
            synced(&c)
                .await
                .filter(|(e2, p, b)| *e2 > epoch && *p != victim && *b != victim)
        })
        .await
        .unwrap_or_else(|| {
            panic!("round {round} {fault:?}: no recovery to two synchronised replicas")
        });
        assert_eq!(
            e2,
            epoch + 1,
            "round {round} {fault:?}: epoch must go up by exactly one"
        );
        match fault {
            Fault::KillBackup => assert_eq!(p2, primary, "primary must stay when the backup dies"),
            _ => assert_eq!(p2, backup, "the backup must be the one promoted"),
        }
        assert_ne!(b2, victim);
        if matches!(fault, Fault::StopPrimary) {
            // The new primary fences the paused one with SIGKILL.
            wait_until(Duration::from_secs(10), || async {
                (!common::alive(victim as u32)).then_some(())
            })
            .await
            .expect("paused primary was terminated");
        }
        epoch = e2;
        let after = acks.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(10), || async {
            (acks.load(Ordering::Relaxed) >= after + 50).then_some(())
        })
        .await
        .expect("writes continue after recovery");
    }
    stop.store(true, Ordering::Relaxed);
    let mut expected = BTreeMap::new();
    let mut errors = vec![];
    for w in writers {
        let log = w.await.expect("writer task");
        expected.extend(log.acked);
        errors.extend(log.errors);
    }
    assert!(errors.is_empty(), "clients saw errors: {errors:#?}");
    let mut admin = Client::connect(&c.client_sap, &c.certs, CertRole::Client, &client_cfg())
        .await
        .expect("reader");
    let r = admin
        .request(
            "GET",
            Some(Value::Array(vec![
                Value::Text("w.*".into()),
                Value::Text(".*".into()),
            ])),
        )
        .await
        .expect("final read");
    assert_eq!(r.status, Status::Ok);
    let got: BTreeMap<String, String> = r
        .pairs
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.key, p.value))
        .collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "stored pairs vs acknowledged pairs"
    );
    for (k, v) in &expected {
        assert_eq!(
            got.get(k),
            Some(v),
            "acknowledged write {k}={v} lost or wrong"
        );
    }
    assert!(acks.load(Ordering::Relaxed) > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_primary_under_load_three_rounds() {
    run_rounds(Fault::KillPrimary, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_primary_under_load_three_rounds() {
    run_rounds(Fault::StopPrimary, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_backup_under_load_three_rounds() {
    run_rounds(Fault::KillBackup, 3).await;
}
