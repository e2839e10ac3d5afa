//! Tuples: validation, text form, and conversion to/from CBOR values.
//!
//! Pure functions only. Must never do I/O, block, or panic on input: every
//! check on client-supplied data returns a `Result`/`Option`.

use ciborium::Value;
use serde::{Deserialize, Serialize};

/// Bounds on tuple shape; a tuple past either bound is ill-formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleLimits {
    /// Maximum number of elements in one tuple.
    pub max_arity: usize,
    /// Maximum length of one element, in UTF-8 bytes.
    pub max_element_bytes: usize,
}

impl Default for TupleLimits {
    fn default() -> Self {
        TupleLimits {
            max_arity: 64,
            max_element_bytes: 4096,
        }
    }
}

/// A key/value pair, both in text form (elements joined by `,`).
///
/// Text form is a bijection with the tuple because elements cannot contain
/// `,`, so the store never needs the element vectors.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Pair {
    pub key: String,
    pub value: String,
}

impl Pair {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Pair {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// Why a tuple is ill-formed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TupleError {
    #[error("tuple has no elements; a tuple needs at least one")]
    Empty,
    #[error("element {index} is empty; elements need at least one character")]
    EmptyElement { index: usize },
    #[error("element {index} contains {ch:?}, which is not alphanumeric")]
    NotAlphanumeric { index: usize, ch: char },
    #[error("tuple has {n} elements; the limit is {max}")]
    TooManyElements { n: usize, max: usize },
    #[error("element {index} is {len} bytes long; the limit is {max} bytes")]
    ElementTooLong {
        index: usize,
        len: usize,
        max: usize,
    },
}

/// Joins elements with `,`. Does not validate.
pub fn text_form<S: AsRef<str>>(elems: &[S]) -> String {
    let mut out = String::with_capacity(elems.iter().map(|e| e.as_ref().len() + 1).sum());
    for (i, e) in elems.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(e.as_ref());
    }
    out
}

/// Splits a text form back into its elements (inverse of [`text_form`] for
/// well-formed tuples).
pub fn split_text(text: &str) -> Vec<String> {
    text.split(',').map(str::to_owned).collect()
}

/// Checks that `elems` is a well-formed tuple under `limits`.
pub fn check_tuple<S: AsRef<str>>(elems: &[S], limits: &TupleLimits) -> Result<(), TupleError> {
    if elems.is_empty() {
        return Err(TupleError::Empty);
    }
    if elems.len() > limits.max_arity {
        return Err(TupleError::TooManyElements {
            n: elems.len(),
            max: limits.max_arity,
        });
    }
    for (index, e) in elems.iter().enumerate() {
        check_element(index, e.as_ref(), limits)?;
    }
    Ok(())
}

/// Checks element `index` of a tuple: non-empty, at most `max_element_bytes`, alphanumeric.
pub fn check_element(index: usize, e: &str, limits: &TupleLimits) -> Result<(), TupleError> {
    if e.is_empty() {
        return Err(TupleError::EmptyElement { index });
    }
    // Length first: it is O(1) and bounds the character scan below.
    if e.len() > limits.max_element_bytes {
        return Err(TupleError::ElementTooLong {
            index,
            len: e.len(),
            max: limits.max_element_bytes,
        });
    }
    if let Some(ch) = e.chars().find(|c| !c.is_alphanumeric()) {
        return Err(TupleError::NotAlphanumeric { index, ch });
    }
    Ok(())
}

/// Converts a CBOR array of text strings into its text form, or `None` if it
/// is not a well-formed tuple.
pub fn tuple_from_value(v: &Value, limits: &TupleLimits) -> Option<String> {
    let items = v.as_array()?;
    // Check arity before touching elements so a huge array costs nothing.
    if items.is_empty() || items.len() > limits.max_arity {
        return None;
    }
    let mut out = String::new();
    for (index, item) in items.iter().enumerate() {
        let e = item.as_text()?;
        check_element(index, e, limits).ok()?;
        if index > 0 {
            out.push(',');
        }
        out.push_str(e);
    }
    Some(out)
}

/// Converts a CBOR `[key-tuple, value-tuple]` into a [`Pair`], or `None` if it
/// is not exactly that shape with two well-formed tuples.
pub fn pair_from_value(v: &Value, limits: &TupleLimits) -> Option<Pair> {
    match v.as_array()?.as_slice() {
        [k, val] => Some(Pair {
            key: tuple_from_value(k, limits)?,
            value: tuple_from_value(val, limits)?,
        }),
        _ => None,
    }
}

/// Converts text forms back to the wire shape `[[k1,..],[v1,..]]`.
pub fn pair_to_value(key_text: &str, value_text: &str) -> Value {
    Value::Array(vec![text_to_value(key_text), text_to_value(value_text)])
}

fn text_to_value(text: &str) -> Value {
    Value::Array(text.split(',').map(|e| Value::Text(e.to_owned())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> TupleLimits {
        TupleLimits::default()
    }

    fn tv(elems: &[&str]) -> Value {
        Value::Array(elems.iter().map(|e| Value::Text((*e).to_owned())).collect())
    }

    #[test]
    fn defaults() {
        assert_eq!(lim().max_arity, 64);
        assert_eq!(lim().max_element_bytes, 4096);
    }

    #[test]
    fn every_error_case() {
        let empty: [&str; 0] = [];
        assert_eq!(check_tuple(&empty, &lim()), Err(TupleError::Empty));
        assert_eq!(
            check_tuple(&["a", ""], &lim()),
            Err(TupleError::EmptyElement { index: 1 })
        );
        assert_eq!(
            check_tuple(&["a-b"], &lim()),
            Err(TupleError::NotAlphanumeric { index: 0, ch: '-' })
        );
        let small = TupleLimits {
            max_arity: 2,
            max_element_bytes: 3,
        };
        assert_eq!(
            check_tuple(&["a", "b", "c"], &small),
            Err(TupleError::TooManyElements { n: 3, max: 2 })
        );
        assert_eq!(
            check_tuple(&["abcd"], &small),
            Err(TupleError::ElementTooLong {
                index: 0,
                len: 4,
                max: 3
            })
        );
        // Limit counts UTF-8 bytes, not chars: `é` is 2 bytes.
        assert_eq!(
            check_tuple(&["éé"], &small),
            Err(TupleError::ElementTooLong {
                index: 0,
                len: 4,
                max: 3
            })
        );
        assert!(check_tuple(&["ab", "c"], &small).is_ok());
        // Messages are human-readable.
        assert!(
            TupleError::NotAlphanumeric { index: 2, ch: ' ' }
                .to_string()
                .contains("element 2")
        );
    }

    #[test]
    fn unicode_alphanumerics() {
        for ok in ["é", "日本", "٣", "Ωmega", "x1"] {
            assert!(
                check_tuple(&[ok], &lim()).is_ok(),
                "{ok} should be accepted"
            );
        }
        for bad in ["-", " ", "_", ",", "", "a.b", "a\u{0}"] {
            assert!(
                check_tuple(&[bad], &lim()).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn text_form_round_trip() {
        assert_eq!(text_form(&["user", "1"]), "user,1");
        assert_eq!(text_form(&["x"]), "x");
        assert_eq!(split_text("user,1"), vec!["user", "1"]);
        assert_eq!(split_text(&text_form(&["日本", "٣"])), vec!["日本", "٣"]);
    }

    #[test]
    fn values() {
        assert_eq!(
            tuple_from_value(&tv(&["user", "1"]), &lim()),
            Some("user,1".to_owned())
        );
        assert_eq!(tuple_from_value(&tv(&[]), &lim()), None);
        assert_eq!(tuple_from_value(&tv(&["a,b"]), &lim()), None);
        assert_eq!(tuple_from_value(&Value::Text("a".into()), &lim()), None);
        assert_eq!(
            tuple_from_value(&Value::Array(vec![Value::Integer(1.into())]), &lim()),
            None
        );
        let too_many = tv(&["a"; 65]);
        assert_eq!(tuple_from_value(&too_many, &lim()), None);

        let pv = Value::Array(vec![tv(&["user", "1"]), tv(&["alice"])]);
        assert_eq!(
            pair_from_value(&pv, &lim()),
            Some(Pair::new("user,1", "alice"))
        );
        assert_eq!(pair_to_value("user,1", "alice"), pv);
        assert_eq!(
            pair_from_value(&Value::Array(vec![tv(&["a"])]), &lim()),
            None
        );
        assert_eq!(
            pair_from_value(
                &Value::Array(vec![tv(&["a"]), tv(&["b"]), tv(&["c"])]),
                &lim()
            ),
            None
        );
        assert_eq!(
            pair_from_value(&Value::Array(vec![tv(&["a"]), tv(&[""])]), &lim()),
            None
        );
    }
}
