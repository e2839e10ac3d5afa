//! `tuplespace bench`: closed-loop load against a running service. C connections, each with one
//! long-lived stream and P requests in flight; an operation mix over a key space; HDR histograms
//! per operation; a progress bar; a readable table or `--json`; with `--plot FILE.svg` the
//! latency percentile curve of each operation (see [`crate::plot::percentile_svg`]). `--mix queue`
//! runs the work-queue benchmark instead ([`run_queue`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ciborium::Value;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::Config;
use crate::net::endpoint::{self, LinkParams};
use crate::net::stream::{FramedRecv, FramedSend};
use crate::net::tls::{CertRole, Identity};
use crate::wire::CLIENT_ALPN;
use crate::wire::client::{Response, Status, request_value};
use crate::wire::frame;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub sap: String,
    pub certs: PathBuf,
    pub connections: usize,
    pub pipeline: usize,
    /// Percentages of GET, PUT, POST, DELETE (sum 100).
    pub mix: [u32; 4],
    pub keys: u64,
    pub value_size: usize,
    pub preload: bool,
    pub duration: Duration,
    pub warmup: Duration,
    pub json: bool,
}

const OPS: [&str; 4] = ["GET", "PUT", "POST", "DELETE"];

/// Parses `get=50,put=50`.
pub fn parse_mix(s: &str) -> Result<[u32; 4], String> {
    let mut mix = [0u32; 4];
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected OP=PERCENT"))?;
        let i = OPS
            .iter()
            .position(|o| o.eq_ignore_ascii_case(k.trim()))
            .ok_or_else(|| format!("unknown operation `{k}` (get, put, post, delete)"))?;
        mix[i] = v
            .trim()
            .parse()
            .map_err(|_| format!("`{v}` is not a percentage"))?;
    }
    if mix.iter().sum::<u32>() != 100 {
        return Err(format!(
            "the mix must add up to 100 (got {})",
            mix.iter().sum::<u32>()
        ));
    }
    Ok(mix)
}

#[derive(Debug, Serialize)]
pub struct OpReport {
    pub op: String,
    pub count: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub connections: usize,
    pub pipeline: usize,
    pub seconds: f64,
    pub total_ops_per_sec: f64,
    pub errors: u64,
    pub ops: Vec<OpReport>,
    /// Latency at increasing percentiles per operation, for `--plot` (not in the JSON).
    #[serde(skip)]
    pub curves: Vec<crate::plot::Curve>,
}

/// Steps of the percentile curve on the "nines" scale (0.05: 20 points per factor of ten).
const CURVE_STEP: f64 = 0.05;
/// The curve stops at 99.9999 % (or earlier: at the last recorded sample).
const CURVE_MAX_NINES: f64 = 6.0;

/// The latency (µs) at percentiles from 0 % up to the one the sample count supports.
fn curve(op: &str, h: &Histogram<u64>) -> crate::plot::Curve {
    let top = (h.len().max(1) as f64).log10().min(CURVE_MAX_NINES);
    let steps = (top / CURVE_STEP).floor() as usize;
    let points = (0..=steps)
        .map(|i| i as f64 * CURVE_STEP)
        .chain(std::iter::once(top))
        .map(|x| {
            let q = 1.0 - 10f64.powf(-x);
            (q, h.value_at_quantile(q))
        })
        .collect();
    crate::plot::Curve {
        op: op.to_owned(),
        points,
    }
}

fn value_of(size: usize, seed: u64) -> String {
    let base = format!("v{seed}");
    let mut s = base.repeat(size / base.len().max(1) + 1);
    s.truncate(size.max(1));
    s
}

fn pair(k: &str, v: &str) -> Value {
    let t = |s: &str| Value::Array(s.split(',').map(|e| Value::Text(e.to_owned())).collect());
    Value::Array(vec![t(k), t(v)])
}

struct Conn {
    send: FramedSend,
    recv: FramedRecv,
    _conn: quinn::Connection,
    _ep: quinn::Endpoint,
}

async fn open(o: &BenchOptions, cfg: &Config) -> Result<Conn, String> {
    let addr = endpoint::resolve_sap(&o.sap).map_err(|e| e.to_string())?;
    let id = Identity::load(&o.certs, CertRole::Client.as_str()).map_err(|e| e.to_string())?;
    let params = LinkParams {
        idle_timeout: cfg.idle_timeout(),
        keep_alive: Some(cfg.keep_alive()),
        max_bidi_streams: 0,
        udp_buffer_bytes: cfg.udp_buffer_bytes,
    };
    let ep = endpoint::client_endpoint(addr, &params).map_err(|e| e.to_string())?;
    let cc = endpoint::client_config(&id, CLIENT_ALPN, &params).map_err(|e| e.to_string())?;
    let conn = endpoint::connect(
        &ep,
        cc,
        addr,
        &endpoint::sap_host(&o.sap),
        cfg.connect_timeout(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let (s, r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    Ok(Conn {
        send: FramedSend::new(s),
        recv: FramedRecv::new(r, cfg.max_response_bytes),
        _conn: conn,
        _ep: ep,
    })
}

struct Worker {
    hist: [Histogram<u64>; 4],
    errors: u64,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits; the bounds are constants, so creation cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("histogram with 3 significant digits"))
}

async fn worker(
    o: Arc<BenchOptions>,
    cfg: Arc<Config>,
    wid: usize,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Result<Worker, String> {
    let mut c = open(&o, &cfg).await?;
    let mut w = Worker {
        hist: [new_hist(), new_hist(), new_hist(), new_hist()],
        errors: 0,
    };
    let mut inflight: HashMap<u64, (usize, Instant)> = HashMap::with_capacity(o.pipeline * 2);
    let mut next_id = 1u64;
    let mut rng = (wid as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut fresh = 0u64;
    let mut issue = |c: &mut Conn, inflight: &mut HashMap<u64, (usize, Instant)>| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let roll = (rng % 100) as u32;
        let mut acc = 0;
        let mut op = 0;
        for (i, p) in o.mix.iter().enumerate() {
            acc += p;
            if roll < acc {
                op = i;
                break;
            }
        }
        let k = (rng >> 16) % o.keys.max(1);
        let args = match op {
            0 => Value::Array(vec![
                Value::Text(format!("k,{k}")),
                Value::Text(".*".into()),
            ]),
            1 => {
                fresh += 1;
                Value::Array(vec![pair(
                    &format!("b{wid},{fresh}"),
                    &value_of(o.value_size, fresh),
                )])
            }
            2 => Value::Array(vec![pair(&format!("k,{k}"), &value_of(o.value_size, rng))]),
            _ => Value::Array(vec![
                Value::Text(format!("b{wid},{}", fresh.saturating_sub(1))),
                Value::Text(".*".into()),
            ]),
        };
        let id = next_id;
        next_id += 1;
        c.send.queue(&request_value(id, OPS[op], Some(args)));
        inflight.insert(id, (op, Instant::now()));
    };
    for _ in 0..o.pipeline {
        issue(&mut c, &mut inflight);
    }
    c.send.flush().await.map_err(|e| e.to_string())?;
    while !inflight.is_empty() {
        let first = match tokio::time::timeout(
            cfg.request_timeout() + Duration::from_secs(5),
            c.recv.next(),
        )
        .await
        {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => return Err("the service closed the stream".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no answer within the request timeout".into()),
        };
        let mut body = Some(first);
        while let Some(b) = body {
            let resp = frame::decode_value(&b)
                .ok()
                .and_then(|v| Response::from_value(&v));
            match resp {
                Some(r) => {
                    if let Some((op, t0)) = r.id.and_then(|id| inflight.remove(&id)) {
                        if r.status != Status::Ok {
                            w.errors += 1;
                        }
                        if measuring.load(Ordering::Relaxed) {
                            let us = t0.elapsed().as_micros().max(1) as u64;
                            let _ = w.hist[op].record(us.min(60_000_000));
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                None => w.errors += 1,
            }
            if !stop.load(Ordering::Relaxed) {
                issue(&mut c, &mut inflight);
            }
            body = c.recv.try_next().ok().flatten();
        }
        c.send.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(w)
}

async fn preload(o: &BenchOptions, cfg: &Config) -> Result<(), String> {
    let mut c = open(o, cfg).await?;
    // Up to 1,000 pairs a request, and within half of `max_request_bytes` (a pair's key and
    // framing take well under 64 bytes).
    let per_pair = o.value_size as u64 + 64;
    let batch = (cfg.max_request_bytes as u64 / 2 / per_pair).clamp(1, 1000);
    let mut id = 1;
    let mut start = 0;
    while start < o.keys {
        let end = (start + batch).min(o.keys);
        let pairs = (start..end)
            .map(|k| pair(&format!("k,{k}"), &value_of(o.value_size, k)))
            .collect();
        c.send
            .queue(&request_value(id, "PUT", Some(Value::Array(pairs))));
        id += 1;
        start = end;
    }
    c.send.flush().await.map_err(|e| e.to_string())?;
    for _ in 1..id {
        match c.recv.next().await {
            Ok(Some(_)) => {}
            _ => return Err("preload interrupted".into()),
        }
    }
    Ok(())
}

/// Runs the benchmark and prints the report. Returns the report.
pub async fn run(o: BenchOptions, cfg: Config) -> Result<BenchReport, String> {
    let o = Arc::new(o);
    let cfg = Arc::new(cfg);
    if o.preload {
        if !o.json {
            eprintln!("preloading {} keys...", o.keys);
        }
        preload(&o, &cfg).await?;
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for wid in 0..o.connections {
        tasks.push(tokio::spawn(worker(
            o.clone(),
            cfg.clone(),
            wid,
            measuring.clone(),
            stop.clone(),
            done.clone(),
        )));
    }
    tokio::time::sleep(o.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let bar = if o.json {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(o.duration.as_secs().max(1));
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len}s {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    };
    while t0.elapsed() < o.duration {
        tokio::time::sleep(Duration::from_millis(250).min(o.duration)).await;
        let secs = t0.elapsed().as_secs_f64();
        bar.set_position(secs as u64);
        bar.set_message(format!(
            "{:.0} ops/s",
            done.load(Ordering::Relaxed) as f64 / secs.max(0.001)
        ));
    }
    measuring.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    bar.finish_and_clear();
    let mut hist = [new_hist(), new_hist(), new_hist(), new_hist()];
    let mut errors = 0;
    for t in tasks {
        let w = t.await.map_err(|e| e.to_string())??;
        for (h, wh) in hist.iter_mut().zip(w.hist.iter()) {
            let _ = h.add(wh);
        }
        errors += w.errors;
    }
    let ops: Vec<OpReport> = hist
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.is_empty())
        .map(|(i, h)| OpReport {
            op: OPS[i].into(),
            count: h.len(),
            ops_per_sec: h.len() as f64 / secs,
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        })
        .collect();
    let curves = hist
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.is_empty())
        .map(|(i, h)| curve(OPS[i], h))
        .collect();
    let total: u64 = ops.iter().map(|r| r.count).sum();
    Ok(BenchReport {
        connections: o.connections,
        pipeline: o.pipeline,
        seconds: secs,
        total_ops_per_sec: total as f64 / secs,
        errors,
        ops,
        curves,
    })
}

/// The report as a readable table.
pub fn table(r: &BenchReport) -> String {
    let mut s = format!(
        "connections {} x pipeline {}, {:.1} s, {:.0} ops/s total, {} errors\n{:<7} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9}\n",
        r.connections,
        r.pipeline,
        r.seconds,
        r.total_ops_per_sec,
        r.errors,
        "op",
        "count",
        "ops/s",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "max µs"
    );
    for o in &r.ops {
        s.push_str(&format!(
            "{:<7} {:>10} {:>12.0} {:>9} {:>9} {:>9} {:>9}\n",
            o.op, o.count, o.ops_per_sec, o.p50_us, o.p99_us, o.p999_us, o.max_us
        ));
    }
    s
}

/// The work-queue benchmark (`bench --mix queue`): P producers PUT job tuples one at a time, C
/// consumers take them with `limit` 1 and a wait (PROTOCOL.md §4a).
#[derive(Clone, Debug)]
pub struct QueueOptions {
    pub sap: String,
    pub certs: PathBuf,
    pub producers: usize,
    pub consumers: usize,
    pub value_size: usize,
    /// How long producers produce (measured).
    pub duration: Duration,
    /// How long each take waits for a job.
    pub take_wait: Duration,
    /// A producer waits while this many jobs are acknowledged and not yet taken (so the latency
    /// measures the hand-off, not a queue that grows when producers are faster); 0 = consumers.
    pub max_backlog: usize,
}

#[derive(Debug, Serialize)]
pub struct QueueReport {
    pub producers: usize,
    pub consumers: usize,
    pub max_backlog: usize,
    pub seconds: f64,
    /// Jobs taken per second while the producers ran.
    pub jobs_per_sec: f64,
    /// Jobs whose PUT was acknowledged.
    pub jobs_put: u64,
    /// Jobs answered to a take (those taken after the producers stopped included).
    pub jobs_taken: u64,
    /// From the PUT's acknowledgement (as its producer saw it) to the take's answer (as its
    /// consumer saw it); a take answered before the producer read the acknowledgement counts 0.
    pub ack_to_take_p50_us: u64,
    pub ack_to_take_p99_us: u64,
    pub ack_to_take_max_us: u64,
    /// Takes answered before their PUT's acknowledgement reached the producer.
    pub taken_before_ack: u64,
    /// From sending the PUT to the take's answer.
    pub put_to_take_p50_us: u64,
    pub put_to_take_p99_us: u64,
    /// Jobs returned by two takes / acknowledged but neither taken nor left in the space / taken
    /// but never sent (each must be 0).
    pub taken_twice: u64,
    pub lost: u64,
    pub phantom: u64,
    /// Requests answered with another status than `ok`, or not answered.
    pub errors: u64,
}

impl QueueReport {
    /// Every job taken exactly once, none from nowhere.
    pub fn exactly_once(&self) -> bool {
        self.taken_twice == 0 && self.lost == 0 && self.phantom == 0
    }
}

/// Runs the work-queue benchmark against a running service. Job keys are `RUN,T,pP,N` with `T`
/// the microseconds since the start when the PUT was sent, so a take (the first match in key
/// order) gets the oldest job. After the producers stop, one stop job per consumer (above every
/// job in key order) ends each consumer once the queue is drained.
pub async fn run_queue(o: QueueOptions, cfg: Config) -> Result<QueueReport, String> {
    use crate::client::{Client, Request};
    use std::collections::HashSet;
    use std::sync::Mutex;
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
    let o = Arc::new(o);
    let backlog = if o.max_backlog == 0 {
        o.consumers
    } else {
        o.max_backlog
    };
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let prefix = format!("queue{run}");
    let connect = |o: Arc<QueueOptions>, cfg: Config| async move {
        Client::connect(&o.sap, &o.certs, CertRole::Client, &cfg)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", o.sap))
    };
    let start = Instant::now();
    let micros = move || start.elapsed().as_micros() as u64;
    // job -> (µs when its PUT was sent, µs of its acknowledgement)
    let acked: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    let sent: Arc<Mutex<HashSet<String>>> = Arc::default();
    // (job, µs of the take's answer)
    let taken: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let room = Arc::new(tokio::sync::Semaphore::new(backlog));
    let take = Request::take(&format!("{prefix},.*"), ".*").wait(o.take_wait);
    let mut consumers = Vec::new();
    for c in 0..o.consumers {
        let mut cl = connect(o.clone(), cfg.clone()).await?;
        let (taken, errors, take, room) =
            (taken.clone(), errors.clone(), take.clone(), room.clone());
        consumers.push(tokio::spawn(async move {
            loop {
                match cl.call(&take).await {
                    Ok(r) if r.status == Status::Ok => {
                        let at = micros();
                        match r.pairs.as_deref() {
                            Some([p]) if p.key.ends_with(",stop") => break,
                            Some([p]) => {
                                room.add_permits(1);
                                lock(&taken).push((p.key.clone(), at));
                            }
                            _ => {}
                        }
                    }
                    Ok(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("consumer {c}: {e}");
                        break;
                    }
                }
            }
            cl.close();
        }));
    }
    let value = value_of(o.value_size, 7);
    let end = start + o.duration;
    let mut producers = Vec::new();
    for p in 0..o.producers {
        let mut cl = connect(o.clone(), cfg.clone()).await?;
        let (acked, sent, errors, prefix, value, room) = (
            acked.clone(),
            sent.clone(),
            errors.clone(),
            prefix.clone(),
            value.clone(),
            room.clone(),
        );
        producers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                // The producers run until `end` (the measured time), at most `backlog` jobs ahead.
                match tokio::time::timeout_at(end.into(), room.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => break,
                }
                n += 1;
                let at = micros();
                let key = format!("{prefix},{at:012},p{p},{n}");
                lock(&sent).insert(key.clone());
                match cl
                    .call(&Request::put([(key.as_str(), value.as_str())]))
                    .await
                {
                    Ok(r)
                        if r.status == Status::Ok
                            && r.rejected.as_ref().is_none_or(|x| x.is_empty()) =>
                    {
                        lock(&acked).insert(key, (at, micros()));
                    }
                    Ok(_) => {
                        // Not applied: its room is free again.
                        room.add_permits(1);
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("producer {p}: {e}");
                        break;
                    }
                }
            }
            cl.close();
        }));
    }
    for p in producers {
        p.await.map_err(|e| e.to_string())?;
    }
    let secs = start.elapsed().as_secs_f64();
    let taken_by_then = lock(&taken).len();
    let mut cl = connect(o.clone(), cfg.clone()).await?;
    // One stop job per consumer, above every job in key order (digits sort before `z`).
    let stops: Vec<(String, &str)> = (0..o.consumers)
        .map(|c| (format!("{prefix},z{c},stop"), "x"))
        .collect();
    let r = cl
        .call(&Request::put(stops))
        .await
        .map_err(|e| e.to_string())?;
    if r.status != Status::Ok {
        return Err(format!("the stop jobs were not put: {r:?}"));
    }
    for c in consumers {
        c.await.map_err(|e| e.to_string())?;
    }
    let left = cl
        .call(&Request::get(&format!("{prefix},.*"), ".*"))
        .await
        .map_err(|e| e.to_string())?;
    // Remove what is left (stop jobs of consumers that failed).
    let _ = cl
        .call(&Request::delete(&format!("{prefix},.*"), ".*"))
        .await;
    cl.close();
    let left: HashSet<String> = left
        .pairs
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.key)
        .collect();
    let acked = std::mem::take(&mut *lock(&acked));
    let sent = std::mem::take(&mut *lock(&sent));
    let taken = std::mem::take(&mut *lock(&taken));
    let (mut ack_hist, mut put_hist) = (new_hist(), new_hist());
    let mut seen = HashSet::new();
    let (mut twice, mut before_ack, mut phantom) = (0, 0, 0);
    for (k, at) in &taken {
        if !seen.insert(k.as_str()) {
            twice += 1;
        }
        match acked.get(k) {
            Some((put, ack)) => {
                if at < ack {
                    before_ack += 1;
                }
                let _ = ack_hist.record(at.saturating_sub(*ack).max(1));
                let _ = put_hist.record(at.saturating_sub(*put).max(1));
            }
            // Sent, answered otherwise (or not at all), and applied: not a phantom.
            None if sent.contains(k) => {}
            None => phantom += 1,
        }
    }
    let lost = acked
        .keys()
        .filter(|k| !seen.contains(k.as_str()) && !left.contains(*k))
        .count() as u64;
    Ok(QueueReport {
        producers: o.producers,
        consumers: o.consumers,
        max_backlog: backlog,
        seconds: secs,
        jobs_per_sec: taken_by_then as f64 / secs,
        jobs_put: acked.len() as u64,
        jobs_taken: taken.len() as u64,
        ack_to_take_p50_us: ack_hist.value_at_quantile(0.5),
        ack_to_take_p99_us: ack_hist.value_at_quantile(0.99),
        ack_to_take_max_us: ack_hist.max(),
        taken_before_ack: before_ack,
        put_to_take_p50_us: put_hist.value_at_quantile(0.5),
        put_to_take_p99_us: put_hist.value_at_quantile(0.99),
        taken_twice: twice,
        lost,
        phantom,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// The queue report as text.
pub fn queue_table(r: &QueueReport) -> String {
    format!(
        "work queue: {} producers, {} consumers (backlog <= {}), {:.1} s\n  {:.0} jobs/s taken ({} put, {} taken)\n  PUT ack -> take answer: p50 {} us, p99 {} us, max {} us ({} taken before the ack arrived)\n  PUT sent -> take answer: p50 {} us, p99 {} us\n  exactly once: {} (taken twice {}, lost {}, phantom {}); errors {}\n",
        r.producers,
        r.consumers,
        r.max_backlog,
        r.seconds,
        r.jobs_per_sec,
        r.jobs_put,
        r.jobs_taken,
        r.ack_to_take_p50_us,
        r.ack_to_take_p99_us,
        r.ack_to_take_max_us,
        r.taken_before_ack,
        r.put_to_take_p50_us,
        r.put_to_take_p99_us,
        if r.exactly_once() { "yes" } else { "NO" },
        r.taken_twice,
        r.lost,
        r.phantom,
        r.errors
    )
}
