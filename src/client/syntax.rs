//! The client's command syntax (documented in `help` and README.md).
//!
//! ```text
//! get [--limit N] [--wait D] KEYEXP VALEXP   regexes, full match     get 'user,\d+' '.*'
//! delete [--limit N] [--wait D] KEYEXP VALEXP
//! take KEYEXP VALEXP [--wait D]   DELETE with limit 1 (a Linda `in`)  take 'job,.*' '.*' --wait 5s
//! put PAIR...                PAIR is KEY=VALUE with tuples in text form  put user,1=alice
//!                            or any JSON value, sent as-is              put '"junk"' '[["a"],["b"]]'
//! post PAIR...
//! op NAME [JSON]             any operator, unknown ones too            op FROB '[]'
//! raw JSON                   a whole request given as JSON             raw '{"id":5,"op":"put","args":"x"}'
//! rawhex HEX                 bytes sent as one frame (length added)    rawhex ff00
//! status | shutdown          admin commands on the shutdown SAP
//! ```

use ciborium::Value;

use crate::wire::client::MatchOpts;

/// Reads a duration: a number with a unit `ms`, `s` or `m` (`500ms`, `5s`, `1.5s`, `2m`); a
/// bare number is milliseconds.
pub fn duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a duration: write e.g. 500ms, 5s, 1.5s or 2m");
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let ms = v * scale;
    if !ms.is_finite() || ms < 0.0 || ms > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(ms.round() as u64)
}

/// Takes `--limit N` and `--wait D` (anywhere among `words`) out of them.
fn match_opts(words: &[String]) -> Result<(MatchOpts, Vec<String>), String> {
    let mut opts = MatchOpts::default();
    let mut rest = Vec::with_capacity(words.len());
    let mut it = words.iter();
    while let Some(w) = it.next() {
        let (flag, inline) = match w.split_once('=') {
            Some((f, v)) if f == "--limit" || f == "--wait" => (f, Some(v.to_owned())),
            _ => (w.as_str(), None),
        };
        match flag {
            "--limit" | "--wait" => {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| format!("{flag} needs a value"))?,
                };
                if flag == "--limit" {
                    let n: u64 = v.parse().map_err(|_| {
                        format!("--limit needs a whole number of at least 1, not `{v}`")
                    })?;
                    if n == 0 {
                        return Err("--limit needs a whole number of at least 1, not `0`".into());
                    }
                    opts.limit = Some(n);
                } else {
                    opts.wait_ms = Some(duration_ms(&v)?);
                }
            }
            _ => rest.push(w.clone()),
        }
    }
    Ok((opts, rest))
}

/// A parsed command line.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    /// A request built from the arguments: operator and args.
    Request {
        op: String,
        args: Option<Value>,
        /// PROTOCOL.md §4a `limit` and `wait_ms` (GET, DELETE and take only).
        opts: MatchOpts,
    },
    /// A request sent exactly as given (its own id).
    Raw(Value),
    /// Bytes to send as one frame body.
    RawBytes(Vec<u8>),
    /// STATUS; `watch`: again every `status_watch_interval_ms` until interrupted.
    Status {
        watch: bool,
    },
    Shutdown,
    Connect(Option<String>),
    Disconnect,
    Help,
    Quit,
    Empty,
}

/// Converts JSON text to the CBOR item it describes.
pub fn json_to_cbor(s: &str) -> Result<Value, String> {
    serde_json::from_str::<Value>(s).map_err(|e| format!("`{s}` is not valid JSON: {e}"))
}

/// Converts a tuple in text form to CBOR.
fn tuple(text: &str) -> Value {
    Value::Array(text.split(',').map(|e| Value::Text(e.to_owned())).collect())
}

/// One PUT/POST element: `KEY=VALUE` or JSON.
pub fn element(s: &str) -> Result<Value, String> {
    let t = s.trim_start();
    if t.starts_with('[')
        || t.starts_with('{')
        || t.starts_with('"')
        || t == "null"
        || t.parse::<f64>().is_ok()
    {
        return json_to_cbor(s);
    }
    match s.split_once('=') {
        Some((k, v)) => Ok(Value::Array(vec![tuple(k), tuple(v)])),
        None => Err(format!(
            "`{s}` is not a pair: write KEY=VALUE (e.g. user,1=alice) or a JSON value"
        )),
    }
}

/// Parses one command line.
pub fn parse(line: &str) -> Result<Line, String> {
    let words = shlex::split(line).ok_or("unbalanced quotes")?;
    let Some((cmd, rest)) = words.split_first() else {
        return Ok(Line::Empty);
    };
    let need = |n: usize, usage: &str| -> Result<(), String> {
        if rest.len() == n {
            Ok(())
        } else {
            Err(format!("usage: {usage}"))
        }
    };
    Ok(match cmd.to_ascii_lowercase().as_str() {
        "get" | "delete" | "del" | "take" => {
            let take = cmd.eq_ignore_ascii_case("take");
            let (mut opts, pats) = match_opts(rest)?;
            if pats.len() != 2 {
                return Err(if take {
                    format!("usage: {cmd} KEYEXP VALEXP [--wait D]")
                } else {
                    format!("usage: {cmd} [--limit N] [--wait D] KEYEXP VALEXP")
                });
            }
            if take {
                if opts.limit.is_some() {
                    return Err("take removes one pair; use delete --limit N for more".into());
                }
                opts.limit = Some(1);
            }
            let op = if cmd.eq_ignore_ascii_case("get") {
                "GET"
            } else {
                "DELETE"
            };
            Line::Request {
                op: op.into(),
                args: Some(Value::Array(vec![
                    Value::Text(pats[0].clone()),
                    Value::Text(pats[1].clone()),
                ])),
                opts,
            }
        }
        "put" | "post" => Line::Request {
            op: cmd.to_ascii_uppercase(),
            args: Some(Value::Array(
                rest.iter().map(|s| element(s)).collect::<Result<_, _>>()?,
            )),
            opts: MatchOpts::default(),
        },
        "op" => {
            if rest.is_empty() || rest.len() > 2 {
                return Err("usage: op NAME [JSON-ARGS]".into());
            }
            Line::Request {
                op: rest[0].clone(),
                args: rest.get(1).map(|a| json_to_cbor(a)).transpose()?,
                opts: MatchOpts::default(),
            }
        }
        "raw" => {
            need(1, "raw JSON")?;
            Line::Raw(json_to_cbor(&rest[0])?)
        }
        "rawhex" => {
            need(1, "rawhex HEX")?;
            Line::RawBytes(hex::decode(&rest[0]).map_err(|e| format!("not hex: {e}"))?)
        }
        "status" => match rest {
            [] => Line::Status { watch: false },
            [w] if w == "--watch" || w == "-w" => Line::Status { watch: true },
            _ => return Err("usage: status [--watch]".into()),
        },
        "shutdown" => Line::Shutdown,
        "connect" => Line::Connect(rest.first().cloned()),
        "disconnect" => Line::Disconnect,
        "help" | "?" => Line::Help,
        "quit" | "exit" => Line::Quit,
        other => return Err(format!("unknown command `{other}`; type `help`")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_and_json_elements() {
        let l = parse(r#"put user,1=alice '"junk"' '[["a"],["b"]]'"#).unwrap();
        let Line::Request {
            op,
            args: Some(Value::Array(a)),
            ..
        } = l
        else {
            panic!()
        };
        assert_eq!(op, "PUT");
        assert_eq!(a.len(), 3);
        assert_eq!(a[1], Value::Text("junk".into()));
        assert!(parse("put nopair").is_err());
    }

    #[test]
    fn get_needs_two_patterns() {
        assert!(parse("get a").is_err());
        assert!(matches!(
            parse("GET 'user,\\d+' '.*'").unwrap(),
            Line::Request { .. }
        ));
        assert_eq!(parse("   ").unwrap(), Line::Empty);
    }

    #[test]
    fn wait_limit_and_take() {
        let opts = |l: &str| match parse(l).unwrap() {
            Line::Request { op, args, opts } => (op, args, opts),
            other => panic!("{other:?}"),
        };
        let (op, args, o) = opts("get --wait 5s --limit 1 'job,.*' '.*'");
        assert_eq!(op, "GET");
        assert_eq!(
            args,
            Some(Value::Array(vec![
                Value::Text("job,.*".into()),
                Value::Text(".*".into())
            ]))
        );
        assert_eq!((o.limit, o.wait_ms), (Some(1), Some(5000)));
        let (op, _, o) = opts("take 'job,.*' '.*' --wait=250ms");
        assert_eq!(op, "DELETE");
        assert_eq!((o.limit, o.wait_ms), (Some(1), Some(250)));
        let (_, _, o) = opts("take a b");
        assert_eq!((o.limit, o.wait_ms), (Some(1), None));
        let (_, _, o) = opts("delete --limit 3 a b");
        assert_eq!((o.limit, o.wait_ms), (Some(3), None));
        for bad in [
            "get --limit 0 a b",
            "get --limit x a b",
            "get --wait a b",
            "get --wait 5h a b",
            "take a",
            "take --limit 2 a b",
            "get a b c",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(duration_ms("1.5s"), Ok(1500));
        assert_eq!(duration_ms("2m"), Ok(120_000));
        assert_eq!(duration_ms("40"), Ok(40));
        assert!(duration_ms("-1s").is_err());
    }
}
