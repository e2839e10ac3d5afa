//! A client program on the `tuplespace::client` library: connects with certificates, pipelines
//! PUTs, reads them back, and handles every status and every close code.
//!
//! With `tuplespace up` running in this directory (it creates `certs/`):
//!
//! ```sh
//! cargo run --release --example client                 # 1000 PUTs, 64 in flight
//! cargo run --release --example client -- --count 10000 --in-flight 512 --sap 127.0.0.1:7400
//! ```
//!
//! Exit status: 0 when every step got the answer it expected, 1 otherwise, 2 when the service
//! could not be reached or closed the connection.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use tuplespace::client::{CertRole, Client, ClientError, CloseCode, Request, Response, Status};
use tuplespace::config::Config;

#[derive(Parser)]
#[command(about = "Example client of the tuplespace library")]
struct Args {
    /// The proxy's client SAP.
    #[arg(long, default_value = "127.0.0.1:7400")]
    sap: String,
    /// The proxy's admin (shutdown) SAP, for STATUS; `none` to skip it.
    #[arg(long, default_value = "127.0.0.1:7402")]
    admin_sap: String,
    /// Certificate directory: ca.pem, client.pem/client.key (admin.pem/admin.key for STATUS).
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
    /// PUTs to pipeline.
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Requests in flight at most (the proxy reads up to max_outstanding_per_stream ahead).
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Prefix of the keys written (and deleted at the end).
    #[arg(long, default_value = "example")]
    prefix: String,
}

/// What to do after an answer.
enum Next {
    /// The answer is what the step wanted.
    Done(Response),
    /// Not applied; the same request may be sent again.
    Retry,
    /// The request was refused; sending it again would not help.
    Failed(String),
}

/// Every status of PROTOCOL.md §4, and what a program should do about it.
fn judge(r: Response) -> Next {
    match r.status {
        Status::Ok => Next::Done(r),
        // Not applied (no primary answered in time, e.g. during a failover): safe to retry.
        Status::Unavailable => Next::Retry,
        // A write that may or may not have been applied (the primary was lost after it was
        // sent). PUT and DELETE are safe to repeat here; a program whose writes are not must read
        // back before deciding.
        Status::Unknown => Next::Retry,
        // The answer would be larger than max_response_bytes; nothing was changed. Narrow the
        // patterns (or raise the limit) instead of retrying.
        Status::TooLarge => Next::Failed(format!("too large: {}", msg(&r))),
        // A bug in the request (bad CBOR, wrong argument shape).
        Status::Malformed => Next::Failed(format!("malformed: {}", msg(&r))),
        // An operator the service does not know.
        Status::NotImplemented => Next::Failed(format!("not implemented: {}", msg(&r))),
        // This certificate's role may not do that (e.g. STATUS with a client certificate).
        Status::Forbidden => Next::Failed(format!("forbidden: {}", msg(&r))),
    }
}

fn msg(r: &Response) -> &str {
    r.message.as_deref().unwrap_or("(no message)")
}

/// Every error of the library: what went wrong with the connection, and what to do.
fn explain(e: &ClientError) -> String {
    let what = match e {
        ClientError::ClosedByService { code, .. } => match code {
            CloseCode::ServiceRefused => "refused: the proxy is full; try again later",
            CloseCode::Forbidden => "refused: this certificate's role may not use this SAP",
            CloseCode::FrameTooLarge => "a request frame was over max_request_bytes",
            CloseCode::ShuttingDown => "the service is shutting down",
            CloseCode::SlowReader => "we read answers too slowly",
            CloseCode::NoError => "the service closed the connection normally",
        },
        ClientError::Tls(_) => "the certificate directory is missing or unusable",
        ClientError::Net(_) => "the service could not be reached",
        ClientError::Closed(_) => "the connection ended",
        ClientError::Timeout(_) => "no answer in time",
        ClientError::BadResponse(_) => "the service answered something that is not a response",
        ClientError::EndOfStream => "the service ended the stream",
    };
    format!("{what} ({e})")
}

/// Sends `req` until it is applied (at most 10 times, 200 ms apart while not applied).
async fn call(c: &mut Client, req: &Request) -> Result<Result<Response, String>, ClientError> {
    for _ in 0..10 {
        match judge(c.call(req).await?) {
            Next::Done(r) => return Ok(Ok(r)),
            Next::Failed(why) => return Ok(Err(why)),
            Next::Retry => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Ok(Err(format!("{} not applied after 10 tries", req.op_name())))
}

/// PUTs `count` pairs with up to `in_flight` unanswered at once; answers are matched by id
/// (they may come in another order). Returns how many were inserted.
async fn pipelined_puts(c: &mut Client, a: &Args) -> Result<Result<u64, String>, ClientError> {
    let mut waiting: HashMap<u64, Request> = HashMap::new();
    let mut next = 0u64;
    let mut inserted = 0u64;
    let mut retries = 0u64;
    let mut again: Vec<Request> = Vec::new();
    while next < a.count || !waiting.is_empty() || !again.is_empty() {
        // Fill the window, then send the whole batch in one write.
        while waiting.len() < a.in_flight && (next < a.count || !again.is_empty()) {
            let req = again.pop().unwrap_or_else(|| {
                next += 1;
                Request::put([(format!("{},{}", a.prefix, next - 1), "v".to_owned())])
            });
            let id = c.queue(&req);
            waiting.insert(id, req);
        }
        c.flush().await?;
        let r = c.read_response().await?;
        let Some(req) = r.id.and_then(|id| waiting.remove(&id)) else {
            return Ok(Err(format!("an answer to no request of ours: {r:?}")));
        };
        match judge(r) {
            Next::Done(r) => {
                let rejected = r.rejected.as_ref().map_or(0, |v| v.len());
                // A rejected pair: its key was already present (an earlier run, or a retried
                // `unknown` that had been applied).
                inserted += u64::from(rejected == 0);
            }
            Next::Retry if retries < 100 => {
                retries += 1;
                again.push(req);
            }
            Next::Retry => return Ok(Err("too many requests not applied".into())),
            Next::Failed(why) => return Ok(Err(why)),
        }
    }
    Ok(Ok(inserted))
}

async fn run(a: &Args) -> Result<bool, ClientError> {
    let cfg = Config::default();
    let mut c = Client::connect(&a.sap, &a.certs, CertRole::Client, &cfg).await?;
    let mut ok = true;
    let mut step = |name: &str, res: Result<String, String>| match res {
        Ok(s) => println!("{name}: {s}"),
        Err(e) => {
            println!("{name}: FAILED: {e}");
            ok = false;
        }
    };

    let t0 = Instant::now();
    let res = pipelined_puts(&mut c, a).await?;
    let secs = t0.elapsed().as_secs_f64();
    step(
        "pipelined PUT",
        res.map(|n| {
            format!(
                "{} requests, {n} inserted, {} in flight, {:.3} s ({:.0}/s)",
                a.count,
                a.in_flight,
                secs,
                a.count as f64 / secs
            )
        }),
    );

    let keys = format!("{},\\d+", a.prefix);
    let res = call(&mut c, &Request::get(&keys, ".*")).await?;
    step(
        "GET",
        res.and_then(|r| {
            let n = r.pairs.map_or(0, |p| p.len()) as u64;
            if n >= a.count {
                Ok(format!("{n} pairs match {keys}"))
            } else {
                Err(format!("{n} pairs match {keys}, expected {}", a.count))
            }
        }),
    );

    // Statuses other than ok, on purpose: an operator the service does not know, and a
    // pattern that does not compile (ok with a message and no pairs, PROTOCOL.md §4).
    let res = call(&mut c, &Request::op("FROB", None)).await?;
    step(
        "FROB",
        match res {
            Err(why) if why.starts_with("not implemented") => {
                Ok(format!("refused as expected: {why}"))
            }
            other => Err(format!("expected not-implemented, got {other:?}")),
        },
    );
    let res = call(&mut c, &Request::get("(", ".*")).await?;
    step(
        "GET with a bad pattern",
        res.map(|r| {
            format!(
                "ok, {} pairs: {}",
                r.pairs.map_or(0, |p| p.len()),
                msg_of(&r.message)
            )
        }),
    );

    // A take (PROTOCOL.md §4a): DELETE with limit 1 removes the first match in key order; with a
    // wait it would wait for one. One that times out answers ok without pairs and removes nothing.
    let res = call(
        &mut c,
        &Request::take(&keys, ".*").wait(Duration::from_secs(1)),
    )
    .await?;
    step(
        "take",
        res.and_then(|r| match r.pairs.as_deref() {
            Some([p]) => Ok(format!("took {}", p.key)),
            other => Err(format!("expected one pair, got {other:?}")),
        }),
    );
    let none = format!("{},none", a.prefix);
    let res = call(
        &mut c,
        &Request::take(&none, ".*").wait(Duration::from_millis(200)),
    )
    .await?;
    step(
        "take with nothing to take",
        res.and_then(|r| match r.pairs.as_deref() {
            Some([]) => Ok(format!("ok, 0 pairs after 200 ms: {}", msg_of(&r.message))),
            other => Err(format!("expected no pairs, got {other:?}")),
        }),
    );

    let res = call(&mut c, &Request::delete(&keys, ".*")).await?;
    step(
        "DELETE",
        res.map(|r| format!("{} pairs removed", r.pairs.map_or(0, |p| p.len()))),
    );
    c.close();
    c.wait_closed(Duration::from_millis(200)).await;

    if a.admin_sap != "none" {
        match Client::connect(&a.admin_sap, &a.certs, CertRole::Admin, &cfg).await {
            Ok(mut admin) => {
                let res = call(&mut admin, &Request::status()).await?;
                step(
                    "STATUS",
                    res.map(|r| match r.cluster {
                        Some(c) => format!(
                            "epoch {}, backup {}, {} clients, pairs {}",
                            c.epoch,
                            c.backup_state.as_str(),
                            c.clients,
                            c.pairs.map_or("unknown".into(), |n| n.to_string())
                        ),
                        None => "no cluster in the answer".into(),
                    }),
                );
                admin.close();
                admin.wait_closed(Duration::from_millis(200)).await;
            }
            // No admin certificate here is not a failure of this example.
            Err(e @ ClientError::Tls(_)) => println!("STATUS: skipped: {e}"),
            Err(e) => return Err(e),
        }
    }
    Ok(ok)
}

fn msg_of(m: &Option<String>) -> &str {
    m.as_deref().unwrap_or("(no message)")
}

#[tokio::main]
async fn main() -> ExitCode {
    let a = Args::parse();
    if a.in_flight == 0 {
        eprintln!("--in-flight must be at least 1");
        return ExitCode::from(2);
    }
    match run(&a).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", explain(&e));
            ExitCode::from(2)
        }
    }
}
