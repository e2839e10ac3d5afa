//! The deployment files in deploy/systemd/ pass `systemd-analyze verify` (through
//! scripts/verify-systemd.sh, which treats any warning as a failure). Skipped, with a line saying
//! so, where systemd-analyze is not installed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Cluster;

#[test]
fn systemd_units_verify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/verify-systemd.sh"))
        .output()
        .expect("run scripts/verify-systemd.sh");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{said}");
    assert!(out.status.success(), "systemd units do not verify:\n{said}");
    assert!(
        said.starts_with("SKIPPED") || said.contains("verified 2 units"),
        "unexpected output: {said}"
    );
}

/// The server unit hands `tuplespace server` its seven arguments, named as the example
/// environment files name them, and each unit names a certificate directory systemd fills.
#[test]
fn server_unit_passes_the_seven_arguments_the_env_files_define() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let unit = std::fs::read_to_string(dir.join("tuplespace-server@.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let after = exec.split(" server ").nth(1).expect("server subcommand");
    let vars: Vec<&str> = after
        .split_whitespace()
        .map(|w| w.trim_start_matches("${").trim_end_matches('}'))
        .collect();
    assert_eq!(
        vars,
        [
            "SHUTDOWN_SAP",
            "PROXY_SAP",
            "BACKUP_SAP",
            "HEARTBEAT_SAP",
            "SAVE_FILE",
            "PRIMARY_HANDLE",
            "INIT_FILE"
        ]
    );
    for env in ["server-primary.env.example", "server-backup.env.example"] {
        let text = std::fs::read_to_string(dir.join(env)).unwrap();
        for v in &vars {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{v}="))),
                "{env} does not set {v}"
            );
        }
    }
    let proxy = std::fs::read_to_string(dir.join("tuplespace-proxy.service")).unwrap();
    let penv = std::fs::read_to_string(dir.join("proxy.env.example")).unwrap();
    for v in ["CLIENT_SAP", "SERVER_SAP", "SHUTDOWN_SAP"] {
        assert!(proxy.contains(&format!("${{{v}}}")), "proxy unit lacks {v}");
        assert!(
            penv.contains(&format!("{v}=")),
            "proxy.env.example lacks {v}"
        );
    }
    for u in [&unit, &proxy] {
        assert!(
            u.contains("--certs %d"),
            "certificates not from LoadCredential"
        );
    }
}

/// A server the proxy refuses (here: a second primary while one holds the office) exits with
/// status 3, which the server unit does not restart (RestartPreventExitStatus=3): the same
/// command would only be refused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_server_exits_3() {
    let cl = Cluster::start().await;
    let args: Vec<String> = [
        "--certs",
        &cl.certs.display().to_string(),
        "server",
        &common::free_sap(),
        &cl.server_sap,
        &common::free_sap(),
        &common::free_sap(),
        "null",
        "null",
        "null",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = cl.dir.path().join("second.log");
    let mut second = common::spawn_logged(&args, cl.dir.path(), &log);
    let status = common::wait_exit_async(&mut second, Duration::from_secs(20)).await;
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    let Some(status) = status else {
        let _ = second.kill();
        panic!(
            "a second primary was not refused within 20 s:\n{said}\n{}",
            cl.logs()
        );
    };
    println!("second primary: {status}\n{said}");
    assert_eq!(status.code(), Some(3), "{said}");
    assert!(said.contains("Fenced"), "{said}");
    assert!(
        cl.cluster_status().await.is_some(),
        "the first primary's cluster no longer answers STATUS:\n{}",
        cl.logs()
    );
}

/// The policy of every thread of process `pid` (`sched_getscheduler` on each task), leaving out
/// threads that end while they are read.
#[cfg(target_os = "linux")]
fn thread_policies(pid: u32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process runs") {
        let t = t.expect("a task entry");
        let tid: i32 = t
            .file_name()
            .to_string_lossy()
            .parse()
            .expect("a thread id");
        // A thread may end between the listing and these reads (a blocking-pool thread
        // idling out): it has no policy to check, so it is skipped.
        let Ok(name) = std::fs::read_to_string(t.path().join("comm")) else {
            continue;
        };
        // SAFETY: sched_getscheduler has no memory arguments.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        if policy < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            continue;
        }
        out.push((name.trim().to_owned(), policy));
    }
    out
}

/// `cpu_policy` (default "batch") puts every thread of the proxy and the server under
/// `SCHED_BATCH`, the store and log threads included; "normal" leaves them under `SCHED_OTHER`.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_threads_run_under_the_configured_cpu_policy() {
    for (set, want) in [
        (None, libc::SCHED_BATCH),
        (Some("cpu_policy=normal"), libc::SCHED_OTHER),
    ] {
        let mut b = Cluster::builder();
        if let Some(kv) = set {
            b = b.set(kv);
        }
        let cl = b.start().await;
        for pid in [cl.proxy_pid(), cl.server_pid()] {
            let seen = thread_policies(pid);
            assert!(seen.len() > 1, "{set:?}: pid {pid} has threads: {seen:?}");
            assert!(
                seen.iter().all(|(_, p)| *p == want),
                "{set:?}: every thread of {pid} under policy {want}: {seen:?}\n{}",
                cl.logs()
            );
        }
    }
}

/// Where the policy is refused, the proxy and the server say so and serve as usual under the
/// policy they started with. Made to happen: both start under `SCHED_IDLE` without
/// `CAP_SYS_NICE` (dropped with `setpriv` when the tests run as root), and such a process may
/// not leave `SCHED_IDLE`. Skipped, with a line saying so, where `chrt` or `setpriv` is missing.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_cpu_policy_is_logged_and_the_service_runs_on() {
    use ciborium::Value;
    use common::{owned, pairs_of, pats, tpair};
    let have = |c: &str| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("chrt") || !have("setpriv") {
        println!("SKIPPED: chrt and setpriv (util-linux) are needed");
        return;
    }
    let mut wrap = vec!["chrt", "-i", "0"];
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        wrap.extend([
            "setpriv",
            "--bounding-set",
            "-sys_nice",
            "--inh-caps",
            "-sys_nice",
        ]);
    }
    let cl = Cluster::builder().under(&wrap).start().await;
    let mut c = cl.client().await;
    let r = c
        .request("PUT", Some(Value::Array(vec![tpair("k,1", "v")])))
        .await
        .unwrap();
    assert_eq!(r.status, tuplespace::wire::client::Status::Ok, "{r:?}");
    let r = c.request("GET", pats("k,.*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("k,1", "v")]));
    for (pid, log) in [
        (cl.proxy_pid(), &cl.proxy_log),
        (cl.server_pid(), &cl.server_log),
    ] {
        let seen = thread_policies(pid);
        assert!(
            seen.iter().all(|(_, p)| *p == libc::SCHED_IDLE),
            "pid {pid} left SCHED_IDLE: {seen:?}"
        );
        let said = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            said.contains("cannot set the scheduling policy `cpu_policy = \"batch\"`")
                && said.contains("running under the policy the process started with"),
            "pid {pid} did not say its policy was refused:\n{}",
            cl.logs()
        );
    }
}
