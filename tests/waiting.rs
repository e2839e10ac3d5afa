//! Waiting reads and takes (PROTOCOL.md §4a: `limit` and `wait_ms` on GET and DELETE), on real
//! processes over QUIC: a work queue with 8 consumers, timeouts, cancellation by stream and
//! connection close, arrival order, limits, and the types of the two keys.
//!
//! Run: `cargo test --release --test waiting`

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ciborium::Value;
use common::*;
use tuplespace::client::{Request, Status};

fn int(n: u64) -> Value {
    Value::Integer(n.into())
}

/// `pending` of STATUS (requests the proxy has not answered yet).
async fn pending(cl: &Cluster) -> Option<u64> {
    cl.cluster_status().await.map(|s| s.pending)
}

async fn wait_pending(cl: &Cluster, n: u64, within: Duration) -> bool {
    wait_until(within, || async { pending(cl).await == Some(n) }).await
}

/// PUTs one pair (text forms) and checks it was stored.
async fn put_one(c: &mut tuplespace::client::Client, key: &str, value: &str) {
    let r = c
        .request("PUT", Some(Value::Array(vec![tpair(key, value)])))
        .await
        .unwrap();
    assert!(rejected_of(&r).is_empty(), "{key} not stored: {r:?}");
}

fn keys(r: &tuplespace::wire::client::Response) -> Vec<String> {
    pairs_of(r).into_iter().map(|p| p.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_consumers_take_a_thousand_jobs_each_exactly_once_in_key_order() {
    const JOBS: usize = 1000;
    const CONSUMERS: usize = 8;
    let cl = Cluster::start().await;
    let mut consumers = Vec::new();
    for c in 0..CONSUMERS {
        let mut cli = cl.client().await;
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let r = cli
                    .call(&Request::take(r"job,\w+", ".*").wait(Duration::from_secs(20)))
                    .await
                    .unwrap_or_else(|e| panic!("consumer {c}: {e}"));
                let ks = keys(&r);
                assert!(ks.len() <= 1, "consumer {c}: a take got {ks:?}");
                let Some(k) = ks.into_iter().next() else {
                    panic!("consumer {c} timed out: {r:?}");
                };
                if k.starts_with("job,stop") {
                    return got;
                }
                got.push(k);
            }
        }));
    }
    // All 8 wait before the first job comes.
    assert!(
        wait_pending(&cl, CONSUMERS as u64, Duration::from_secs(10)).await,
        "consumers not waiting: {}",
        cl.logs()
    );
    let mut producer = cl.client().await;
    let started = Instant::now();
    let mut i = 0;
    while i < JOBS {
        // A few at a time: 1, 2, 3, 4, 5, 1, 2, ...
        let n = (i % 5 + 1).min(JOBS - i);
        let batch: Vec<Value> = (i..i + n)
            .map(|j| tpair(&format!("job,{j:04}"), &format!("payload,{j}")))
            .collect();
        let r = producer
            .request("PUT", Some(Value::Array(batch)))
            .await
            .unwrap();
        assert!(rejected_of(&r).is_empty(), "{r:?}");
        i += n;
    }
    // One stop job per consumer, after every real one (and above them in key order).
    let stops: Vec<Value> = (0..CONSUMERS)
        .map(|c| tpair(&format!("job,stop{c}"), "x"))
        .collect();
    let r = producer
        .request("PUT", Some(Value::Array(stops)))
        .await
        .unwrap();
    assert!(rejected_of(&r).is_empty(), "{r:?}");
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (c, h) in consumers.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("consumer finished")
            .expect("consumer did not panic");
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, sorted, "consumer {c} received out of key order");
        for k in got {
            if let Some(other) = seen.insert(k.clone(), c) {
                panic!("{k} received by consumers {other} and {c}");
            }
        }
    }
    let elapsed = started.elapsed();
    let want: BTreeSet<String> = (0..JOBS).map(|j| format!("job,{j:04}")).collect();
    let got: BTreeSet<String> = seen.keys().cloned().collect();
    assert_eq!(got, want, "every job received exactly once");
    let r = producer.request("GET", pats(".*", ".*")).await.unwrap();
    assert!(pairs_of(&r).is_empty(), "the queue is empty: {r:?}");
    let per: Vec<usize> = (0..CONSUMERS)
        .map(|c| seen.values().filter(|v| **v == c).count())
        .collect();
    eprintln!("{JOBS} jobs to {CONSUMERS} consumers in {elapsed:?}; per consumer {per:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_that_times_out_changes_nothing() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let r = c
        .request(
            "PUT",
            Some(Value::Array(vec![tpair("job,1", "a"), tpair("other", "b")])),
        )
        .await
        .unwrap();
    assert!(rejected_of(&r).is_empty());
    let t = Instant::now();
    let r = c
        .call(&Request::take("job,1", "nomatch").wait(Duration::from_millis(300)))
        .await
        .unwrap();
    let waited = t.elapsed();
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.pairs.as_deref(), Some(&[][..]), "{r:?}");
    assert!(
        r.message.as_deref().unwrap_or("").contains("timed out"),
        "{r:?}"
    );
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("job,1", "a"), ("other", "b")]));
    // A write after the timeout is not taken by the request that timed out.
    let r = c
        .request("POST", Some(Value::Array(vec![tpair("job,1", "nomatch")])))
        .await
        .unwrap();
    assert!(rejected_of(&r).is_empty());
    let r = c.request("GET", pats("job,1", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("job,1", "nomatch")]));
    assert!(wait_pending(&cl, 0, Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_read_sees_a_post_and_wait_zero_answers_at_once() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let mut w = cl.client().await;
    put_one(&mut c, "cfg,a", "old").await;
    // wait_ms 0: answered at once, like a plain GET.
    let r = w
        .call(&Request::get("cfg,a", "new").wait(Duration::ZERO))
        .await
        .unwrap();
    assert!(pairs_of(&r).is_empty());
    let reader = tokio::spawn(async move {
        w.call(&Request::get("cfg,.*", "new").wait(Duration::from_secs(20)))
            .await
            .unwrap()
    });
    assert!(wait_pending(&cl, 1, Duration::from_secs(10)).await);
    let r = c
        .request("POST", Some(Value::Array(vec![tpair("cfg,a", "new")])))
        .await
        .unwrap();
    assert!(rejected_of(&r).is_empty());
    let r = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the waiting read is answered")
        .unwrap();
    assert_eq!(pairs_of(&r), owned(&[("cfg,a", "new")]));
    // A read removes nothing.
    let r = c.request("GET", pats("cfg,a", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("cfg,a", "new")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_answers_the_first_pairs_in_key_order_and_removes_only_those() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let batch: Vec<Value> = [5, 1, 4, 2, 3]
        .iter()
        .map(|i| tpair(&format!("q,{i}"), "v"))
        .collect();
    let r = c.request("PUT", Some(Value::Array(batch))).await.unwrap();
    assert!(rejected_of(&r).is_empty());
    let r = c.call(&Request::get(r"q,\d", ".*").limit(2)).await.unwrap();
    assert_eq!(keys(&r), ["q,1", "q,2"]);
    let r = c
        .call(&Request::delete(r"q,\d", ".*").limit(3))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["q,1", "q,2", "q,3"]);
    let r = c.call(&Request::get(".*", ".*").limit(100)).await.unwrap();
    assert_eq!(keys(&r), ["q,4", "q,5"]);
    // Exact keys and a limit of 1.
    let r = c
        .call(&Request::get("q,4|q,5", ".*").limit(1))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["q,4"]);
    // take = DELETE with limit 1; with something there it does not wait.
    let r = c
        .call(&Request::take(r"q,\d", ".*").wait(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["q,4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_the_order_they_started_waiting() {
    let cl = Cluster::start().await;
    let mut order = Vec::new();
    for i in 0..4u64 {
        let mut c = cl.client().await;
        order.push(tokio::spawn(async move {
            (
                i,
                c.call(&Request::take("t,.*", ".*").wait(Duration::from_secs(20)))
                    .await
                    .unwrap(),
            )
        }));
        // Each starts waiting before the next is sent.
        assert!(wait_pending(&cl, i + 1, Duration::from_secs(10)).await);
    }
    let mut p = cl.client().await;
    // One write of four pairs, given out of key order.
    let batch: Vec<Value> = ["t,c", "t,a", "t,d", "t,b"]
        .iter()
        .map(|k| tpair(k, "v"))
        .collect();
    let r = p.request("PUT", Some(Value::Array(batch))).await.unwrap();
    assert!(rejected_of(&r).is_empty());
    for (h, want) in order.into_iter().zip(["t,a", "t,b", "t,c", "t,d"]) {
        let (i, r) = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(keys(&r), [want], "waiter {i}");
    }
}

/// A raw stream with a waiting take on it.
async fn waiting_take(cl: &Cluster, raw: &RawConn, key: &str) -> RawStream {
    let mut s = raw.open().await;
    let take = Request::take(key, ".*").wait(Duration::from_secs(30));
    s.write_value(&take.to_value(1)).await;
    assert!(
        wait_pending(cl, 1, Duration::from_secs(10)).await,
        "the take is not pending: {}",
        cl.logs()
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_waiting_stream_or_connection_cancels_its_take() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;

    // Stream reset (the connection stays).
    let raw = cl.raw_client().await;
    let mut s = waiting_take(&cl, &raw, "job,a").await;
    s.send.reset(0u32.into()).expect("reset");
    assert!(
        wait_pending(&cl, 0, Duration::from_secs(10)).await,
        "the take of a reset stream still waits: {}",
        cl.logs()
    );
    put_one(&mut c, "job,a", "x").await;
    let r = c.request("GET", pats("job,a", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("job,a", "x")]), "nothing was taken");
    // The connection still works.
    let mut s2 = raw.open().await;
    let r = s2.call(2, "GET", pats("job,a", ".*")).await;
    assert_eq!(pairs_of(&r).len(), 1);

    // Connection close.
    let raw2 = cl.raw_client().await;
    let _s = waiting_take(&cl, &raw2, "job,b").await;
    raw2.conn.close(0u32.into(), b"bye");
    assert!(
        wait_pending(&cl, 0, Duration::from_secs(10)).await,
        "the take of a closed connection still waits: {}",
        cl.logs()
    );
    put_one(&mut c, "job,b", "y").await;
    let r = c.request("GET", pats("job,.*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("job,a", "x"), ("job,b", "y")]));

    // Finishing the send side (FIN) does not cancel: the answer still comes.
    let raw3 = cl.raw_client().await;
    let mut s3 = waiting_take(&cl, &raw3, "job,c").await;
    s3.finish();
    put_one(&mut c, "job,c", "z").await;
    let r = s3.answer().await;
    assert_eq!(pairs_of(&r), owned(&[("job,c", "z")]));
    assert!(matches!(s3.read().await, Read::End), "the stream finishes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_and_wait_ms_of_the_wrong_type_are_malformed() {
    let cl = Cluster::start().await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    let mut id = 10;
    for op in ["GET", "DELETE"] {
        for (k, v) in [
            ("limit", text("1")),
            ("limit", int(0)),
            ("limit", Value::Integer((-3).into())),
            ("limit", Value::Float(1.0)),
            ("wait_ms", text("5s")),
            ("wait_ms", Value::Integer((-1).into())),
            ("wait_ms", Value::Array(vec![])),
            ("wait_ms", Value::Null),
        ] {
            id += 1;
            let Value::Map(mut m) = req(id, op, pats(".*", ".*")) else {
                unreachable!()
            };
            m.push((text(k), v.clone()));
            s.write_value(&Value::Map(m)).await;
            let r = s.answer().await;
            assert_eq!(r.id, Some(id));
            assert_eq!(r.status, Status::Malformed, "{op} {k}={v:?}: {r:?}");
            assert!(r.message.as_deref().unwrap_or("").contains(k), "{r:?}");
        }
    }
    // The right types are fine (and the stream goes on after the malformed ones).
    let Value::Map(mut m) = req(99, "GET", pats(".*", ".*")) else {
        unreachable!()
    };
    m.push((text("limit"), int(1)));
    m.push((text("wait_ms"), int(0)));
    s.write_value(&Value::Map(m)).await;
    let r = s.answer().await;
    assert_eq!((r.id, r.status), (Some(99), Status::Ok), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_is_capped_by_max_wait_ms_and_bounded_by_max_waiters() {
    let cl = Cluster::builder()
        .set("max_wait_ms=200")
        .set("max_waiters=2")
        .set("max_waiters_per_connection=1")
        .start()
        .await;
    let mut a = cl.client().await;
    let t = Instant::now();
    let r = a
        .call(&Request::take("x", ".*").wait(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(
        r.message.as_deref().unwrap_or("").contains("timed out"),
        "{r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "capped: {:?}",
        t.elapsed()
    );
    // A second waiting request of one connection is refused at once (max_waiters_per_connection).
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    let get = Request::get("y", ".*").wait(Duration::from_secs(10));
    s.write_value(&get.to_value(1)).await;
    s.write_value(&get.to_value(2)).await;
    let r = s.answer().await;
    assert_eq!(r.id, Some(2), "the second is answered first: {r:?}");
    assert_eq!(r.status, Status::Ok);
    assert!(
        r.message
            .as_deref()
            .unwrap_or("")
            .contains("max_waiters_per_connection"),
        "{r:?}"
    );
    let r = s.answer().await;
    assert_eq!(r.id, Some(1));
    assert!(
        r.message.as_deref().unwrap_or("").contains("timed out"),
        "{r:?}"
    );
}

/// (epoch, primary pid) once the backup is synchronised.
async fn synced(cl: &Cluster) -> Option<(u64, u32)> {
    let st = cl.cluster_status().await?;
    if !st.backup_synced {
        return None;
    }
    Some((st.epoch, st.pid_of("primary")?))
}

async fn wait_synced(cl: &Cluster, above_epoch: u64) -> (u64, u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((e, p)) = synced(cl).await
            && e > above_epoch
        {
            return (e, p);
        }
        assert!(
            Instant::now() < deadline,
            "no synchronised backup above epoch {above_epoch}: {}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_through_two_primary_kills_lose_no_job_and_take_none_twice() {
    const JOBS: usize = 600;
    const CONSUMERS: usize = 4;
    let cl = Cluster::start().await;
    let (mut epoch, _) = wait_synced(&cl, 0).await;
    let mut consumers = Vec::new();
    for c in 0..CONSUMERS {
        let mut cli = cl.client().await;
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut errors = Vec::new();
            loop {
                match cli
                    .call(&Request::take(r"job,\w+", ".*").wait(Duration::from_secs(5)))
                    .await
                {
                    Ok(r) if r.status == Status::Ok => {
                        let ks = keys(&r);
                        match ks.first() {
                            Some(k) if k.starts_with("job,stop") => return (got, errors),
                            Some(k) => got.push(k.clone()),
                            // A timeout: take again.
                            None => {}
                        }
                    }
                    Ok(r) => errors.push(format!("consumer {c}: {r:?}")),
                    Err(e) => {
                        errors.push(format!("consumer {c}: {e}"));
                        return (got, errors);
                    }
                }
            }
        }));
    }
    let mut producer = cl.client().await;
    for j in 0..JOBS {
        if j == JOBS / 3 || j == 2 * JOBS / 3 {
            let (_, primary) = wait_synced(&cl, epoch - 1).await;
            signal(primary, nix::sys::signal::Signal::SIGKILL);
            // The next PUTs go on while the backup takes over.
            epoch += 1;
        }
        let r = producer
            .request(
                "PUT",
                Some(Value::Array(vec![tpair(&format!("job,{j:05}"), "x")])),
            )
            .await
            .unwrap();
        assert!(
            rejected_of(&r).is_empty(),
            "job {j} applied twice? {r:?}\n{}",
            cl.logs()
        );
    }
    let (e, _) = wait_synced(&cl, epoch - 1).await;
    assert_eq!(e, epoch, "one failover per kill");
    let stops: Vec<Value> = (0..CONSUMERS)
        .map(|c| tpair(&format!("job,stop{c}"), "x"))
        .collect();
    let r = producer
        .request("PUT", Some(Value::Array(stops)))
        .await
        .unwrap();
    assert!(rejected_of(&r).is_empty());
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (c, h) in consumers.into_iter().enumerate() {
        let (got, errors) = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("consumer finished")
            .expect("consumer did not panic");
        assert!(errors.is_empty(), "{errors:?}\n{}", cl.logs());
        for k in got {
            if let Some(other) = seen.insert(k.clone(), c) {
                panic!("{k} taken by consumers {other} and {c}");
            }
        }
    }
    let r = producer.request("GET", pats(".*", ".*")).await.unwrap();
    let left: Vec<String> = pairs_of(&r).into_iter().map(|p| p.0).collect();
    assert!(left.is_empty(), "jobs left: {left:?}");
    let want: BTreeSet<String> = (0..JOBS).map(|j| format!("job,{j:05}")).collect();
    let got: BTreeSet<String> = seen.keys().cloned().collect();
    let lost: Vec<_> = want.difference(&got).collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert_eq!(got.len(), JOBS);
}

/// `tuplespace nemesis` with waiting takes (issue 13): 2 takers consume the fresh inserts of 3
/// clients while the primary is killed; the checker finds no pair taken twice, none lost, and
/// every take linearizable on its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_with_waiting_takes_through_a_primary_kill_passes() {
    use tuplespace::config::Config;
    use tuplespace::nemesis::runner::{self, Fault, NemesisOptions};
    let cl = Cluster::start().await;
    wait_synced(&cl, 0).await;
    let opts = NemesisOptions {
        sap: cl.client_sap.clone(),
        admin_sap: cl.shutdown_sap.clone(),
        certs: cl.certs.clone(),
        duration: Duration::from_secs(5),
        clients: 3,
        keys: 3,
        fault: Fault::KillPrimary,
        fault_at: Duration::from_millis(1500),
        fault_for: Duration::ZERO,
        fault_cmd: None,
        heal_cmd: None,
        op_timeout: Duration::from_secs(3),
        out: cl.dir.path().join("nemesis"),
        timeline_bucket: Duration::from_millis(100),
        takers: 2,
        take_wait: Duration::from_millis(500),
    };
    let r = runner::run(opts, Config::default()).await.unwrap();
    let summary = runner::summary(&r);
    eprintln!("{summary}");
    assert_eq!(r.verdict, "PASS", "{summary}\n{}", cl.logs());
    assert!(r.epoch_after > r.epoch_before, "a failover: {summary}");
    assert!(r.takes > 0, "the takers took something: {summary}");
    assert_eq!((r.taken_twice, r.lost), (0, 0), "{summary}");
}

/// `tuplespace bench --mix queue` (issue 13): every job taken exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bench_takes_every_job_exactly_once() {
    use tuplespace::bench::{QueueOptions, queue_table, run_queue};
    let cl = Cluster::start().await;
    let o = QueueOptions {
        sap: cl.client_sap.clone(),
        certs: cl.certs.clone(),
        producers: 2,
        consumers: 3,
        value_size: 16,
        duration: Duration::from_secs(1),
        take_wait: Duration::from_secs(5),
        max_backlog: 0,
    };
    let r = run_queue(o, tuplespace::config::Config::default())
        .await
        .unwrap();
    let t = queue_table(&r);
    eprintln!("{t}");
    assert!(r.jobs_put > 0 && r.jobs_taken == r.jobs_put, "{t}");
    assert!(r.exactly_once(), "{t}");
    assert_eq!(r.errors, 0, "{t}\n{}", cl.logs());
    assert!(r.ack_to_take_p50_us <= r.put_to_take_p50_us, "{t}");
    let left = cl
        .client()
        .await
        .call(&Request::get("queue.*", ".*"))
        .await
        .unwrap();
    assert!(
        pairs_of(&left).is_empty(),
        "the run removes its jobs: {left:?}"
    );
}
