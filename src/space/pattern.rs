//! Patterns: full-match regexes over tuple text forms, plus an index hint
//! derived from the pattern's literal prefix.
//!
//! Pure logic. Must never do I/O, panic on client input, or hand out a hint
//! that excludes a key the regex would match (the store trusts the hint to
//! narrow its search, and always re-checks candidates with the pattern).

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use regex::{Regex, RegexBuilder};
use regex_syntax::ParserBuilder;
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::{Hir, HirKind, Look};

/// Resource bounds for compiling client-supplied patterns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatternLimits {
    /// Longest accepted pattern source, in bytes.
    pub max_pattern_bytes: usize,
    /// Bound on the compiled program and on the lazy DFA cache, in bytes.
    pub regex_size_limit: usize,
}

impl Default for PatternLimits {
    fn default() -> Self {
        PatternLimits {
            max_pattern_bytes: 8192,
            regex_size_limit: 1 << 20,
        }
    }
}

/// How the store can narrow the set of keys to test against a key pattern.
///
/// Every key the pattern matches is guaranteed to be covered by the hint;
/// keys covered by the hint may still fail the pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexHint {
    /// Only this key can match: one map lookup.
    Exact(String),
    /// Only these keys can match (sorted, deduplicated, two or more): one
    /// lookup each. Comes from finite alternations such as `a|b` or `(?i)ab`.
    AnyOf(Vec<String>),
    /// Only keys starting with this (non-empty) string can match: range scan.
    Prefix(String),
    /// No useful bound: test every key.
    Scan,
}

/// Why a pattern was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error(
        "pattern `{pattern}` is {len} bytes long; the limit is {max} bytes, use a shorter pattern"
    )]
    TooLong {
        /// Leading excerpt of the pattern (it may be huge).
        pattern: String,
        len: usize,
        max: usize,
    },
    #[error("pattern `{pattern}` does not compile: {reason}")]
    Invalid { pattern: String, reason: String },
}

/// A compiled full-match pattern.
#[derive(Clone, Debug)]
pub struct Pattern {
    source: String,
    matcher: Matcher,
    hint: IndexHint,
}

/// Building a `Regex` costs tens of microseconds, far more than an indexed
/// GET, so the most common shapes (an exact key, "any value") skip it.
#[derive(Clone, Debug)]
enum Matcher {
    /// The pattern is this literal text (no metacharacters, flags or
    /// assertions): full match is string equality.
    Literal(String),
    /// `.*`: any text without a `\n`.
    AnyLine,
    /// `(?s).*`: any text.
    Anything,
    /// Shared by every clone of the pattern (the store's pattern cache hands out clones): a
    /// `Regex` clone starts with an empty pool of search caches, so each clone searched once
    /// paid for a new lazy DFA (a take waiting on a cached pattern spent ~8 % of the primary's
    /// time in `init_cache` and determinisation); one `Regex` keeps its warm caches.
    Regex(Arc<Regex>),
}

impl Pattern {
    /// Compiles `src` (Python `re` syntax as far as Rust `regex` accepts it)
    /// so that it must match the whole text.
    pub fn compile(src: &str, limits: &PatternLimits) -> Result<Pattern, PatternError> {
        if src.len() > limits.max_pattern_bytes {
            return Err(PatternError::TooLong {
                pattern: excerpt(src),
                len: src.len(),
                max: limits.max_pattern_bytes,
            });
        }
        let invalid = |reason: String| PatternError::Invalid {
            pattern: excerpt(src),
            reason,
        };
        let translated = translate_python(src);
        // Parse the pattern on its own first: it proves the pattern is
        // self-contained, so `a)|(b` cannot escape the anchoring wrapper, and
        // gives clean error positions relative to what the client sent
        // (`\Z` -> `\z` keeps byte offsets unchanged).
        let hir = parse(&translated).map_err(invalid)?;
        let anchored = format!(r"\A(?:{translated})\z");
        // The wrapper could still change meaning if the pattern ends inside a
        // `(?x)` comment, which would swallow `)\z`. Comments need `#`, so
        // only then pay for a second parse to prove the wrapper is faithful.
        if translated.contains('#') {
            let expected = Hir::concat(vec![
                Hir::look(Look::Start),
                hir.clone(),
                Hir::look(Look::End),
            ]);
            if parse(&anchored).ok() != Some(expected) {
                return Err(invalid(
                    "it cannot be anchored for a full match (does it end inside a `(?x)` \
                     comment? add a newline at the end)"
                        .to_owned(),
                ));
            }
        }
        let hint = hint_for(&hir, limits);
        let matcher = match fast_matcher(&hir) {
            Some(m) => m,
            None => Matcher::Regex(Arc::new(
                RegexBuilder::new(&anchored)
                    .size_limit(limits.regex_size_limit)
                    .dfa_size_limit(limits.regex_size_limit)
                    .build()
                    .map_err(|e| invalid(regex_reason(&e)))?,
            )),
        };
        Ok(Pattern {
            source: src.to_owned(),
            matcher,
            hint,
        })
    }

    /// The pattern `src` without running the regex parser, if it is one of the shapes that need
    /// none: a plain key (alphanumerics and commas only: it matches exactly itself), `.*`, or
    /// `(?s).*`. Same result as [`Pattern::compile`] for those; `None` for anything else.
    pub fn plain(src: &str, limits: &PatternLimits) -> Option<Pattern> {
        if src.len() > limits.max_pattern_bytes {
            return None;
        }
        let (matcher, hint) = match src {
            ".*" => (Matcher::AnyLine, IndexHint::Scan),
            "(?s).*" => (Matcher::Anything, IndexHint::Scan),
            _ if !src.is_empty() && src.chars().all(|c| c == ',' || c.is_alphanumeric()) => (
                Matcher::Literal(src.to_owned()),
                IndexHint::Exact(src.to_owned()),
            ),
            _ => return None,
        };
        Some(Pattern {
            source: src.to_owned(),
            matcher,
            hint,
        })
    }

    /// True if the whole of `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        match &self.matcher {
            Matcher::Literal(lit) => text == lit,
            Matcher::AnyLine => !text.contains('\n'),
            Matcher::Anything => true,
            Matcher::Regex(re) => re.is_match(text),
        }
    }

    /// True if matching runs a regular expression (cost grows with the pattern and the text);
    /// false for the literal and "anything" shapes, which cost a comparison at most.
    pub fn uses_regex(&self) -> bool {
        matches!(self.matcher, Matcher::Regex(_))
    }

    pub fn hint(&self) -> &IndexHint {
        &self.hint
    }

    /// The pattern exactly as the client sent it.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The parser must be configured exactly like the one `regex` uses by
/// default, or the hint could describe a different language than the regex.
/// Errors come back as a one-line reason (the raw error is large).
fn parse(pattern: &str) -> Result<Hir, String> {
    ParserBuilder::new()
        .build()
        .parse(pattern)
        .map_err(|e| syntax_reason(&e))
}

/// Recognises patterns that need no regex, by HIR (so `user\,1` and
/// `user,1` are the same literal) rather than by source text.
fn fast_matcher(hir: &Hir) -> Option<Matcher> {
    static ANY_LINE: LazyLock<Option<Hir>> = LazyLock::new(|| parse(".*").ok());
    static ANYTHING: LazyLock<Option<Hir>> = LazyLock::new(|| parse("(?s).*").ok());
    match hir.kind() {
        HirKind::Empty => return Some(Matcher::Literal(String::new())),
        HirKind::Literal(lit) => {
            return String::from_utf8(lit.0.to_vec()).ok().map(Matcher::Literal);
        }
        _ => {}
    }
    if ANY_LINE.as_ref() == Some(hir) {
        Some(Matcher::AnyLine)
    } else if ANYTHING.as_ref() == Some(hir) {
        Some(Matcher::Anything)
    } else {
        None
    }
}

/// Python's `\Z` (end of text) is Rust's `\z`; Rust rejects `\Z`. Only a real
/// escape is rewritten: in `\\Z` the `Z` is a literal.
fn translate_python(src: &str) -> Cow<'_, str> {
    if !src.contains(r"\Z") {
        return Cow::Borrowed(src);
    }
    let mut out = String::with_capacity(src.len());
    let mut chars = src.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Z') => out.push_str(r"\z"),
            Some(next) => {
                out.push('\\');
                out.push(next);
            }
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

/// Derives the index hint from the literal prefixes every match must start
/// with. Exact literal sets mean the regex matches nothing else.
fn hint_for(hir: &Hir, limits: &PatternLimits) -> IndexHint {
    let mut extractor = Extractor::new();
    // A plain literal pattern is at most max_pattern_bytes long; allowing
    // literals that long keeps it Exact instead of a truncated Prefix.
    extractor
        .kind(ExtractKind::Prefix)
        .limit_literal_len(limits.max_pattern_bytes.max(1));
    let seq = extractor.extract(hir);
    let Some(lits) = seq.literals() else {
        return IndexHint::Scan;
    };
    // An empty set means "never matches"; a scan is correct and rare.
    if lits.is_empty() {
        return IndexHint::Scan;
    }
    if lits.iter().all(|l| l.is_exact()) {
        let strings: Option<Vec<String>> = lits
            .iter()
            .map(|l| String::from_utf8(l.as_bytes().to_vec()).ok())
            .collect();
        if let Some(mut strings) = strings {
            strings.sort();
            strings.dedup();
            return match strings.len() {
                1 => IndexHint::Exact(strings.swap_remove(0)),
                _ => IndexHint::AnyOf(strings),
            };
        }
    }
    let Some(lcp) = seq.longest_common_prefix() else {
        return IndexHint::Scan;
    };
    // The common prefix can end mid-character (e.g. `é|è` share one byte);
    // keys are whole strings, so cut back to a char boundary.
    let valid = match std::str::from_utf8(lcp) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&lcp[..e.valid_up_to()]).unwrap_or_default(),
    };
    if valid.is_empty() {
        IndexHint::Scan
    } else {
        IndexHint::Prefix(valid.to_owned())
    }
}

fn syntax_reason(e: &regex_syntax::Error) -> String {
    match e {
        regex_syntax::Error::Parse(a) => {
            format!("{} (at byte {})", a.kind(), a.span().start.offset)
        }
        regex_syntax::Error::Translate(h) => {
            format!("{} (at byte {})", h.kind(), h.span().start.offset)
        }
        other => one_line(&other.to_string()),
    }
}

fn regex_reason(e: &regex::Error) -> String {
    match e {
        regex::Error::CompiledTooBig(limit) => format!(
            "the compiled pattern would exceed the size limit of {limit} bytes; use a simpler pattern"
        ),
        regex::Error::Syntax(s) => one_line(s),
        other => one_line(&other.to_string()),
    }
}

/// `regex` syntax errors are multi-line diagrams; keep the `error:` line.
fn one_line(s: &str) -> String {
    s.lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map(str::to_owned)
        .unwrap_or_else(|| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Error messages quote the pattern; cap it so a huge pattern does not make a
/// huge message.
fn excerpt(src: &str) -> String {
    const MAX_CHARS: usize = 100;
    match src.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &src[..cut]),
        None => src.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(src: &str) -> Pattern {
        Pattern::compile(src, &PatternLimits::default()).unwrap()
    }

    fn err(src: &str) -> String {
        Pattern::compile(src, &PatternLimits::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn full_match_only() {
        assert!(p("a").is_match("a"));
        assert!(!p("a").is_match("ab"));
        assert!(!p("b").is_match("ab"));
        // Top-level alternation must be anchored as a whole.
        assert!(!p("a|b").is_match("ab"));
        assert!(p("a|ab").is_match("ab"));
        assert!(p("user,.*").is_match("user,1"));
        assert!(!p("user").is_match("user,1"));
        assert!(p("日本,٣").is_match("日本,٣"));
    }

    #[test]
    fn python_end_of_text() {
        let z = p(r"ab\Z");
        assert!(z.is_match("ab"));
        assert!(!z.is_match("abc"));
        // `\\Z` is an escaped backslash then a literal `Z`.
        let lit = p(r"a\\Z");
        assert!(lit.is_match(r"a\Z"));
        assert!(!lit.is_match("a"));
        assert_eq!(translate_python(r"\\\Z"), r"\\\z");
        assert_eq!(translate_python(r"a\Zb\\Z"), r"a\zb\\Z");
    }

    #[test]
    fn malformed_patterns() {
        let e = err("(a");
        assert!(e.contains("pattern `(a` does not compile"), "{e}");
        let e = err(r"(a)\1");
        assert!(e.contains("backreferences are not supported"), "{e}");
        let e = err("(?=a)");
        assert!(e.contains("look-around"), "{e}");
        assert!(err("(?<=a)b").contains("look-around"));
        assert!(err("a)|(b").contains("does not compile"));
        assert!(err("*").contains("does not compile"));
        // A trailing verbose comment would swallow the anchor.
        assert!(err("(?x)a#c").contains("anchored"));
        assert!(p("(?x)a #c\n").is_match("a"));
        // `#` outside verbose mode, or in a class, is an ordinary character.
        assert!(p("a#").is_match("a#"));
        assert!(p("[#]a|b#").is_match("#a"));
        assert!(p(r"(?x)[\#]a").is_match("#a"));
    }

    #[test]
    fn limits() {
        let small = PatternLimits {
            max_pattern_bytes: 4,
            regex_size_limit: 1 << 20,
        };
        let e = Pattern::compile("abcde", &small).unwrap_err();
        assert!(matches!(e, PatternError::TooLong { len: 5, max: 4, .. }));
        let tiny = PatternLimits {
            max_pattern_bytes: 8192,
            regex_size_limit: 100,
        };
        let e = Pattern::compile(r"\w{50}", &tiny).unwrap_err().to_string();
        assert!(e.contains("size limit"), "{e}");
        let long = "a".repeat(300);
        let e = Pattern::compile(&long, &small).unwrap_err().to_string();
        assert!(e.len() < 300, "message should quote an excerpt: {e}");
    }

    #[test]
    fn hints() {
        let exact = |s: &str| IndexHint::Exact(s.to_owned());
        let prefix = |s: &str| IndexHint::Prefix(s.to_owned());
        assert_eq!(p("user,1").hint(), &exact("user,1"));
        assert_eq!(p(r"user\,1").hint(), &exact("user,1"));
        assert_eq!(p(r"a\.b\*").hint(), &exact("a.b*"));
        assert_eq!(p(r"user,\d+").hint(), &prefix("user,"));
        assert_eq!(p("user,.*").hint(), &prefix("user,"));
        assert_eq!(p(".*").hint(), &IndexHint::Scan);
        assert_eq!(p(r"\w+,1").hint(), &IndexHint::Scan);
        assert!(!matches!(p("(?i)ab").hint(), IndexHint::Exact(_)));
        assert_eq!(
            p("a|b").hint(),
            &IndexHint::AnyOf(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            p("abc|abd").hint(),
            &IndexHint::AnyOf(vec!["abc".into(), "abd".into()])
        );
        assert_eq!(p("abc.|abd.").hint(), &prefix("ab"));
        assert_eq!(p("ab(c|d)+").hint(), &prefix("ab"));
        assert_eq!(p("user,[0-9]+").hint(), &prefix("user,"));
        // `é` and `è` share their first UTF-8 byte only.
        assert_eq!(p("é.*|è.*").hint(), &IndexHint::Scan);
        assert_eq!(p("日本.|日x.").hint(), &prefix("日"));
        // Case-insensitivity on digits leaves a plain literal.
        assert_eq!(p("(?i)12").hint(), &exact("12"));
        assert_eq!(p("(?i)a,b").hint().clone(), {
            let mut v: Vec<String> = ["A,B", "A,b", "a,B", "a,b"].map(String::from).to_vec();
            v.sort();
            IndexHint::AnyOf(v)
        });
        assert_eq!(p(r"ab\Z").hint(), &exact("ab"));
        assert_eq!(p("").hint(), &exact(""));
    }

    #[test]
    fn clones_share_one_compiled_regex() {
        // The store's pattern cache hands out clones: they must search with the same `Regex`
        // (and its warm caches), not each build a lazy DFA again.
        let a = p("queue,.*");
        let b = a.clone();
        match (&a.matcher, &b.matcher) {
            (Matcher::Regex(x), Matcher::Regex(y)) => assert!(Arc::ptr_eq(x, y)),
            _ => panic!("queue,.* should need a regex"),
        }
        assert!(b.is_match("queue,1") && !b.is_match("job,1"));
    }

    #[test]
    fn fast_matchers_agree_with_regex() {
        assert!(matches!(p("user,1").matcher, Matcher::Literal(_)));
        assert!(matches!(p(r"user\,1").matcher, Matcher::Literal(_)));
        assert!(matches!(p(".*").matcher, Matcher::AnyLine));
        assert!(matches!(p("(?s).*").matcher, Matcher::Anything));
        assert!(matches!(p(".*?").matcher, Matcher::Regex(_)));
        assert!(matches!(p(r"ab\Z").matcher, Matcher::Regex(_)));
        assert!(matches!(p("(?i)ab").matcher, Matcher::Regex(_)));
        let texts = ["", "a", "user,1", "user,10", "a\nb", "\n", "日本"];
        for src in ["user,1", r"user\,1", "", ".*", "(?s).*", "日本"] {
            let fast = p(src);
            let slow = Regex::new(&format!(r"\A(?:{src})\z")).unwrap();
            for t in texts {
                assert_eq!(fast.is_match(t), slow.is_match(t), "{src:?} on {t:?}");
            }
        }
    }

    #[test]
    fn plain_agrees_with_compile() {
        let l = PatternLimits::default();
        for src in ["user,1", "日本,٣", "a", ".*", "(?s).*"] {
            let fast = Pattern::plain(src, &l).unwrap();
            let slow = p(src);
            assert_eq!(fast.hint(), slow.hint(), "{src}");
            assert_eq!(fast.uses_regex(), slow.uses_regex(), "{src}");
            for t in ["", "a", "user,1", "user,10", "a\nb", "日本,٣"] {
                assert_eq!(fast.is_match(t), slow.is_match(t), "{src:?} on {t:?}");
            }
        }
        for src in ["", "a.*", "a|b", "(?i)a", "a b", "user,\\d"] {
            assert!(Pattern::plain(src, &l).is_none(), "{src}");
        }
        let tiny = PatternLimits {
            max_pattern_bytes: 2,
            ..l
        };
        assert!(Pattern::plain("abc", &tiny).is_none());
    }

    #[test]
    fn source_is_kept() {
        assert_eq!(p(r"a\Z").source(), r"a\Z");
    }
}
