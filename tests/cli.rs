//! The one-shot `tuplespace client` against a real cluster: `--json` output parsed, exit codes,
//! readable errors.
//!
//! Run: `CARGO_TARGET_DIR=/work/target-tests cargo test --test cli -- --test-threads=2`

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value as Json, json};
use tuplespace::client::Client;
use tuplespace::net::tls::CertRole;
use tuplespace::wire::client::Status;

/// What one CLI run gave.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    /// The single JSON line printed on stdout.
    fn json(&self) -> Json {
        let line = self
            .stdout
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("no output: {self:?}"));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Runs `tuplespace client --sap .. --admin-sap .. --certs .. EXTRA...` in a blocking task.
async fn client(
    client_sap: &str,
    admin_sap: &str,
    certs: &std::path::Path,
    cwd: &std::path::Path,
    extra: &[&str],
) -> Run {
    let mut args: Vec<String> = vec![
        "client".into(),
        "--sap".into(),
        client_sap.into(),
        "--admin-sap".into(),
        admin_sap.into(),
        "--certs".into(),
        certs.display().to_string(),
        "--set".into(),
        "connect_timeout_ms=2000".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let cwd = cwd.to_owned();
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let (status, stdout, stderr) = run_to_end(&args, &cwd, Duration::from_secs(30));
        Run {
            code: status.and_then(|s| s.code()),
            stdout,
            stderr,
            took: t0.elapsed(),
        }
    })
    .await
    .expect("CLI task")
}

async fn cli(cl: &Cluster, extra: &[&str]) -> Run {
    client(
        &cl.client_sap,
        &cl.shutdown_sap,
        &cl.certs,
        cl.dir.path(),
        extra,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_put_then_get_as_json() {
    let cl = Cluster::start().await;
    let r = cli(
        &cl,
        &["--json", "put", "user,1=alice", "user,2=bob", "\"junk\""],
    )
    .await;
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json();
    assert_eq!(j["status"], "ok", "{r:?}");
    assert_eq!(j["rejected"], json!(["junk"]), "{r:?}");
    assert!(j["id"].is_u64(), "{r:?}");

    let r = cli(&cl, &["--json", "get", "user,.*", ".*"]).await;
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json();
    assert_eq!(j["status"], "ok", "{r:?}");
    assert_eq!(
        j["pairs"],
        json!([[["user", "1"], ["alice"]], [["user", "2"], ["bob"]]]),
        "{r:?}"
    );

    let r = cli(&cl, &["--json", "get", r"user,\d+", "a.*"]).await;
    assert_eq!(
        r.json()["pairs"],
        json!([[["user", "1"], ["alice"]]]),
        "{r:?}"
    );

    // The same data is visible to a library client: the CLI really wrote it.
    let mut c = cl.client().await;
    let resp = c.request("GET", pats(".*", "bob")).await.unwrap();
    assert_eq!(pairs_of(&resp), owned(&[("user,2", "bob")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_as_json_describes_the_cluster() {
    let cl = Cluster::start().await;
    let r = cli(&cl, &["--json", "status"]).await;
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json();
    assert_eq!(j["status"], "ok", "{r:?}");
    let c = &j["cluster"];
    assert!(c["epoch"].is_u64(), "{r:?}");
    assert_eq!(c["primary"]["pid"], json!(cl.server_pid()), "{r:?}");
    assert_eq!(c["primary"]["sap"], json!(cl.primary_sap), "{r:?}");
    assert!(c["primary"]["handle"].is_string(), "{r:?}");
    assert!(
        c.get("backup").is_some(),
        "backup must be present (maybe null): {r:?}"
    );
    assert!(c["clients"].is_u64(), "{r:?}");
    assert!(c["pairs"].is_u64(), "{r:?}");
}

/// Issue 12: STATUS `pairs` is exact at the moment of the answer: after each acknowledged
/// `client put a,N=x`, `client --json status` (another process, another connection) shows the
/// new count, 100 times in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_every_acknowledged_put_at_once() {
    // Heartbeats every second: a count taken from them (as STATUS did before) would lag behind
    // by up to a second, longer than a `client` run takes, so this test would see it.
    let cl = Cluster::builder()
        .set("heartbeat_interval_ms=1000")
        .set("heartbeat_timeout_ms=3000")
        .start()
        .await;
    let base = cl
        .status()
        .await
        .pairs
        .expect("the primary counts its pairs");
    for n in 1..=100u64 {
        let r = cli(&cl, &["--json", "put", &format!("a,{n}=x")]).await;
        assert_eq!(r.code, Some(0), "{r:?}");
        assert_eq!(r.json()["rejected"], json!([]), "{r:?}");
        let r = cli(&cl, &["--json", "status"]).await;
        assert_eq!(r.code, Some(0), "{r:?}");
        assert_eq!(
            r.json()["cluster"]["pairs"],
            json!(base + n),
            "STATUS after put {n}: {r:?}"
        );
    }
}

/// `client status` prints a table; `status --watch` prints it again every
/// `status_watch_interval_ms` until interrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_a_table_and_watch_refreshes_it() {
    let cl = Cluster::start().await;
    let r = cli(&cl, &["put", "w,1=x"]).await;
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = cli(&cl, &["status"]).await;
    assert_eq!(r.code, Some(0), "{r:?}");
    let primary = format!(
        "{} at {} (pid {})",
        cl.server_pid(),
        cl.primary_sap,
        cl.server_pid()
    );
    for row in [
        "epoch ",
        "primary ",
        "backup ",
        "replication lag ",
        "clients ",
        "pairs ",
    ] {
        assert!(
            r.stdout.lines().any(|l| l.trim_start().starts_with(row)),
            "no `{row}` row: {r:?}"
        );
    }
    assert!(r.stdout.contains(&primary), "{r:?}");
    assert!(
        r.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["pairs", "1"]),
        "{r:?}"
    );

    // --watch with JSON output: one line per refresh, until SIGINT.
    let args: Vec<String> = [
        "client",
        "--sap",
        &cl.client_sap,
        "--admin-sap",
        &cl.shutdown_sap,
        "--certs",
        &cl.certs.display().to_string(),
        "--set",
        "status_watch_interval_ms=100",
        "--json",
        "status",
        "--watch",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = cl.dir.path().join("watch.out");
    let mut watch = spawn_logged(&args, cl.dir.path(), &out);
    let lines = || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"cluster\""))
            .count()
    };
    let ok = wait_until(Duration::from_secs(10), || async { lines() >= 3 }).await;
    signal(watch.id(), Signal::SIGINT);
    let st = wait_exit_async(&mut watch, EXIT_TIMEOUT).await;
    assert!(
        ok,
        "fewer than 3 refreshes: {:?}",
        std::fs::read_to_string(&out)
    );
    assert!(st.is_some_and(|s| s.success()), "after Ctrl-C: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_statuses_exit_1_and_are_shown() {
    let cl = Cluster::start().await;
    let r = cli(&cl, &["--json", "op", "FROB", "[]"]).await;
    assert_eq!(r.code, Some(1), "{r:?}");
    let j = r.json();
    assert_eq!(j["status"], "not-implemented", "{r:?}");
    assert!(
        j["message"].as_str().unwrap_or("").contains("FROB"),
        "{r:?}"
    );

    let r = cli(&cl, &["--json", "raw", r#"{"id":5,"op":"put","args":"x"}"#]).await;
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(r.json()["status"], "malformed", "{r:?}");
    assert_eq!(r.json()["id"], 5, "{r:?}");

    let r = cli(&cl, &["--json", "rawhex", "ffff"]).await;
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(r.json()["status"], "malformed", "{r:?}");
    assert_eq!(r.json()["id"], Json::Null, "{r:?}");

    // STATUS on the client SAP is forbidden (the CLI sends data ops there).
    let r = cli(&cl, &["--json", "op", "STATUS"]).await;
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(r.json()["status"], "forbidden", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readable_output_without_json() {
    let cl = Cluster::start().await;
    let r = cli(&cl, &["put", "user,1=alice", "a-b=x"]).await;
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.starts_with("ok"), "{r:?}");
    assert!(r.stdout.contains("1 rejected"), "{r:?}");
    let r = cli(&cl, &["get", "user,.*", ".*"]).await;
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("user,1 => alice"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_a_readable_error() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    tuplespace::net::tls::create_cluster(&certs, &[], false).unwrap();
    let sap = free_sap();
    let admin = free_sap();
    let extra = ["--set", "connect_timeout_ms=1000", "get", "a", "b"];
    let r = client(&sap, &admin, &certs, dir.path(), &extra).await;
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("error"), "{r:?}");
    assert!(
        r.stderr.contains(&sap),
        "the error must name the SAP: {r:?}"
    );
    assert!(
        r.took < Duration::from_secs(10),
        "the connect timeout (1 s) must bound the wait: {r:?}"
    );

    let extra = ["--json", "--set", "connect_timeout_ms=1000", "status"];
    let r = client(&sap, &admin, &certs, dir.path(), &extra).await;
    assert_eq!(r.code, Some(2), "{r:?}");
    let err = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        err.contains(&admin),
        "status goes to the admin SAP and names it: {r:?}"
    );

    // Missing certificates: a readable error naming the file.
    let nowhere = dir.path().join("no-certs");
    let r = client(&sap, &admin, &nowhere, dir.path(), &["get", "a", "b"]).await;
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("client.pem"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_is_not_a_client_choice() {
    let cl = Cluster::start().await;
    let r = cli(&cl, &["--cert", "node", "get", "a", "b"]).await;
    assert_ne!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("--cert"), "{r:?}");
    // An admin certificate may do what a client may.
    let r = cli(&cl, &["--json", "--cert", "admin", "put", "a=b"]).await;
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.json()["rejected"], json!([]), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_from_the_cli_stops_the_service() {
    let mut cl = Cluster::start().await;
    let r = cli(&cl, &["--json", "put", "k=v"]).await;
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = cli(&cl, &["--json", "shutdown"]).await;
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.json()["status"], "ok", "{r:?}");
    let ps = wait_exit_async(cl.proxy.as_mut().unwrap(), EXIT_TIMEOUT).await;
    let ss = wait_exit_async(cl.server.as_mut().unwrap(), EXIT_TIMEOUT).await;
    assert!(
        ps.is_some() && ss.is_some(),
        "processes still running: {ps:?} {ss:?}\n{}",
        cl.logs()
    );
    let saved = std::fs::read_to_string(&cl.save_file).unwrap_or_default();
    assert!(saved.contains(r#"[["k"],["v"]]"#), "save file: {saved}");
}

/// A cluster holding `SAVE_PAIRS` pairs of 4,000 bytes (48 MB) with a 150 ms heartbeat timeout
/// and a save that syncs every 64 KiB: its save takes longer than the heartbeat timeout.
const SAVE_PAIRS: usize = 12_000;
const SAVE_VALUE: usize = 4_000;

async fn cluster_with_a_long_save() -> Cluster {
    use ciborium::Value;
    const PER_REQUEST: usize = 100;
    let cl = Cluster::builder()
        .set("heartbeat_interval_ms=30")
        .set("heartbeat_timeout_ms=150")
        .set("background_sync_bytes=65536")
        .start()
        .await;
    let mut c = cl.client().await;
    let value = "v".repeat(SAVE_VALUE);
    for chunk in 0..SAVE_PAIRS / PER_REQUEST {
        let pairs = (0..PER_REQUEST)
            .map(|i| tpair(&format!("k,{}", chunk * PER_REQUEST + i), &value))
            .collect();
        let r = c.request("PUT", Some(Value::Array(pairs))).await.unwrap();
        assert_eq!(r.status, Status::Ok, "{r:?}");
    }
    c.close();
    cl
}

/// A save that outlasts the heartbeat timeout is not a dead primary: the primary heartbeats on
/// while it stops its backup and saves, so the stop waits for the save and reports it. Without
/// those heartbeats the proxy gives up on the primary 150 ms into the save ("fell silent") and
/// the answer reports no save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_longer_than_the_heartbeat_timeout_is_waited_for() {
    let mut cl = cluster_with_a_long_save().await;
    let mut admin = cl.admin().await;
    let t0 = Instant::now();
    let r = admin
        .request("SHUTDOWN", None)
        .await
        .expect("SHUTDOWN answer");
    let took = t0.elapsed();
    let message = r.message.clone().unwrap_or_default();
    assert!(
        r.status == Status::Ok && message.contains(&format!("{SAVE_PAIRS} pairs saved")),
        "{r:?} after {took:?}\n{}",
        cl.logs()
    );
    let ps = wait_exit_async(cl.proxy.as_mut().unwrap(), EXIT_TIMEOUT).await;
    let ss = wait_exit_async(cl.server.as_mut().unwrap(), EXIT_TIMEOUT).await;
    assert!(ps.is_some() && ss.is_some(), "still running\n{}", cl.logs());
    let logs = cl.logs();
    assert!(!logs.contains("fell silent"), "{logs}");
    let saved = std::fs::metadata(&cl.save_file)
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        saved > (SAVE_PAIRS * SAVE_VALUE) as u64,
        "save file of {saved} bytes"
    );
    println!("SHUTDOWN with a save of {saved} bytes answered in {took:?}");
}

/// The control: a primary killed (-9) while it saves falls silent, and the stop ends within
/// about `heartbeat_timeout_ms` with an answer that says so and no save, instead of waiting for
/// `shutdown_timeout_ms` (10 s). The kill comes once the primary has stopped its backup (so
/// that no backup can take over) and is saving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_during_its_save_ends_the_stop_without_a_save() {
    let mut cl = cluster_with_a_long_save().await;
    let backup = cl
        .status()
        .await
        .backup
        .map(|b| b.pid)
        .expect("a backup pid");
    let mut admin = cl.admin().await;
    let answer = tokio::spawn(async move { admin.request("SHUTDOWN", None).await });
    // Polled closely: the save that follows the backup's exit takes well over 150 ms.
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while alive(backup) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(!alive(backup), "the backup did not stop\n{}", cl.logs());
    signal(cl.server_pid(), Signal::SIGKILL);
    let killed = Instant::now();
    let r = answer.await.expect("task").expect("SHUTDOWN answer");
    let took = killed.elapsed();
    let message = r.message.clone().unwrap_or_default();
    assert!(
        r.status == Status::Ok && message.contains("fell silent") && !message.contains("saved"),
        "{r:?}\n{}",
        cl.logs()
    );
    assert!(
        took < Duration::from_secs(1),
        "answered {took:?} after the kill\n{}",
        cl.logs()
    );
    let ps = wait_exit_async(cl.proxy.as_mut().unwrap(), EXIT_TIMEOUT).await;
    assert!(ps.is_some(), "the proxy still runs\n{}", cl.logs());
    assert!(!cl.save_file.exists(), "a save file after the kill");
    println!("SHUTDOWN answered {took:?} after the primary was killed during its save");
}

/// `notify_command` that appends `PROCESS|KIND` to `file`, one line per call.
fn recording_notify(file: &std::path::Path) -> String {
    format!(
        "notify_command='echo \"$TS_EVENT_PROCESS|$TS_EVENT_KIND\" >> {}'",
        file.display()
    )
}

/// The kinds recorded in `file` (see [`recording_notify`]).
fn recorded_kinds(file: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit_once('|').map(|(_, k)| k.to_owned()))
        .collect()
}

/// Lines of `log` at WARN or ERROR level (tracing's format: time, level, message).
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let level = l.split_whitespace().nth(1);
            matches!(level, Some("WARN") | Some("ERROR"))
        })
        .collect()
}

/// Checks that a stop that `up` (start `start`) went through was orderly: no WARN or ERROR line,
/// no failure notification, and one INFO stop line per process.
fn assert_orderly(svc: &UpService, start: u32, events: &std::path::Path, how: &str) {
    let log = svc.log(start);
    let w = warnings(&log);
    assert!(w.is_empty(), "{how}: WARN/ERROR lines: {w:#?}\n{log}");
    // Every notification logs its event line before the command runs, so the log is the
    // complete record; the file shows the commands that ran.
    let kinds = recorded_kinds(events);
    let failures: Vec<&String> = kinds
        .iter()
        .filter(|k| !tuplespace::notify::INFO_EVENTS.contains(&k.as_str()))
        .collect();
    assert!(
        failures.is_empty(),
        "{how}: failure notifications {failures:?} (all: {kinds:?})\n{log}"
    );
    assert_eq!(
        log.matches(" INFO proxy stopped").count(),
        1,
        "{how}:\n{log}"
    );
    assert_eq!(
        log.matches(" INFO server stopped exit=Shutdown").count(),
        2,
        "{how}: one line for the primary, one for the backup\n{log}"
    );
}

/// Issue 12: Ctrl-C of `up` and a SHUTDOWN on the admin SAP stop the service without a WARN
/// line or a failure notification; the control, kill -9 of the primary, does notify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orderly_stop_is_not_a_failure_and_a_kill_is() {
    let notes = tempfile::tempdir().expect("tempdir");
    let file = |n: &str| notes.path().join(n);
    let mut svc = UpService::new(&[&recording_notify(&file("ctrl-c"))]);

    // 1. Ctrl-C (SIGINT to `up`, as a terminal sends it).
    svc.start();
    svc.wait_ready(READY_TIMEOUT).await;
    assert!(svc.first_write("a,1", "x", ANSWER_TIMEOUT).await.is_some());
    signal(svc.up_pid(), Signal::SIGINT);
    let st = wait_exit_async(svc.up.as_mut().expect("up"), EXIT_TIMEOUT).await;
    assert!(
        st.is_some_and(|s| s.success()),
        "up after Ctrl-C: {st:?}\n{}",
        svc.logs()
    );
    svc.reap();
    assert_orderly(&svc, 1, &file("ctrl-c"), "Ctrl-C");

    // 2. SHUTDOWN on the admin SAP (what `tuplespace client shutdown` sends).
    svc.sets = vec![recording_notify(&file("shutdown"))];
    svc.start();
    svc.wait_ready(READY_TIMEOUT).await;
    let mut admin = Client::connect(
        &svc.shutdown_sap,
        &svc.certs,
        CertRole::Admin,
        &client_cfg(),
    )
    .await
    .expect("admin connection");
    let r = admin
        .request("SHUTDOWN", None)
        .await
        .expect("SHUTDOWN answer");
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let st = wait_exit_async(svc.up.as_mut().expect("up"), EXIT_TIMEOUT).await;
    assert!(
        st.is_some_and(|s| s.success()),
        "up after SHUTDOWN: {st:?}\n{}",
        svc.logs()
    );
    svc.reap();
    assert_orderly(&svc, 2, &file("shutdown"), "SHUTDOWN");

    // 3. The control: kill -9 of the primary is a failure, notified as one.
    svc.sets = vec![recording_notify(&file("kill"))];
    svc.start();
    let st = svc.wait_ready(READY_TIMEOUT).await;
    let primary = st
        .pid_of("primary")
        .unwrap_or_else(|| panic!("no primary pid: {st:?}"));
    signal(primary, Signal::SIGKILL);
    let notified = wait_until(EXIT_TIMEOUT, || async {
        recorded_kinds(&file("kill"))
            .iter()
            .any(|k| k == "failover")
    })
    .await;
    let log = svc.log(3);
    assert!(
        notified,
        "no failover notification after kill -9 of the primary: {:?}\n{log}",
        recorded_kinds(&file("kill"))
    );
    assert!(
        warnings(&log)
            .iter()
            .any(|l| l.contains("event=\"failover\"")),
        "{log}"
    );
    svc.stop().await;
}
