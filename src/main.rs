//! The `tuplespace` binary: parses the command line and calls one library function per
//! subcommand. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

// The service allocates many small, short-lived buffers per request; mimalloc does that
// markedly cheaper than the system allocator (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokio_util::sync::CancellationToken;
use tuplespace::config::{Config, DEFAULT_CONFIG_PATH};
use tuplespace::net::endpoint::resolve_sap;
use tuplespace::net::tls::{self, CertRole};

#[derive(Parser)]
#[command(
    name = "tuplespace",
    version,
    about = "A fault-tolerant tuple space over authenticated QUIC"
)]
struct Cli {
    /// Directory holding ca.pem and ROLE.pem/ROLE.key certificates.
    #[arg(long, global = true, default_value = "certs")]
    certs: PathBuf,
    /// Configuration file (every timeout and limit).
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Override one configuration key, e.g. --set request_timeout_ms=2000 (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy: CLIENT_SAP SERVER_SAP SHUTDOWN_SAP.
    Proxy {
        client_sap: String,
        server_sap: String,
        shutdown_sap: String,
        /// Most client connections at once (overrides max_clients).
        #[arg(long)]
        max_clients: Option<usize>,
        /// The proxy's durable state file (epoch last granted, office holder, request-id
        /// incarnation); overrides proxy_state_file. Default data/proxy.state; `none` = keep no
        /// state (a restarted proxy then learns the epochs from the replicas).
        #[arg(long)]
        state: Option<String>,
    },
    /// Run a server: SHUTDOWN_SAP PROXY_SAP BACKUP_SAP HEARTBEAT_SAP SAVE_FILE PRIMARY_HANDLE INIT_FILE.
    Server {
        shutdown_sap: String,
        proxy_sap: String,
        backup_sap: String,
        heartbeat_sap: String,
        /// File to save the space to on shutdown, or null.
        save_file: String,
        /// null when starting as the primary; else the primary's pid or SHUTDOWN_SAP.
        primary_handle: String,
        /// File to load the space from, or null.
        init_file: String,
    },
    /// Talk to the service: one command (e.g. `get 'user,.*' '.*'`) or, with none, a shell.
    Client {
        /// The proxy's client SAP.
        #[arg(long, default_value = "127.0.0.1:7400")]
        sap: String,
        /// The proxy's shutdown SAP (status, shutdown).
        #[arg(long, default_value = "127.0.0.1:7402")]
        admin_sap: String,
        /// Print responses as JSON, one per line.
        #[arg(long)]
        json: bool,
        /// Certificate used for data operations: client or admin.
        #[arg(long, default_value = "client")]
        cert: String,
        /// The command and its arguments; none = interactive.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Create the cluster CA and client/admin/node certificates, or issue more.
    Certs {
        #[command(subcommand)]
        action: Option<CertsCmd>,
        /// Output directory (default: --certs).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Extra DNS names or IP addresses for the certificates (repeatable).
        #[arg(long)]
        san: Vec<String>,
        /// Overwrite an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Closed-loop load: C connections x P in flight, HDR latency per operation.
    Bench(BenchArgs),
    /// Random operations under a fault; checks linearizability, lost and duplicated writes.
    Nemesis(NemesisArgs),
    /// Deterministic simulation of the failover protocol (the real state machines on a simulated
    /// network with random faults); every seed is one reproducible run.
    Simulate(SimulateArgs),
    /// Start proxy and primary on loopback with development certificates; Ctrl-C saves and stops.
    Up {
        #[arg(long, default_value = "127.0.0.1:7400")]
        client_sap: String,
        #[arg(long, default_value = "127.0.0.1:7401")]
        server_sap: String,
        #[arg(long, default_value = "127.0.0.1:7402")]
        shutdown_sap: String,
        #[arg(long, default_value = "127.0.0.1:7410")]
        primary_sap: String,
        #[arg(long, default_value = "127.0.0.1:7411")]
        backup_sap: String,
        #[arg(long, default_value = "127.0.0.1:7412")]
        heartbeat_sap: String,
        #[arg(long, default_value = "data/space.json")]
        save_file: PathBuf,
        /// Where the proxy serves OpenMetrics at GET /metrics ("none" = no metrics).
        #[arg(long, default_value = "127.0.0.1:7403")]
        metrics_sap: String,
        /// Where the first primary serves its metrics ("none" = no metrics).
        #[arg(long, default_value = "127.0.0.1:7413")]
        primary_metrics_sap: String,
        /// Where the first backup serves its metrics; after a failover the next backup takes the
        /// old primary's ("none" = no metrics).
        #[arg(long, default_value = "127.0.0.1:7414")]
        backup_metrics_sap: String,
    },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell) on stdout, e.g.
    /// `tuplespace completions bash > ~/.local/share/bash-completion/completions/tuplespace`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The proxy's client SAP.
    #[arg(long, default_value = "127.0.0.1:7400")]
    sap: String,
    /// Connections (C).
    #[arg(short = 'c', long, default_value_t = 16)]
    connections: usize,
    /// Requests in flight per connection (P).
    #[arg(short = 'p', long, default_value_t = 16)]
    pipeline: usize,
    /// Operation mix in percent, e.g. get=50,put=50; or `queue`: the work-queue benchmark
    /// (--producers PUT jobs one at a time, --consumers take them with limit 1 and a wait).
    #[arg(long, default_value = "get=50,put=50")]
    mix: String,
    /// `--mix queue`: producers, each one connection PUTting one job at a time.
    #[arg(long, default_value_t = 8)]
    producers: usize,
    /// `--mix queue`: consumers, each one connection taking one job at a time.
    #[arg(long, default_value_t = 8)]
    consumers: usize,
    /// `--mix queue`: producers wait while this many jobs are acknowledged and not yet taken
    /// (0 = the number of consumers), so the latency measures the hand-off.
    #[arg(long, default_value_t = 0)]
    max_backlog: usize,
    /// `--mix queue`: seconds each take waits for a job.
    #[arg(long, default_value_t = 5.0)]
    take_wait: f64,
    /// Key space for GET/POST (keys k,0 .. k,N-1).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 16)]
    value_size: usize,
    /// Do not insert the key space before measuring.
    #[arg(long)]
    no_preload: bool,
    /// Measured seconds.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also draw the latency percentile curve of each operation into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// How many seeds to run (from --start).
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Replay one seed (prints its faults, violations, and with --verbose every event).
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: print the trace of the run.
    #[arg(long)]
    verbose: bool,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(clap::Args)]
struct NemesisArgs {
    /// The proxy's client SAP.
    #[arg(long, default_value = "127.0.0.1:7400")]
    sap: String,
    /// The proxy's shutdown SAP (STATUS, to find the processes to fault).
    #[arg(long, default_value = "127.0.0.1:7402")]
    admin_sap: String,
    /// Seconds of load.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Concurrent clients (each one connection, one request at a time).
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Keys in the register set (n,0 .. n,K-1).
    #[arg(long, default_value_t = 5)]
    keys: u32,
    /// none, kill-primary, stop-primary, kill-backup, or cmd (--fault-cmd / --heal-cmd).
    #[arg(long, default_value = "none")]
    fault: String,
    /// Seconds after the start when the fault is applied.
    #[arg(long, default_value_t = 10.0)]
    fault_at: f64,
    /// Seconds the fault lasts before it is healed (SIGCONT, --heal-cmd).
    #[arg(long, default_value_t = 10.0)]
    fault_for: f64,
    #[arg(long)]
    fault_cmd: Option<String>,
    #[arg(long)]
    heal_cmd: Option<String>,
    /// A request unanswered after this many seconds is recorded as unknown.
    #[arg(long, default_value_t = 15.0)]
    op_timeout: f64,
    /// Directory for history.jsonl, report.json and timeline.svg.
    #[arg(long, default_value = "nemesis-out")]
    out: PathBuf,
    /// Width in milliseconds of a bucket of timeline.svg (ops/s and latency percentiles).
    #[arg(long, default_value_t = 100)]
    timeline_bucket_ms: u64,
    /// More clients that take the fresh inserts with waiting takes (PROTOCOL.md §4a); the check
    /// adds: none taken twice, none lost, each take linearizable on its key.
    #[arg(long, default_value_t = 0)]
    takers: u32,
    /// Seconds each take waits for a key.
    #[arg(long, default_value_t = 1.0)]
    take_wait: f64,
    /// Print the report as JSON instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Issue one more certificate from the CA in --certs.
    Issue {
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS names or IP addresses (repeatable).
        #[arg(long)]
        san: Vec<String>,
    },
}

fn init_tracing(process: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    tracing::debug!(process, pid = std::process::id(), "starting");
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// The runtime of a service process: `runtime_threads` workers, or a single-threaded runtime for
/// 0 (fewer cross-thread wake-ups; the store and blocking work run on threads of their own).
fn service_runtime(cfg: &Config) -> Result<tokio::runtime::Runtime, String> {
    // Before any thread starts: threads inherit the policy of the thread that creates them.
    if let Err(e) = cfg.cpu_policy.apply() {
        // It changes speed, not behaviour: go on under the policy the process started with.
        tracing::warn!(
            "{e}; running under the policy the process started with (leaving SCHED_IDLE or a real-time policy needs CAP_SYS_NICE or RLIMIT_NICE; a seccomp filter may forbid the call)"
        );
    }
    let mut b = if cfg.runtime_threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cfg.runtime_threads);
        b
    };
    b.enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Where a proxy keeps its durable state unless told otherwise.
const DEFAULT_PROXY_STATE: &str = "data/proxy.state";

fn main() -> ExitCode {
    // A client piped into `head` must end quietly, not panic on a closed stdout.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    let cli = Cli::parse();
    // Needs no configuration file: handled before one is read.
    if let Cmd::Completions { shell } = cli.cmd {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "tuplespace",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tuplespace: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<u8, String> {
    let explicit = cli.config != std::path::Path::new(DEFAULT_CONFIG_PATH);
    let mut overrides = cli.set.clone();
    if let Cmd::Proxy {
        max_clients: Some(n),
        ..
    } = &cli.cmd
    {
        overrides.push(format!("max_clients={n}"));
    }
    let mut cfg =
        Config::load_with(&cli.config, explicit, &overrides).map_err(|e| e.to_string())?;
    if let Cmd::Proxy { state, .. } = &cli.cmd {
        match state.as_deref() {
            Some("none") => cfg.proxy_state_file = None,
            Some(p) => cfg.proxy_state_file = Some(p.into()),
            None if cfg.proxy_state_file.is_none() => {
                cfg.proxy_state_file = Some(DEFAULT_PROXY_STATE.into())
            }
            None => {}
        }
    }
    match cli.cmd {
        Cmd::Proxy {
            client_sap,
            server_sap,
            shutdown_sap,
            ..
        } => {
            init_tracing("proxy");
            let sap = |n: usize, name: &str, s: &str| {
                resolve_sap(s).map_err(|e| format!("argument {n} ({name}): {e}"))
            };
            let saps = tuplespace::proxy::ProxySaps {
                client: sap(1, "CLIENT_SAP", &client_sap)?,
                server: sap(2, "SERVER_SAP", &server_sap)?,
                shutdown: sap(3, "SHUTDOWN_SAP", &shutdown_sap)?,
            };
            let rt = service_runtime(&cfg)?;
            rt.block_on(async {
                let stop = CancellationToken::new();
                let s = stop.clone();
                tokio::spawn(async move {
                    tuplespace::termination_signal().await;
                    s.cancel();
                });
                tuplespace::proxy::run(saps, &cli.certs, cfg, stop).await
            })
            .map_err(|e| e.to_string())?;
            Ok(0)
        }
        Cmd::Server {
            shutdown_sap,
            proxy_sap,
            backup_sap,
            heartbeat_sap,
            save_file,
            primary_handle,
            init_file,
        } => {
            init_tracing("server");
            let args = tuplespace::server::ServerArgs::parse(
                &shutdown_sap,
                &proxy_sap,
                &backup_sap,
                &heartbeat_sap,
                &save_file,
                &primary_handle,
                &init_file,
            )
            .map_err(|e| e.to_string())?;
            let mut args = args;
            args.passthrough = vec!["--certs".into(), cli.certs.display().to_string()];
            if explicit {
                args.passthrough
                    .extend(["--config".into(), cli.config.display().to_string()]);
            }
            for s in &overrides {
                args.passthrough.extend(["--set".into(), s.clone()]);
            }
            let rt = service_runtime(&cfg)?;
            let exit = rt
                .block_on(async {
                    let stop = CancellationToken::new();
                    let s = stop.clone();
                    tokio::spawn(async move {
                        tuplespace::termination_signal().await;
                        s.cancel();
                    });
                    tuplespace::server::run(args, &cli.certs, cfg, stop).await
                })
                .map_err(|e| e.to_string())?;
            tracing::info!(?exit, "server stopped");
            // 3 = deposed or refused: restarting the same command would be refused again
            // (deploy/systemd does not restart on it).
            Ok(match exit {
                tuplespace::server::Exit::Shutdown => 0,
                tuplespace::server::Exit::Fenced => 3,
                _ => 1,
            })
        }
        Cmd::Client {
            sap,
            admin_sap,
            json,
            cert,
            command,
        } => {
            if std::env::var_os("RUST_LOG").is_some() {
                init_tracing("client");
            }
            let cert_role = match CertRole::parse(&cert) {
                Some(r @ (CertRole::Client | CertRole::Admin)) => r,
                _ => return Err(format!("--cert must be client or admin, not `{cert}`")),
            };
            let opts = tuplespace::client::cli::CliOptions {
                client_sap: sap,
                shutdown_sap: admin_sap,
                certs: cli.certs,
                cert_role,
                json,
                config: cfg,
            };
            let rt = runtime()?;
            let code = if command.is_empty() {
                tuplespace::client::cli::run_interactive(&rt, opts)
            } else {
                tuplespace::client::cli::run_once(&rt, opts, &command)
            };
            Ok(code as u8)
        }
        Cmd::Certs {
            action,
            out,
            san,
            force,
        } => {
            match action {
                None => {
                    let dir = out.unwrap_or(cli.certs);
                    tls::create_cluster(&dir, &san, force).map_err(|e| e.to_string())?;
                    println!(
                        "created development CA and client/admin/node certificates in {} (private keys: *.key, keep them private)",
                        dir.display()
                    );
                }
                Some(CertsCmd::Issue {
                    role,
                    name,
                    out,
                    san,
                }) => {
                    let role = CertRole::parse(&role).ok_or_else(|| {
                        format!("--role must be client, admin or node, not `{role}`")
                    })?;
                    tls::issue(&cli.certs, role, &name, &san, &out).map_err(|e| e.to_string())?;
                    println!(
                        "issued a {} certificate `{name}` into {} ({}.pem, {}.key, ca.pem)",
                        role.as_str(),
                        out.display(),
                        role.as_str(),
                        role.as_str()
                    );
                }
            }
            Ok(0)
        }
        Cmd::Bench(b) if b.mix == "queue" => {
            let opts = tuplespace::bench::QueueOptions {
                sap: b.sap,
                certs: cli.certs,
                producers: b.producers.max(1),
                consumers: b.consumers.max(1),
                value_size: b.value_size.max(1),
                duration: std::time::Duration::from_secs_f64(b.duration.max(0.1)),
                take_wait: std::time::Duration::from_secs_f64(b.take_wait.max(0.001)),
                max_backlog: b.max_backlog,
            };
            let rt = runtime()?;
            let report = rt.block_on(tuplespace::bench::run_queue(opts, cfg))?;
            if b.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", tuplespace::bench::queue_table(&report));
            }
            Ok(if report.exactly_once() { 0 } else { 1 })
        }
        Cmd::Bench(b) => {
            let mix = tuplespace::bench::parse_mix(&b.mix)?;
            let opts = tuplespace::bench::BenchOptions {
                sap: b.sap,
                certs: cli.certs,
                connections: b.connections.max(1),
                pipeline: b.pipeline.max(1),
                mix,
                keys: b.keys.max(1),
                value_size: b.value_size.max(1),
                preload: !b.no_preload,
                duration: std::time::Duration::from_secs_f64(b.duration.max(0.1)),
                warmup: std::time::Duration::from_secs_f64(b.warmup.max(0.0)),
                json: b.json,
            };
            let rt = runtime()?;
            let report = rt.block_on(tuplespace::bench::run(opts, cfg))?;
            if let Some(path) = &b.plot {
                let title = format!(
                    "tuplespace bench: {} connections x {} in flight, {}, {:.0} s, {:.0} ops/s",
                    report.connections,
                    report.pipeline,
                    b.mix,
                    report.seconds,
                    report.total_ops_per_sec
                );
                let svg = tuplespace::plot::percentile_svg(&title, &report.curves)
                    .map_err(|e| e.to_string())?;
                tuplespace::plot::write(path, &svg).map_err(|e| e.to_string())?;
            }
            if b.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", tuplespace::bench::table(&report));
            }
            Ok(0)
        }
        Cmd::Nemesis(n) => {
            use tuplespace::nemesis::runner;
            let secs = |x: f64| std::time::Duration::from_secs_f64(x.max(0.0));
            let opts = runner::NemesisOptions {
                sap: n.sap,
                admin_sap: n.admin_sap,
                certs: cli.certs,
                duration: secs(n.duration),
                clients: n.clients.max(1),
                keys: n.keys.max(1),
                fault: runner::Fault::parse(&n.fault)?,
                fault_at: secs(n.fault_at),
                fault_for: secs(n.fault_for),
                fault_cmd: n.fault_cmd,
                heal_cmd: n.heal_cmd,
                op_timeout: secs(n.op_timeout.max(0.1)),
                out: n.out,
                timeline_bucket: std::time::Duration::from_millis(n.timeline_bucket_ms.max(1)),
                takers: n.takers,
                take_wait: secs(n.take_wait),
            };
            let rt = runtime()?;
            let report = rt.block_on(runner::run(opts, cfg))?;
            if n.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", runner::summary(&report));
            }
            Ok(if report.verdict == "PASS" { 0 } else { 1 })
        }
        Cmd::Simulate(a) => {
            use tuplespace::sim;
            let mut params = sim::SimParams::default();
            if let Some(seed) = a.seed {
                params.trace = a.verbose;
                let r = sim::run(seed, &params, &sim::Plan::Random);
                print!("{}", r.describe());
                println!("{}", if r.ok() { "PASS" } else { "FAIL" });
                return Ok(if r.ok() { 0 } else { 1 });
            }
            let threads = if a.threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                a.threads
            };
            let t0 = std::time::Instant::now();
            let progress = |d: u64| {
                eprintln!("  {d} seeds ({:.0} s)", t0.elapsed().as_secs_f64());
            };
            let (ran, failures) = sim::run_many(a.start, a.seeds, threads, &params, 20, &progress);
            for (_, r) in &failures {
                print!("{}", r.describe());
            }
            println!(
                "simulated seeds {}..{}: {ran} runs, {} failing, {:.1} s on {threads} threads{}",
                a.start,
                a.start + a.seeds,
                failures.len(),
                t0.elapsed().as_secs_f64(),
                if failures.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; replay one with: tuplespace simulate --seed {} --verbose",
                        failures[0].0
                    )
                }
            );
            Ok(if failures.is_empty() { 0 } else { 1 })
        }
        Cmd::Up {
            client_sap,
            server_sap,
            shutdown_sap,
            primary_sap,
            backup_sap,
            heartbeat_sap,
            save_file,
            metrics_sap,
            primary_metrics_sap,
            backup_metrics_sap,
        } => {
            init_tracing("up");
            let off = |s: String| if s == "none" { String::new() } else { s };
            let opts = tuplespace::up::UpOptions {
                client_sap,
                server_sap,
                shutdown_sap,
                primary_shutdown_sap: primary_sap,
                backup_sap,
                heartbeat_sap,
                metrics_sap: off(metrics_sap),
                primary_metrics_sap: off(primary_metrics_sap),
                backup_metrics_sap: off(backup_metrics_sap),
                save_file,
                certs: cli.certs,
                config_path: explicit.then_some(cli.config),
                overrides: cli.set,
            };
            let rt = runtime()?;
            let code = rt
                .block_on(tuplespace::up::run(opts, cfg))
                .map_err(|e| e.to_string())?;
            Ok(code as u8)
        }
        Cmd::Completions { .. } => Ok(0), // printed in main
    }
}
