//! Test harness for failover tests: starts the real binary's proxy and primary (which starts its
//! own backup) on free loopback ports, waits on conditions with deadlines, and kills every process
//! it learned of when dropped.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ciborium::Value;
use tuplespace::client::Client;
use tuplespace::config::Config;
use tuplespace::net::tls::{self, CertRole};

/// A free UDP port on loopback (bound then released; the OS does not hand it out again at once).
pub fn free_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral port");
    s.local_addr().expect("local addr").port()
}

pub fn sap() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Polls `f` until it yields Some, or gives up at the deadline.
pub async fn wait_until<T, F, Fut>(max: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + max;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// A value under `key` in a CBOR map.
pub fn map_get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| matches!(k, Value::Text(t) if t == key))
            .map(|(_, v)| v),
        _ => None,
    }
}

pub struct Builder {
    sets: Vec<String>,
    server: bool,
    init: Option<PathBuf>,
}

impl Builder {
    pub fn set(mut self, kv: &str) -> Self {
        self.sets.push(kv.to_owned());
        self
    }
    pub fn no_server(mut self) -> Self {
        self.server = false;
        self
    }
    pub fn init_file(mut self, p: PathBuf) -> Self {
        self.init = Some(p);
        self
    }

    pub async fn start(self) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        tls::create_cluster(&certs, &[], false).expect("certificates");
        let c = Cluster {
            client_sap: sap(),
            server_sap: sap(),
            shutdown_sap: sap(),
            primary_sap: sap(),
            backup_sap: sap(),
            heartbeat_sap: sap(),
            save_file: dir.path().join("space.json"),
            certs,
            sets: self.sets,
            children: Mutex::new(vec![]),
            pids: Mutex::new(vec![]),
            dir,
        };
        eprintln!("cluster dir: {}", c.dir.path().display());
        c.spawn_proxy();
        if self.server {
            c.spawn_server(self.init.as_ref());
            let ok = wait_until(Duration::from_secs(20), || async {
                let st = c.status().await?;
                matches!(map_get(&st, "primary"), Some(Value::Map(_))).then_some(())
            })
            .await;
            assert!(ok.is_some(), "cluster did not come up; logs:\n{}", c.logs());
        }
        c
    }
}

/// A running cluster. Dropping it kills every process it started or learned of.
pub struct Cluster {
    pub client_sap: String,
    pub server_sap: String,
    pub shutdown_sap: String,
    pub primary_sap: String,
    pub backup_sap: String,
    pub heartbeat_sap: String,
    pub save_file: PathBuf,
    pub certs: PathBuf,
    pub sets: Vec<String>,
    children: Mutex<Vec<Child>>,
    pids: Mutex<Vec<i32>>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn builder() -> Builder {
        Builder {
            sets: vec![],
            server: true,
            init: None,
        }
    }

    fn command(&self, log: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tuplespace"));
        cmd.arg("--certs").arg(&self.certs);
        for s in &self.sets {
            cmd.arg("--set").arg(s);
        }
        let f = std::fs::File::create(self.dir.path().join(log)).expect("log file");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(f);
        cmd.env("RUST_LOG", "info");
        cmd
    }

    pub fn spawn_proxy(&self) {
        let mut cmd = self.command("proxy.log");
        cmd.arg("proxy")
            .arg(&self.client_sap)
            .arg(&self.server_sap)
            .arg(&self.shutdown_sap);
        let child = cmd.spawn().expect("start proxy");
        self.children.lock().unwrap().push(child);
    }

    pub fn spawn_server(&self, init: Option<&PathBuf>) {
        let mut cmd = self.command("server.log");
        cmd.arg("server")
            .arg(&self.primary_sap)
            .arg(&self.server_sap)
            .arg(&self.backup_sap)
            .arg(&self.heartbeat_sap)
            .arg(&self.save_file)
            .arg("null")
            .arg(
                init.map(|p| p.display().to_string())
                    .unwrap_or_else(|| "null".into()),
            );
        let child = cmd.spawn().expect("start server");
        self.children.lock().unwrap().push(child);
    }

    /// Client-side configuration with short timeouts.
    pub fn client_config(&self) -> Config {
        Config {
            connect_timeout_ms: 2000,
            ..Config::default()
        }
    }

    pub async fn admin(&self) -> Option<Client> {
        Client::connect(
            &self.shutdown_sap,
            &self.certs,
            CertRole::Admin,
            &self.client_config(),
        )
        .await
        .ok()
    }

    /// The `cluster` map of STATUS; remembers every replica pid it sees (to kill them on drop).
    pub async fn status(&self) -> Option<Value> {
        let mut a = self.admin().await?;
        let r = a.request("STATUS", None).await.ok()?;
        a.close();
        let c = r.cluster?;
        for who in ["primary", "backup"] {
            if let Some(Value::Integer(p)) = map_get(&c, who).and_then(|m| map_get(m, "pid")) {
                self.track_pid(i128::from(*p) as i32);
            }
        }
        Some(c)
    }

    pub fn track_pid(&self, pid: i32) {
        let mut p = self.pids.lock().unwrap();
        if !p.contains(&pid) {
            p.push(pid);
        }
    }

    /// All process logs, for failure messages.
    pub fn logs(&self) -> String {
        ["proxy.log", "server.log"]
            .iter()
            .map(|f| {
                let t = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(40).collect();
                format!(
                    "--- {f} (last lines) ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in self.pids.lock().map(|p| p.clone()).unwrap_or_default() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Ok(mut ch) = self.children.lock() {
            for c in ch.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
