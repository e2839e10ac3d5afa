//! `tuplespace up`: the embedded default. Creates development certificates if absent, starts a
//! proxy and a primary (as child processes of this binary) on loopback, prints how to connect,
//! and on Ctrl-C or SIGTERM shuts the service down through the SHUTDOWN operation, so the space is
//! saved, then waits for the processes to end.

use std::path::PathBuf;
use std::time::Duration;

use tokio::process::{Child, Command};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::net::tls::{self, CertRole};

/// Where `up` puts things (SPEC §2 defaults).
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub client_sap: String,
    pub server_sap: String,
    pub shutdown_sap: String,
    pub primary_shutdown_sap: String,
    pub backup_sap: String,
    pub heartbeat_sap: String,
    /// Metrics of the proxy, the first primary and the first backup ("" = none).
    pub metrics_sap: String,
    pub primary_metrics_sap: String,
    pub backup_metrics_sap: String,
    pub save_file: PathBuf,
    pub certs: PathBuf,
    pub config_path: Option<PathBuf>,
    pub overrides: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot start `{what}`: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot create `{path}`: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn exe() -> PathBuf {
    crate::server::own_binary()
}

fn common_flags(cmd: &mut Command, o: &UpOptions) {
    cmd.arg("--certs").arg(&o.certs);
    if let Some(c) = &o.config_path {
        cmd.arg("--config").arg(c);
    }
    for s in &o.overrides {
        cmd.arg("--set").arg(s);
    }
    // Own process group: Ctrl-C reaches `up` only, which then stops the service in order.
    cmd.process_group(0);
    cmd.kill_on_drop(false);
}

fn spawn(mut cmd: Command, what: &str) -> Result<Child, UpError> {
    cmd.spawn().map_err(|source| UpError::Spawn {
        what: what.to_owned(),
        source,
    })
}

/// Runs the embedded service until Ctrl-C/SIGTERM. Returns the process exit code.
pub async fn run(o: UpOptions, cfg: Config) -> Result<i32, UpError> {
    if !tls::cluster_present(&o.certs) {
        // Never replace an existing CA: certificates issued from it elsewhere would stop working.
        info!(dir = %o.certs.display(), "creating development certificates");
        tls::create_cluster(&o.certs, &[], false)?;
    }
    if let Some(dir) = o.save_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| UpError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let init = if o.save_file.exists() {
        o.save_file.display().to_string()
    } else {
        "null".to_owned()
    };

    let mut proxy = Command::new(exe());
    proxy
        .arg("proxy")
        .arg(&o.client_sap)
        .arg(&o.server_sap)
        .arg(&o.shutdown_sap);
    common_flags(&mut proxy, &o);
    proxy
        .arg("--set")
        .arg(format!("metrics_sap={}", o.metrics_sap));
    if cfg.proxy_state_file.is_none() {
        // The proxy's durable state (epoch, office holder, incarnation) beside the save file.
        let state = o.save_file.with_file_name("proxy.state");
        proxy.arg("--set").arg(format!(
            "proxy_state_file={:?}",
            state.display().to_string()
        ));
    }
    let mut proxy = spawn(proxy, "proxy")?;

    let mut server = Command::new(exe());
    server
        .arg("server")
        .arg(&o.primary_shutdown_sap)
        .arg(&o.server_sap)
        .arg(&o.backup_sap)
        .arg(&o.heartbeat_sap)
        .arg(&o.save_file)
        .arg("null")
        .arg(&init);
    common_flags(&mut server, &o);
    server
        .arg("--set")
        .arg(format!("metrics_sap={}", o.primary_metrics_sap))
        .arg("--set")
        .arg(format!("backup_metrics_sap={}", o.backup_metrics_sap));
    let mut server = spawn(server, "server")?;

    println!("tuplespace is up.");
    println!(
        "  clients connect to   {} (ALPN tuplespace/1, certificates in {})",
        o.client_sap,
        o.certs.display()
    );
    println!("  admin (shutdown) at  {}", o.shutdown_sap);
    let url = |s: &str| {
        if s.is_empty() {
            "off".to_owned()
        } else {
            format!("http://{s}/metrics")
        }
    };
    println!(
        "  metrics (OpenMetrics) proxy {}, primary {}, backup {} (docs/METRICS.md)",
        url(&o.metrics_sap),
        url(&o.primary_metrics_sap),
        url(&o.backup_metrics_sap)
    );
    match crate::durable::data_root(&cfg, Some(&o.save_file)) {
        Some(root) => println!(
            "  data (logs, snapshots) in {} (fsync = {:?}); saved to {} on shutdown",
            root.display(),
            cfg.fsync,
            o.save_file.display()
        ),
        None => println!("  data saved to        {}", o.save_file.display()),
    }
    println!(
        "try:  tuplespace client put user,1=alice   then   tuplespace client get 'user,.*' '.*'"
    );
    println!("      tuplespace client        (interactive; `help` lists commands)");
    println!("Ctrl-C saves and stops everything.");

    let code = tokio::select! {
        _ = crate::termination_signal() => {
            info!("stopping: asking the service to save and shut down");
            shutdown_service(&o, &cfg).await;
            0
        }
        s = proxy.wait() => match s {
            // A SHUTDOWN on the admin SAP: the service stopped on purpose.
            Ok(s) if s.success() => {
                info!("the service was shut down (SHUTDOWN on the admin SAP)");
                0
            }
            s => {
                error!("the proxy exited ({s:?}); stopping");
                1
            }
        },
    };
    // The first server may be gone after a failover: the current primary is whoever the proxy
    // routes to, and the SHUTDOWN above stopped it. Reap the first one if it is still there.
    for (name, child) in [("proxy", &mut proxy), ("server", &mut server)] {
        stop_child(name, child, &cfg).await;
    }
    println!("tuplespace stopped.");
    Ok(code)
}

async fn shutdown_service(o: &UpOptions, cfg: &Config) {
    match crate::client::Client::connect(&o.shutdown_sap, &o.certs, CertRole::Admin, cfg).await {
        Ok(mut c) => match c.request("SHUTDOWN", None).await {
            Ok(r) => info!(
                "shutdown: {}",
                r.message.unwrap_or_else(|| r.status.as_str().into())
            ),
            Err(e) => warn!("shutdown request failed: {e}"),
        },
        Err(e) => warn!("cannot reach the shutdown SAP: {e}"),
    }
}

async fn stop_child(name: &str, child: &mut Child, cfg: &Config) {
    let wait = cfg.shutdown_timeout() + Duration::from_secs(2);
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if tokio::time::timeout(wait, child.wait()).await.is_ok() {
        return;
    }
    // Ask politely (SIGTERM: the process saves and stops), then force.
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(wait, child.wait()).await.is_err() {
        warn!("{name} did not stop; killing it");
        let _ = child.kill().await;
    }
}
