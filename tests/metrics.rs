//! Metrics (issue 12): `up` starts a proxy, a primary and a backup, each serving OpenMetrics at
//! `GET /metrics` on its own loopback port. Each is scraped over real TCP, the text is parsed by
//! a small typed OpenMetrics parser (families, types, units, label sets, values, `# EOF`; the
//! samples checked against their family's type), the families docs/METRICS.md lists are looked
//! for, and the request counters, latency histograms and pair counts must move after PUTs and
//! GETs.
//!
//! Run: `cargo test --release --test metrics`

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ciborium::Value;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tuplespace::wire::client::Status;

// ---------------------------------------------------------------------------------------------
// A small OpenMetrics text parser
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    Other,
}

#[derive(Debug, Clone)]
struct Sample {
    /// The sample's own name (`<family>_total`, `<family>_bucket`, ...).
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Clone)]
struct Family {
    kind: Kind,
    help: Option<String>,
    unit: Option<String>,
    samples: Vec<Sample>,
}

type Families = BTreeMap<String, Family>;
/// A sample's labels without `le`: one histogram series.
type LabelKey = Vec<(String, String)>;

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// Suffixes a sample of a family of `kind` may carry.
fn suffixes(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Counter => &["_total", "_created"],
        Kind::Gauge => &[""],
        Kind::Histogram => &["_bucket", "_count", "_sum", "_created"],
        Kind::Other => &[""],
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad value `{s}`: {e}")),
    }
}

/// `{a="x",b="y"}` (without the braces) into a map; handles `\\`, `\"` and `\n` escapes.
fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or(format!("label without `=` in `{s}`"))?;
        let name = &rest[..eq];
        if !is_name(name) {
            return Err(format!("bad label name `{name}`"));
        }
        let after = &rest[eq + 1..];
        if !after.starts_with('"') {
            return Err(format!("label value not quoted in `{s}`"));
        }
        let mut value = String::new();
        let mut chars = after[1..].char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated label value in `{s}`")),
                Some((i, '"')) => break i + 2,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?} in `{s}`")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if out.insert(name.to_owned(), value).is_some() {
            return Err(format!("label `{name}` twice in `{s}`"));
        }
        rest = &after[end..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.is_empty() {
            return Err(format!("junk after a label in `{s}`"));
        }
    }
    Ok(out)
}

fn parse_openmetrics(text: &str) -> Result<Families, String> {
    let mut fams = Families::new();
    let mut current: Option<String> = None;
    let mut lines = text.split('\n').peekable();
    let mut saw_eof = false;
    while let Some(line) = lines.next() {
        if saw_eof {
            if line.is_empty() && lines.peek().is_none() {
                break;
            }
            return Err(format!("text after # EOF: `{line}`"));
        }
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (what, name, rest) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            if !is_name(name) {
                return Err(format!("bad family name in `{line}`"));
            }
            // A family's metadata lines come together, in any order, before its samples.
            if current.as_deref() != Some(name) {
                if fams.contains_key(name) {
                    return Err(format!("family `{name}` appears twice"));
                }
                fams.insert(
                    name.to_owned(),
                    Family {
                        kind: Kind::Other,
                        help: None,
                        unit: None,
                        samples: Vec::new(),
                    },
                );
                current = Some(name.to_owned());
            }
            let f = fams.get_mut(name).expect("just inserted");
            if !f.samples.is_empty() {
                return Err(format!("metadata after samples of `{name}`"));
            }
            match what {
                "TYPE" => {
                    f.kind = match rest {
                        "counter" => Kind::Counter,
                        "gauge" => Kind::Gauge,
                        "histogram" => Kind::Histogram,
                        "unknown" | "info" | "stateset" | "summary" | "gaugehistogram" => {
                            Kind::Other
                        }
                        _ => return Err(format!("unknown type in `{line}`")),
                    };
                }
                "HELP" => f.help = Some(rest.to_owned()),
                "UNIT" => {
                    if !name.ends_with(&format!("_{rest}")) {
                        return Err(format!("family `{name}` does not end with its unit"));
                    }
                    f.unit = Some(rest.to_owned());
                }
                _ => return Err(format!("unknown metadata line `{line}`")),
            }
            continue;
        }
        if line.is_empty() {
            return Err("empty line in the exposition".into());
        }
        // A sample: name[{labels}] value [timestamp]
        let (name, labels, rest) = match line.find('{') {
            Some(i) => {
                let close = line
                    .rfind('}')
                    .ok_or(format!("unclosed labels in `{line}`"))?;
                (
                    &line[..i],
                    parse_labels(&line[i + 1..close])?,
                    line[close + 1..].trim_start(),
                )
            }
            None => {
                let sp = line
                    .find(' ')
                    .ok_or(format!("sample without value `{line}`"))?;
                (&line[..sp], BTreeMap::new(), line[sp + 1..].trim_start())
            }
        };
        let value = parse_value(rest.split(' ').next().unwrap_or(""))?;
        let fam_name = current
            .as_ref()
            .ok_or(format!("sample before any TYPE: `{line}`"))?;
        let fam = fams.get_mut(fam_name).expect("current family exists");
        let suffix = name
            .strip_prefix(fam_name.as_str())
            .ok_or(format!("sample `{name}` outside its family `{fam_name}`"))?;
        if !suffixes(fam.kind).contains(&suffix) {
            return Err(format!(
                "sample `{name}` has a suffix a {:?} may not have",
                fam.kind
            ));
        }
        if fam.kind == Kind::Counter && suffix == "_total" && (value.is_nan() || value < 0.0) {
            return Err(format!("negative counter `{line}`"));
        }
        fam.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    if !saw_eof {
        return Err("no # EOF at the end".into());
    }
    // Histograms: cumulative buckets ending at +Inf == _count.
    for (name, f) in &fams {
        if f.kind != Kind::Histogram {
            continue;
        }
        let mut series: BTreeMap<LabelKey, Vec<(f64, f64)>> = BTreeMap::new();
        for s in f.samples.iter().filter(|s| s.name.ends_with("_bucket")) {
            let le = parse_value(
                s.labels
                    .get("le")
                    .ok_or(format!("bucket of {name} without le"))?,
            )?;
            let key: Vec<_> = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, b) in series {
            if b.windows(2).any(|w| w[1].0 <= w[0].0 || w[1].1 < w[0].1) {
                return Err(format!("{name}{key:?}: buckets not cumulative: {b:?}"));
            }
            let last = b.last().expect("a bucket");
            let labels: BTreeMap<_, _> = key.into_iter().collect();
            let count = f
                .samples
                .iter()
                .find(|s| s.name == format!("{name}_count") && s.labels == labels)
                .ok_or(format!("{name}: no _count"))?;
            if last.0 != f64::INFINITY || last.1 != count.value {
                return Err(format!(
                    "{name}: +Inf bucket {last:?} != count {}",
                    count.value
                ));
            }
        }
    }
    Ok(fams)
}

/// The value of sample `name` whose labels include `labels`; None when there is none.
fn value(f: &Families, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    f.values()
        .flat_map(|fam| fam.samples.iter())
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn must(f: &Families, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(f, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in {f:#?}"))
}

#[test]
fn the_parser_refuses_what_is_not_openmetrics() {
    let good =
        "# TYPE a counter\n# HELP a x\na_total{op=\"g\\\"et\"} 3\n# TYPE b gauge\nb 1.5\n# EOF\n";
    let f = parse_openmetrics(good).unwrap();
    assert_eq!(must(&f, "a_total", &[("op", "g\"et")]), 3.0);
    assert_eq!(f["b"].kind, Kind::Gauge);
    for bad in [
        "# TYPE a counter\na_total 1\n",     // no EOF
        "# TYPE a counter\na 1\n# EOF\n",    // counter sample without _total
        "# TYPE a gauge\nb 1\n# EOF\n",      // outside its family
        "# TYPE a gauge\na{x=1} 1\n# EOF\n", // unquoted label
        "# TYPE a gauge\na one\n# EOF\n",    // not a number
        "# TYPE a histogram\na_bucket{le=\"1\"} 2\na_bucket{le=\"+Inf\"} 1\na_count 1\na_sum 0\n# EOF\n",
        "# TYPE a gauge\na 1\n# EOF\nb 2\n", // after EOF
    ] {
        assert!(parse_openmetrics(bad).is_err(), "accepted: {bad}");
    }
}

// ---------------------------------------------------------------------------------------------
// Scraping
// ---------------------------------------------------------------------------------------------

/// One HTTP/1.1 GET over TCP: (status code, content type, body).
async fn http_get(sap: &str, path: &str) -> Result<(u16, String, String), String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(sap)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {sap}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| "timed out".to_string())??;
    let text = String::from_utf8(buf).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of head")?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status code")?;
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_owned();
    Ok((code, ctype, body.to_owned()))
}

/// Scrapes and parses; panics on a malformed exposition.
async fn scrape(sap: &str) -> Result<Families, String> {
    let (code, ctype, body) = http_get(sap, "/metrics").await?;
    if code != 200 {
        return Err(format!("HTTP {code}: {body}"));
    }
    assert!(
        ctype.starts_with("application/openmetrics-text"),
        "content type {ctype}"
    );
    Ok(parse_openmetrics(&body).unwrap_or_else(|e| panic!("{sap}: {e}\n{body}")))
}

/// Scrapes until `cond` holds; panics with the last scrape after `timeout`.
async fn scrape_until(
    sap: &str,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&Families) -> bool,
) -> Families {
    let deadline = Instant::now() + timeout;
    loop {
        let r = scrape(sap).await;
        if let Ok(f) = &r
            && cond(f)
        {
            return r.unwrap();
        }
        if Instant::now() >= deadline {
            panic!("{sap}: {what} not seen within {timeout:?}: {r:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_families(f: &Families, want: &[(&str, Kind)], who: &str) {
    for (name, kind) in want {
        let fam = f
            .get(*name)
            .unwrap_or_else(|| panic!("{who}: no family {name}; has {:?}", f.keys()));
        assert_eq!(fam.kind, *kind, "{who}: {name}");
        assert!(fam.help.is_some(), "{who}: {name} has no HELP");
        assert!(!fam.samples.is_empty(), "{who}: {name} has no sample");
    }
}

const COMMON: &[(&str, Kind)] = &[
    ("tuplespace_requests", Kind::Counter),
    ("tuplespace_connections", Kind::Gauge),
    ("tuplespace_epoch", Kind::Gauge),
    ("tuplespace_backup_state", Kind::Gauge),
    ("tuplespace_pairs", Kind::Gauge),
];

const PROXY: &[(&str, Kind)] = &[
    ("tuplespace_request_duration_seconds", Kind::Histogram),
    ("tuplespace_requests_pending", Kind::Gauge),
    ("tuplespace_requests_in_flight", Kind::Gauge),
    ("tuplespace_failovers", Kind::Counter),
    ("tuplespace_primary_up", Kind::Gauge),
];

const SERVER: &[(&str, Kind)] = &[
    ("tuplespace_apply_duration_seconds", Kind::Histogram),
    ("tuplespace_replicate_duration_seconds", Kind::Histogram),
    ("tuplespace_replies_held", Kind::Gauge),
    ("tuplespace_role", Kind::Gauge),
    ("tuplespace_promotions", Kind::Counter),
    ("tuplespace_backup_sync_copy_pairs", Kind::Gauge),
    ("tuplespace_backup_sync_sent_pairs", Kind::Gauge),
    ("tuplespace_replication_lag_updates", Kind::Gauge),
    ("tuplespace_replication_lag_bytes", Kind::Gauge),
    ("tuplespace_seq", Kind::Gauge),
    ("tuplespace_wal_fsync_duration_seconds", Kind::Histogram),
    ("tuplespace_wal_write_duration_seconds", Kind::Histogram),
    ("tuplespace_wal_appended_bytes", Kind::Counter),
    ("tuplespace_snapshots", Kind::Counter),
    ("tuplespace_snapshot_age_seconds", Kind::Gauge),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_metrics_that_move_with_requests() {
    let mut up = UpService::new(&[]);
    up.start();
    up.wait_ready(Duration::from_secs(30)).await;
    let [proxy, primary, backup] = up.metrics_saps.clone();
    let out = up.log(1);
    for sap in [&proxy, &primary, &backup] {
        assert!(
            out.contains(&format!("http://{sap}/metrics")),
            "up did not print {sap}:\n{out}"
        );
    }
    let wait = Duration::from_secs(15);

    let p0 = scrape_until(&proxy, wait, "a synchronised backup", |f| {
        value(f, "tuplespace_backup_state", &[("state", "synced")]) == Some(1.0)
    })
    .await;
    has_families(&p0, COMMON, "proxy");
    has_families(&p0, PROXY, "proxy");
    assert_eq!(must(&p0, "tuplespace_primary_up", &[]), 1.0);
    assert_eq!(
        must(&p0, "tuplespace_connections", &[("role", "primary")]),
        1.0
    );
    assert_eq!(
        must(&p0, "tuplespace_connections", &[("role", "backup")]),
        1.0
    );

    let s0 = scrape_until(&primary, wait, "primary role, synced backup", |f| {
        value(f, "tuplespace_role", &[("role", "primary")]) == Some(1.0)
            && value(f, "tuplespace_backup_state", &[("state", "synced")]) == Some(1.0)
    })
    .await;
    has_families(&s0, COMMON, "primary");
    has_families(&s0, SERVER, "primary");
    let b0 = scrape_until(&backup, wait, "backup role", |f| {
        value(f, "tuplespace_role", &[("role", "backup")]) == Some(1.0)
            && value(f, "tuplespace_connections", &[("role", "primary")]) == Some(1.0)
    })
    .await;
    has_families(&b0, COMMON, "backup");
    has_families(&b0, SERVER, "backup");
    assert_eq!(
        must(&b0, "tuplespace_epoch", &[]),
        must(&s0, "tuplespace_epoch", &[])
    );

    // A connection that says nothing holds one slot, not the responder.
    let silent = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    let (code, _, _) = http_get(&proxy, "/nothing").await.unwrap();
    assert_eq!(code, 404);

    const N: u64 = 25;
    let mut c = up.client().await;
    for i in 0..N {
        let r = c
            .request(
                "PUT",
                Some(Value::Array(vec![tpair(&format!("m,{i}"), "v")])),
            )
            .await
            .unwrap();
        assert_eq!(r.status, Status::Ok, "{r:?}");
    }
    for i in 0..N {
        let r = c
            .request("GET", pats(&format!("m,{i}"), ".*"))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert_eq!(pairs_of(&r).len(), 1);
    }
    c.close();
    drop(silent);

    let ok = |op| [("op", op), ("status", "ok")];
    let delta = |a: &Families, b: &Families, name: &str, l: &[(&str, &str)]| {
        must(b, name, l) - value(a, name, l).unwrap_or(0.0)
    };
    // The proxy counts an answer before handing it to the stream: no waiting needed.
    let p1 = scrape_until(
        &proxy,
        wait,
        "the primary's heartbeat with the pairs",
        |f| value(f, "tuplespace_pairs", &[]) == Some(N as f64),
    )
    .await;
    assert_eq!(
        delta(&p0, &p1, "tuplespace_requests_total", &ok("put")),
        N as f64
    );
    assert_eq!(
        delta(&p0, &p1, "tuplespace_requests_total", &ok("get")),
        N as f64
    );
    for op in ["put", "get"] {
        let d = delta(
            &p0,
            &p1,
            "tuplespace_request_duration_seconds_count",
            &[("op", op)],
        );
        assert_eq!(d, N as f64, "proxy latency count of {op}");
    }
    assert!(
        must(
            &p1,
            "tuplespace_request_duration_seconds_sum",
            &[("op", "put")]
        ) > 0.0
    );

    let s1 = scrape(&primary).await.unwrap();
    assert_eq!(must(&s1, "tuplespace_pairs", &[]), N as f64);
    assert_eq!(
        delta(&s0, &s1, "tuplespace_requests_total", &ok("put")),
        N as f64
    );
    assert_eq!(
        delta(&s0, &s1, "tuplespace_requests_total", &ok("get")),
        N as f64
    );
    assert_eq!(
        delta(
            &s0,
            &s1,
            "tuplespace_apply_duration_seconds_count",
            &[("op", "put")]
        ),
        N as f64
    );
    assert!(
        delta(&s0, &s1, "tuplespace_replicate_duration_seconds_count", &[]) >= 1.0,
        "no replication timed"
    );
    assert!(delta(&s0, &s1, "tuplespace_wal_fsync_duration_seconds_count", &[]) >= 1.0);
    assert!(delta(&s0, &s1, "tuplespace_wal_appended_bytes_total", &[]) > 0.0);
    assert!(must(&s1, "tuplespace_seq", &[]) >= N as f64);

    let b1 = scrape_until(&backup, wait, "the backup's copy of the pairs", |f| {
        value(f, "tuplespace_pairs", &[]) == Some(N as f64)
    })
    .await;
    assert_eq!(
        must(&b1, "tuplespace_seq", &[]),
        must(&s1, "tuplespace_seq", &[])
    );
    // A backup answers no client request.
    assert_eq!(
        delta(&b0, &b1, "tuplespace_requests_total", &ok("put")),
        0.0
    );
    // Everything acknowledged once the client has its answers: no lag left.
    let s2 = scrape_until(&primary, wait, "no replication lag", |f| {
        value(f, "tuplespace_replication_lag_updates", &[]) == Some(0.0)
            && value(f, "tuplespace_replication_lag_bytes", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(must(&s2, "tuplespace_backup_sync_sent_pairs", &[]), 0.0);

    // kill -9 of the primary: the proxy counts a failover, the backup is promoted (role and
    // counter), and the next backup serves at the address the old primary had.
    let st = up.status().await;
    let pid = st
        .as_ref()
        .and_then(|s| s.pid_of("primary"))
        .unwrap_or_else(|| panic!("no primary pid: {st:?}"));
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let long = Duration::from_secs(30);
    let p2 = scrape_until(
        &proxy,
        long,
        "a failover and a new synchronised backup",
        |f| {
            value(f, "tuplespace_failovers_total", &[]).is_some_and(|n| n >= 1.0)
                && value(f, "tuplespace_backup_state", &[("state", "synced")]) == Some(1.0)
        },
    )
    .await;
    assert!(must(&p2, "tuplespace_epoch", &[]) > must(&p1, "tuplespace_epoch", &[]));
    let b2 = scrape_until(&backup, long, "the backup promoted", |f| {
        value(f, "tuplespace_role", &[("role", "primary")]) == Some(1.0)
    })
    .await;
    assert_eq!(must(&b2, "tuplespace_promotions_total", &[]), 1.0);
    assert_eq!(must(&b2, "tuplespace_pairs", &[]), N as f64);
    scrape_until(
        &primary,
        long,
        "a new backup at the old primary's address",
        |f| {
            value(f, "tuplespace_role", &[("role", "backup")]) == Some(1.0)
                && value(f, "tuplespace_pairs", &[]) == Some(N as f64)
        },
    )
    .await;

    up.stop().await;
}
