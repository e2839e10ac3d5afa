//! Work-queue load against Redis over mutual TLS, with the guarantee tuplespace gives a take:
//! P producers `LPUSH` a job and `WAIT 1` (acknowledged once a replica has it), C consumers take
//! one job with `BRPOP` (or `BLMOVE` into a processing list) and `WAIT 1` (the take is on the
//! replica before it counts). Reports jobs/s, the latency from a job's acknowledgement to its
//! take (p50/p99; 0 when the take was answered first) and from the LPUSH being sent, and checks that every acknowledged job was taken exactly once.
//!
//! Built and run by `scripts/redis-queue-bench.sh`, which starts the Redis pair.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use redis::{AsyncCommands, Client, ClientTlsConfig, TlsCertificates};
use tokio::sync::Mutex;

#[derive(Parser, Debug, Clone)]
#[command(about = "Work-queue load against Redis over mutual TLS (LPUSH+WAIT 1 / BRPOP+WAIT 1)")]
struct Args {
    /// Redis URL (rediss://HOST:PORT)
    #[arg(long, default_value = "rediss://localhost:6390")]
    url: String,
    /// CA certificate (PEM) the server's certificate is checked against
    #[arg(long)]
    ca: String,
    /// Client certificate (PEM)
    #[arg(long)]
    cert: String,
    /// Client key (PEM)
    #[arg(long)]
    key: String,
    /// Producers (one connection each, one job at a time)
    #[arg(short = 'p', long, default_value_t = 8)]
    producers: usize,
    /// Consumers (one connection each, one take at a time)
    #[arg(short = 'c', long, default_value_t = 8)]
    consumers: usize,
    /// Seconds of load
    #[arg(short = 'd', long, default_value_t = 10.0)]
    seconds: f64,
    /// Take with BLMOVE into a processing list instead of BRPOP
    #[arg(long)]
    blmove: bool,
    /// Replicas WAIT asks for
    #[arg(long, default_value_t = 1)]
    replicas: i64,
    /// Most jobs acknowledged but not yet taken: a producer waits for a take before it adds more
    /// (0 = as many as there are consumers). Without a bound the queue grows whenever producers
    /// are faster, and the latency measures the backlog, not the hand-off.
    #[arg(long, default_value_t = 0)]
    max_backlog: usize,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

const QUEUE: &str = "rq:jobs";
const TAKEN: &str = "rq:taken";
/// Longest a WAIT may take before the job counts as not replicated (milliseconds).
const WAIT_MS: i64 = 2000;
/// A consumer's blocking take gives up after this long and tries again (seconds).
const BLOCK_S: f64 = 0.2;
/// After the load, consumers drain the queue for at most this long.
const DRAIN: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Shared {
    /// Job -> (its LPUSH sent, its WAIT returned).
    acked: HashMap<String, (Instant, Instant)>,
    taken: HashMap<String, (Instant, u32)>,
    unreplicated_puts: u64,
    unreplicated_takes: u64,
    errors: u64,
}

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn connect(client: &Client) -> R<redis::aio::MultiplexedConnection> {
    let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(Duration::from_secs(30));
    Ok(client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?)
}

async fn wait_replicated(c: &mut redis::aio::MultiplexedConnection, n: i64) -> R<bool> {
    let got: i64 = redis::cmd("WAIT")
        .arg(n)
        .arg(WAIT_MS)
        .query_async(c)
        .await?;
    Ok(got >= n)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> R<()> {
    let a = Args::parse();
    // One crypto provider for rustls (the redis crate leaves the choice to the program).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = TlsCertificates {
        client_tls: Some(ClientTlsConfig {
            client_cert: std::fs::read(&a.cert)?,
            client_key: std::fs::read(&a.key)?,
        }),
        root_cert: Some(std::fs::read(&a.ca)?),
    };
    let client = Client::build_with_tls(a.url.as_str(), certs)?;
    let mut admin = connect(&client).await?;
    let _: () = admin.del(&[QUEUE, TAKEN]).await?;

    let shared = Arc::new(Mutex::new(Shared::default()));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.seconds);
    let producing = Arc::new(std::sync::atomic::AtomicBool::new(true));

    let backlog = if a.max_backlog == 0 {
        a.consumers
    } else {
        a.max_backlog
    };
    let room = Arc::new(tokio::sync::Semaphore::new(backlog));

    let mut producers = Vec::new();
    for p in 0..a.producers {
        let mut c = connect(&client).await?;
        let shared = shared.clone();
        let replicas = a.replicas;
        let room = room.clone();
        producers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                match tokio::time::timeout_at(end.into(), room.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => break,
                }
                n += 1;
                let job = format!("{p}:{n}");
                let sent = Instant::now();
                let r: R<bool> = async {
                    let _: i64 = c.lpush(QUEUE, &job).await?;
                    wait_replicated(&mut c, replicas).await
                }
                .await;
                let now = Instant::now();
                let mut s = shared.lock().await;
                match r {
                    Ok(ok) => {
                        if !ok {
                            s.unreplicated_puts += 1;
                        }
                        s.acked.insert(job, (sent, now));
                    }
                    Err(_) => s.errors += 1,
                }
            }
        }));
    }
    let mut consumers = Vec::new();
    for _ in 0..a.consumers {
        let mut c = connect(&client).await?;
        let shared = shared.clone();
        let producing = producing.clone();
        let room = room.clone();
        let (blmove, replicas) = (a.blmove, a.replicas);
        consumers.push(tokio::spawn(async move {
            let mut idle_since: Option<Instant> = None;
            loop {
                let r: R<Option<String>> = async {
                    let job: Option<String> = if blmove {
                        redis::cmd("BLMOVE")
                            .arg(QUEUE)
                            .arg(TAKEN)
                            .arg("RIGHT")
                            .arg("LEFT")
                            .arg(BLOCK_S)
                            .query_async(&mut c)
                            .await?
                    } else {
                        let r: Option<(String, String)> = c.brpop(QUEUE, BLOCK_S).await?;
                        r.map(|(_, v)| v)
                    };
                    if let Some(job) = job {
                        let ok = wait_replicated(&mut c, replicas).await?;
                        if !ok {
                            shared.lock().await.unreplicated_takes += 1;
                        }
                        return Ok(Some(job));
                    }
                    Ok(None)
                }
                .await;
                let now = Instant::now();
                match r {
                    Ok(Some(job)) => {
                        idle_since = None;
                        room.add_permits(1);
                        let mut s = shared.lock().await;
                        let e = s.taken.entry(job).or_insert((now, 0));
                        e.1 += 1;
                    }
                    Ok(None) => {
                        let since = *idle_since.get_or_insert(now);
                        if !producing.load(std::sync::atomic::Ordering::Acquire)
                            && now.duration_since(since) >= Duration::from_millis(500)
                        {
                            return;
                        }
                    }
                    Err(_) => shared.lock().await.errors += 1,
                }
                if now > end + DRAIN {
                    return;
                }
            }
        }));
    }
    for p in producers {
        p.await?;
    }
    let produced_at = Instant::now();
    producing.store(false, std::sync::atomic::Ordering::Release);
    for c in consumers {
        c.await?;
    }
    let s = shared.lock().await;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut from_sent = hist.clone();
    let (mut lost, mut dup, mut taken_in_window) = (0u64, 0u64, 0u64);
    for (job, (sent, acked)) in &s.acked {
        match s.taken.get(job) {
            None => lost += 1,
            Some((t, n)) => {
                if *n > 1 {
                    dup += 1;
                }
                hist.saturating_record(t.saturating_duration_since(*acked).as_micros() as u64);
                from_sent.saturating_record(t.saturating_duration_since(*sent).as_micros() as u64);
            }
        }
    }
    for (t, _) in s.taken.values() {
        if *t <= end {
            taken_in_window += 1;
        }
    }
    let secs = a.seconds;
    let jobs_per_sec = taken_in_window as f64 / secs;
    let out = serde_json::json!({
        "system": "redis",
        "producers": a.producers,
        "consumers": a.consumers,
        "seconds": secs,
        "max_backlog": backlog,
        "take": if a.blmove { "BLMOVE+WAIT" } else { "BRPOP+WAIT" },
        "jobs_acked": s.acked.len(),
        "jobs_taken": s.taken.len(),
        "jobs_per_sec": jobs_per_sec.round(),
        "latency_p50_us": hist.value_at_quantile(0.5),
        "latency_p99_us": hist.value_at_quantile(0.99),
        "latency_max_us": hist.max(),
        "put_sent_to_take_p50_us": from_sent.value_at_quantile(0.5),
        "put_sent_to_take_p99_us": from_sent.value_at_quantile(0.99),
        "lost": lost,
        "taken_twice": dup,
        "unreplicated_puts": s.unreplicated_puts,
        "unreplicated_takes": s.unreplicated_takes,
        "errors": s.errors,
        "drain_ms": produced_at.elapsed().as_millis() as u64,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "redis {}x{} ({}, backlog <= {}), {:.1} s: {:.0} jobs/s taken; ack->take p50 {} us, p99 {} us (LPUSH sent->take p50 {} us, p99 {} us); {} acked, {} taken, {} lost, {} taken twice, {} errors",
            a.producers,
            a.consumers,
            out["take"].as_str().unwrap_or(""),
            backlog,
            secs,
            jobs_per_sec,
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.99),
            from_sent.value_at_quantile(0.5),
            from_sent.value_at_quantile(0.99),
            s.acked.len(),
            s.taken.len(),
            lost,
            dup,
            s.errors
        );
    }
    if lost > 0 || dup > 0 {
        std::process::exit(1);
    }
    Ok(())
}
