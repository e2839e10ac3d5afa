//! The client's command syntax (documented in `help` and README.md).
//!
//! ```text
//! get KEYEXP VALEXP          regexes, full match on text forms      get 'user,\d+' '.*'
//! delete KEYEXP VALEXP
//! put PAIR...                PAIR is KEY=VALUE with tuples in text form  put user,1=alice
//!                            or any JSON value, sent as-is              put '"junk"' '[["a"],["b"]]'
//! post PAIR...
//! op NAME [JSON]             any operator, unknown ones too            op FROB '[]'
//! raw JSON                   a whole request given as JSON             raw '{"id":5,"op":"put","args":"x"}'
//! rawhex HEX                 bytes sent as one frame (length added)    rawhex ff00
//! status | shutdown          admin commands on the shutdown SAP
//! ```

use ciborium::Value;

/// A parsed command line.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    /// A request built from the arguments: operator and args.
    Request {
        op: String,
        args: Option<Value>,
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
        "get" | "delete" | "del" => {
            need(2, &format!("{cmd} KEYEXP VALEXP"))?;
            let op = if cmd.eq_ignore_ascii_case("get") {
                "GET"
            } else {
                "DELETE"
            };
            Line::Request {
                op: op.into(),
                args: Some(Value::Array(vec![
                    Value::Text(rest[0].clone()),
                    Value::Text(rest[1].clone()),
                ])),
            }
        }
        "put" | "post" => Line::Request {
            op: cmd.to_ascii_uppercase(),
            args: Some(Value::Array(
                rest.iter().map(|s| element(s)).collect::<Result<_, _>>()?,
            )),
        },
        "op" => {
            if rest.is_empty() || rest.len() > 2 {
                return Err("usage: op NAME [JSON-ARGS]".into());
            }
            Line::Request {
                op: rest[0].clone(),
                args: rest.get(1).map(|a| json_to_cbor(a)).transpose()?,
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
}
