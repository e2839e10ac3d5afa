//! The network-namespace fault suite (`scripts/fault-suite.sh --short`): primary kill -9, primary
//! SIGSTOP and a proxy<->primary link cut, each on a fresh four-host topology (client, proxy,
//! server A, server B in network namespaces) with `tuplespace nemesis` checking the history.
//!
//! It needs root and working network namespaces; anywhere else it prints a `SKIPPED:` line and
//! passes. The topology uses its own namespace names, addresses and state directory, so it never
//! touches one started by hand with `scripts/netns-up.sh`, and it is torn down even if the suite
//! fails or panics.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_tuplespace");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Namespace names, addresses and state directory of this test's topology (fixed, so that a run
/// killed half-way is cleaned up by the next one: netns-up.sh --force).
struct Topology {
    ns_prefix: String,
    net_prefix: &'static str,
    state_dir: PathBuf,
}

impl Topology {
    fn new() -> Topology {
        Topology {
            ns_prefix: "tst-".into(),
            net_prefix: "10.78.0",
            state_dir: std::env::temp_dir().join("ts-netns-test"),
        }
    }

    fn script(&self, name: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(Path::new(REPO).join("scripts").join(name))
            .env("TUPLESPACE_BIN", BIN)
            .env("TS_STATE_DIR", &self.state_dir)
            .env("TS_NS_PREFIX", &self.ns_prefix)
            .env("TS_NET_PREFIX", self.net_prefix)
            .env("TS_CONFIG", Path::new(REPO).join("config/tuplespace.toml"))
            .stdin(Stdio::null());
        c
    }
}

/// Tears the topology down when dropped: after success, failure or panic alike.
struct Teardown<'a>(&'a Topology);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let out = self.0.script("netns-down.sh").arg("--purge").output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => say(&format!(
                "netns-down.sh failed ({}): {}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => say(&format!("cannot run netns-down.sh: {e}")),
        }
    }
}

/// Writes straight to stderr, past the test harness's output capture, so that it is always seen.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Why network namespaces cannot be used here, or None if they can.
fn netns_unavailable() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into());
    if uid != "0" {
        return Some(format!("not running as root (effective uid {uid})"));
    }
    for tool in ["bash", "ip"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    let scratch = format!("tsprobe{}", std::process::id());
    let add = Command::new("ip").args(["netns", "add", &scratch]).output();
    match add {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &scratch]).status();
            None
        }
        Ok(o) => Some(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run `ip netns add`: {e}")),
    }
}

#[test]
fn fault_suite_short_in_network_namespaces() {
    if let Some(why) = netns_unavailable() {
        say(&format!(
            "SKIPPED: network namespaces not available ({why})"
        ));
        return;
    }
    let topo = Topology::new();
    let _teardown = Teardown(&topo);
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("netns-faults-{stamp}"));
    say(&format!(
        "running scripts/fault-suite.sh --short (namespaces {}*, {}.0/24, outputs in {})",
        topo.ns_prefix,
        topo.net_prefix,
        out.display()
    ));
    // The suite's progress goes to stderr as it happens; the table comes on stdout.
    let result = topo
        .script("fault-suite.sh")
        .arg("--short")
        .arg("--out")
        .arg(&out)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/fault-suite.sh");
    let table = String::from_utf8_lossy(&result.stdout);
    say(&table);
    assert!(
        result.status.success(),
        "the fault suite failed ({}); per-scenario histories, reports and logs are in {}",
        result.status,
        out.display()
    );
}
