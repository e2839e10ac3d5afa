//! The client wire contract (`PROTOCOL.md`), checked against real processes: every status of §4,
//! every close code of §5, framing (§2), the semantics of the four operators, shutdown and saving,
//! and the command-line failures of SPEC §2.
//!
//! Run: `CARGO_TARGET_DIR=/work/target-tests cargo test --test protocol -- --test-threads=2`

mod common;

use std::time::{Duration, Instant};

use ciborium::Value;
use common::*;
use nix::sys::signal::Signal;
use tuplespace::net::tls::{self, CertRole};
use tuplespace::wire::client::{BackupState, Status};

// ---------------------------------------------------------------------------------------------
// ok: semantics of GET, PUT, POST, DELETE
// ---------------------------------------------------------------------------------------------

/// The hex blocks of docs/PROTOCOL.md §6, in order: request, answer, request, answer, ...
fn section_6_frames() -> Vec<Vec<u8>> {
    let doc = include_str!("../docs/PROTOCOL.md");
    let six = doc
        .split("\n## 6.")
        .nth(1)
        .and_then(|s| s.split("\n## 7.").next())
        .expect("docs/PROTOCOL.md has a section 6 followed by a section 7");
    six.split("```")
        .skip(1)
        .step_by(2)
        .map(|block| block.split_whitespace().collect::<String>())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|h| {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_example_of_section_6() {
    // Each request of the example, sent byte for byte as the document shows it, gets exactly the
    // answer bytes the document shows.
    let frames = section_6_frames();
    assert_eq!(frames.len(), 8, "four requests and four answers in §6");
    let cl = Cluster::start().await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    for pair in frames.chunks(2) {
        let (request, answer) = (&pair[0], &pair[1]);
        s.write(request).await.expect("write the example request");
        let body = s.read_body().await;
        let mut got = (body.len() as u32).to_be_bytes().to_vec();
        got.extend(&body);
        assert_eq!(
            &got, answer,
            "answer to {request:02x?} differs from docs/PROTOCOL.md §6"
        );
    }

    // The same through the reference client, by meaning.
    let mut c = cl.client().await;
    let r = c.request("GET", pats(r"user,\d+", ".*")).await.unwrap();
    assert_eq!(
        pairs_of(&r),
        owned(&[("user,1", "alice"), ("user,2", "bob")])
    );
    let r = c.request("FROB", Some(Value::Array(vec![]))).await.unwrap();
    assert_eq!(r.status, Status::NotImplemented, "{r:?}");
    assert!(r.pairs.is_none() && r.rejected.is_none(), "{r:?}");

    // A frame of length 0 closes the connection with FRAME_TOO_LARGE (§6, last line).
    s.write(&[0, 0, 0, 0]).await.expect("write");
    assert_eq!(raw.ended(Duration::from_secs(5)).await.code(), Some(0x3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_rejects_present_keys_and_repeats_within_one_request() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let r = c
        .request("PUT", Some(Value::Array(vec![tpair("k", "1")])))
        .await
        .unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());

    let args = vec![
        tpair("k", "2"),
        tpair("n", "1"),
        tpair("n", "2"),
        tpair("m,x", "3"),
    ];
    let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
    assert_eq!(rejected_of(&r), vec![tpair("k", "2"), tpair("n", "2")]);

    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("k", "1"), ("m,x", "3"), ("n", "1")]));

    // An empty PUT is ok with nothing rejected.
    let r = c.request("PUT", Some(Value::Array(vec![]))).await.unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ill_formed_pairs_are_rejected_exactly_as_sent_in_order() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let at_arity: Vec<String> = (0..64).map(|i| format!("e{i}")).collect();
    let past_arity: Vec<String> = (0..65).map(|i| format!("e{i}")).collect();
    let refs = |v: &[String]| -> Vec<Value> { v.iter().map(|s| text(s)).collect() };
    let long_ok = "a".repeat(4096);
    let long_bad = "a".repeat(4097);
    // 2049 two-byte characters: 4098 bytes (past the limit) in fewer than 4096 characters.
    let wide_bad = "é".repeat(2049);
    let wide_ok = "é".repeat(2048);

    let bad: Vec<Value> = vec![
        pair(&["a"], &[""]),    // empty element
        pair(&["a-b"], &["x"]), // not alphanumeric
        pair(&["a b"], &["x"]), // space
        pair(&["a,b"], &["x"]), // comma inside an element
        Value::Array(vec![Value::Array(refs(&past_arity)), tuple(&["v"])]), // arity 65
        pair(&["k"], &[long_bad.as_str()]), // element 4097 bytes
        pair(&[wide_bad.as_str()], &["v"]), // element 4098 bytes, 2049 chars
        text("notapair"),       // not an array
        Value::Integer(42.into()),
        Value::Array(vec![]),              // no tuples
        Value::Array(vec![tuple(&["x"])]), // one tuple
        Value::Array(vec![tuple(&["x"]), tuple(&["y"]), tuple(&["z"])]), // three tuples
        Value::Array(vec![Value::Array(vec![]), tuple(&["v"])]), // empty key tuple
        Value::Array(vec![
            Value::Array(vec![Value::Integer(1.into())]),
            tuple(&["v"]),
        ]), // non-text element
        Value::Array(vec![tuple(&["x"]), text("y")]), // value not an array
        map(&[("key", text("x"))]),
        Value::Bytes(vec![1, 2, 3]),
        Value::Null,
    ];
    let good: Vec<Value> = vec![
        pair(&["g1"], &["v"]),
        Value::Array(vec![Value::Array(refs(&at_arity)), tuple(&["v"])]),
        pair(&["g3"], &[long_ok.as_str()]),
        pair(&[wide_ok.as_str()], &["v"]),
    ];
    // Interleave: good ones at positions 0, 5, 10, 15 among the bad ones.
    let mut args = Vec::new();
    let mut g = good.iter();
    for (i, b) in bad.iter().enumerate() {
        if i % 5 == 0
            && let Some(x) = g.next()
        {
            args.push(x.clone());
        }
        args.push(b.clone());
    }
    args.extend(g.cloned());
    let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
    assert_eq!(
        rejected_of(&r),
        bad,
        "every ill-formed element, exactly as sent, in request order"
    );

    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    let keys: Vec<String> = pairs_of(&r).into_iter().map(|(k, _)| k).collect();
    let mut want = vec![
        "g1".to_string(),
        at_arity.join(","),
        "g3".to_string(),
        wide_ok.clone(),
    ];
    want.sort();
    assert_eq!(keys, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_replaces_only_present_keys() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let r = c
        .request(
            "PUT",
            Some(Value::Array(vec![tpair("a", "1"), tpair("b", "2")])),
        )
        .await
        .unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());

    let args = vec![
        tpair("a", "10"),
        tpair("c", "3"),
        text("junk"),
        tpair("a", "11"),
        pair(&["b"], &["x-y"]),
    ];
    let r = c.request("POST", Some(Value::Array(args))).await.unwrap();
    assert_eq!(
        rejected_of(&r),
        vec![tpair("c", "3"), text("junk"), pair(&["b"], &["x-y"])]
    );

    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(
        pairs_of(&r),
        owned(&[("a", "11"), ("b", "2")]),
        "POST must not insert `c`"
    );

    let r = c.request("POST", Some(Value::Array(vec![]))).await.unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_returns_removed_pairs_ascending_and_removes_them() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let args = vec![
        tpair("k,3", "c"),
        tpair("other", "z"),
        tpair("k,1", "a"),
        tpair("k,2", "skip"),
        tpair("k,10", "b"),
    ];
    let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());

    let r = c.request("DELETE", pats(r"k,\d+", "[a-c]")).await.unwrap();
    assert_eq!(
        pairs_of(&r),
        owned(&[("k,1", "a"), ("k,10", "b"), ("k,3", "c")])
    );

    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("k,2", "skip"), ("other", "z")]));

    let r = c.request("DELETE", pats(r"k,\d+", "[a-c]")).await.unwrap();
    assert_eq!(pairs_of(&r), vec![], "a second DELETE finds nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_is_ascending_by_key_text_in_code_point_order() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    // Scrambled insertion order. Code point order: Z < a < a,b < aa < b < e < f < é < 日本 < ｱ < 𝟘
    // (a locale order would put é next to e; UTF-16 order would put 𝟘 before ｱ).
    let keys = ["é", "b", "𝟘", "a", "f", "Z", "日本", "aa", "ｱ", "e", "a,b"];
    let args: Vec<Value> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| tpair(k, &format!("v{i}")))
        .collect();
    let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());

    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    let got: Vec<String> = pairs_of(&r).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        got,
        ["Z", "a", "a,b", "aa", "b", "e", "f", "é", "日本", "ｱ", "𝟘"]
    );
    let mut sorted = got.clone();
    sorted.sort_by(|x, y| x.chars().cmp(y.chars()));
    assert_eq!(got, sorted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_alphanumerics_are_accepted() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let args = vec![
        pair(&["é", "日本"], &["٣"]),
        pair(&["Ωmega", "ß"], &["x٣y"]),
        pair(&["x"], &["é"]),
    ];
    let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
    assert_eq!(
        rejected_of(&r),
        Vec::<Value>::new(),
        "Unicode alphanumerics are well-formed"
    );

    let r = c.request("GET", pats("é,日本", "٣")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("é,日本", "٣")]));
    // \d is Unicode-aware (Python 3 `re` and Rust `regex` agree): it matches ٣.
    let r = c.request("GET", pats(r"é,\w+", r"\d")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("é,日本", "٣")]));
    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(
        pairs_of(&r),
        owned(&[("x", "é"), ("é,日本", "٣"), ("Ωmega,ß", "x٣y")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_must_match_the_whole_text_form() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let args = vec![
        tpair("user,1", "alice"),
        tpair("user,10", "bob"),
        tpair("a", "v"),
        tpair("ab", "v"),
        tpair("abc", "v"),
        tpair("xa", "v"),
    ];
    let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());

    let keys = |r: &tuplespace::wire::client::Response| -> Vec<String> {
        pairs_of(r).into_iter().map(|(k, _)| k).collect()
    };
    let r = c.request("GET", pats("user,1", ".*")).await.unwrap();
    assert_eq!(keys(&r), ["user,1"], "user,1 must not match user,10");
    let r = c.request("GET", pats("a", ".*")).await.unwrap();
    assert_eq!(keys(&r), ["a"], "a must not match ab or xa");
    // Alternation is anchored as a whole (not `^a|ab$`).
    let r = c.request("GET", pats("a|ab", ".*")).await.unwrap();
    assert_eq!(keys(&r), ["a", "ab"]);
    let r = c.request("GET", pats("user,1.*", ".*")).await.unwrap();
    assert_eq!(keys(&r), ["user,1", "user,10"]);
    // The value pattern is anchored too.
    let r = c.request("GET", pats("user,.*", "b")).await.unwrap();
    assert_eq!(keys(&r), Vec::<String>::new());
    let r = c.request("GET", pats("user,.*", "bo+b")).await.unwrap();
    assert_eq!(keys(&r), ["user,10"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_pattern_gives_ok_empty_and_a_message() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let r = c
        .request("PUT", Some(Value::Array(vec![tpair("a", "b")])))
        .await
        .unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());

    for (k, v) in [("(", ".*"), (".*", "("), (r"(a)\1", ".*"), ("(?=a)a", ".*")] {
        let r = c.request("GET", pats(k, v)).await.unwrap();
        assert_eq!(pairs_of(&r), vec![], "GET {k:?} {v:?}: {r:?}");
        let m = r.message.clone().unwrap_or_default();
        assert!(
            !m.is_empty(),
            "GET {k:?} {v:?}: an invalid pattern needs a message: {r:?}"
        );
        let bad = if k == ".*" { v } else { k };
        assert!(
            m.contains(bad),
            "the message must say which pattern ({bad:?}): {m}"
        );
    }
    // Patterns the engine refuses for their size are "does not compile" too.
    let too_long = "a".repeat(9000); // over max_pattern_bytes (8192)
    for (k, v) in [(too_long.as_str(), ".*"), (".*", "(a{1000}){1000}")] {
        let r = c.request("GET", pats(k, v)).await.unwrap();
        assert_eq!(pairs_of(&r), vec![], "oversized pattern: {:?}", r.message);
        assert!(
            r.message.as_deref().is_some_and(|m| !m.is_empty()),
            "{:?}",
            r.message
        );
    }
    // DELETE with an invalid pattern deletes nothing.
    let r = c.request("DELETE", pats(".*", "(")).await.unwrap();
    assert_eq!(pairs_of(&r), vec![]);
    assert!(r.message.is_some(), "{r:?}");
    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("a", "b")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_names_are_case_insensitive() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let r = c
        .request(
            "pUt",
            Some(Value::Array(vec![tpair("a", "1"), tpair("b", "2")])),
        )
        .await
        .unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());
    let r = c.request("gEt", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("a", "1"), ("b", "2")]));
    let r = c
        .request("post", Some(Value::Array(vec![tpair("a", "3")])))
        .await
        .unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());
    let r = c.request("Delete", pats("b", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("b", "2")]));
    let r = c.request("get", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("a", "3")]));
    // Unknown operators keep their spelling in the message.
    let r = c.request("fRoB", None).await.unwrap();
    assert_eq!(r.status, Status::NotImplemented, "{r:?}");
    assert!(r.message.unwrap_or_default().contains("fRoB"));
}

// ---------------------------------------------------------------------------------------------
// malformed
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_answered_and_the_stream_goes_on() {
    let cl = Cluster::start().await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    let r = s
        .call(1, "PUT", Some(Value::Array(vec![tpair("a", "1")])))
        .await;
    assert_eq!(rejected_of(&r), Vec::<Value>::new());

    let mut trailing = cbor(&req(50, "GET", pats(".*", ".*")));
    trailing.push(0x00);
    let not_text_op = map(&[
        ("id", Value::Integer(55.into())),
        ("op", Value::Integer(1.into())),
    ]);
    let neg_id = map(&[
        ("id", Value::Integer((-1).into())),
        ("op", text("GET")),
        ("args", pats(".*", ".*").unwrap()),
    ]);
    let text_id = map(&[
        ("id", text("7")),
        ("op", text("GET")),
        ("args", pats(".*", ".*").unwrap()),
    ]);
    // (body, expected id)
    let cases: Vec<(&str, Vec<u8>, Option<u64>)> = vec![
        ("not CBOR", vec![0xff, 0xff], None),
        ("truncated CBOR", vec![0x82, 0x01], None),
        ("bytes after the CBOR item", trailing, None),
        ("an integer", cbor(&Value::Integer(3.into())), None),
        (
            "an array",
            cbor(&Value::Array(vec![text("id"), Value::Integer(1.into())])),
            None,
        ),
        ("a text", cbor(&text("GET")), None),
        (
            "map without id",
            cbor(&map(&[
                ("op", text("GET")),
                ("args", pats(".*", ".*").unwrap()),
            ])),
            None,
        ),
        ("negative id", cbor(&neg_id), None),
        ("text id", cbor(&text_id), None),
        (
            "map without op",
            cbor(&map(&[("id", Value::Integer(21.into()))])),
            Some(21),
        ),
        ("op not text", cbor(&not_text_op), Some(55)),
        (
            "PUT args a text",
            cbor(&req(22, "PUT", Some(text("x")))),
            Some(22),
        ),
        (
            "PUT args a map",
            cbor(&req(23, "PUT", Some(map(&[("a", text("b"))])))),
            Some(23),
        ),
        ("PUT without args", cbor(&req(24, "PUT", None)), Some(24)),
        (
            "POST args a text",
            cbor(&req(25, "POST", Some(text("x")))),
            Some(25),
        ),
        (
            "GET args a text",
            cbor(&req(26, "GET", Some(text(".*")))),
            Some(26),
        ),
        (
            "GET one pattern",
            cbor(&req(27, "GET", Some(Value::Array(vec![text(".*")])))),
            Some(27),
        ),
        (
            "GET three patterns",
            cbor(&req(
                28,
                "GET",
                Some(Value::Array(vec![text("a"), text("b"), text("c")])),
            )),
            Some(28),
        ),
        (
            "GET a non-text pattern",
            cbor(&req(
                29,
                "GET",
                Some(Value::Array(vec![text("a"), Value::Integer(1.into())])),
            )),
            Some(29),
        ),
        ("GET without args", cbor(&req(30, "GET", None)), Some(30)),
        (
            "DELETE args a text",
            cbor(&req(31, "DELETE", Some(text("x")))),
            Some(31),
        ),
    ];
    let mut next_ok = 100;
    for (what, body, id) in cases {
        s.write_frame(&body).await;
        let r = s.answer().await;
        assert_eq!(r.status, Status::Malformed, "{what}: {r:?}");
        assert_eq!(r.id, id, "{what}: id in the answer: {r:?}");
        assert!(
            r.message.as_deref().is_some_and(|m| !m.is_empty()),
            "{what}: needs a message: {r:?}"
        );
        assert!(r.pairs.is_none() && r.rejected.is_none(), "{what}: {r:?}");
        // The same stream still serves.
        next_ok += 1;
        let r = s.call(next_ok, "GET", pats(".*", ".*")).await;
        assert_eq!(pairs_of(&r), owned(&[("a", "1")]), "after {what}");
    }
    // The largest id is echoed.
    let r = s.call(u64::MAX, "GET", pats("a", "1")).await;
    assert_eq!(pairs_of(&r), owned(&[("a", "1")]));
    // Nothing was changed by the malformed writes.
    let r = s.call(999, "GET", pats(".*", ".*")).await;
    assert_eq!(pairs_of(&r), owned(&[("a", "1")]));
}

// ---------------------------------------------------------------------------------------------
// forbidden
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_operations_are_forbidden_on_the_client_sap() {
    let cl = Cluster::start().await;
    for role in [CertRole::Client, CertRole::Admin] {
        let mut c = cl.client_as(role).await;
        for op in ["STATUS", "SHUTDOWN", "status", "Shutdown"] {
            let r = c.request(op, None).await.unwrap();
            assert_eq!(
                r.status,
                Status::Forbidden,
                "{op} with {role:?} on the client SAP: {r:?}"
            );
            assert!(r.message.is_some(), "{r:?}");
            assert!(r.cluster.is_none(), "{r:?}");
        }
        // Still serving (SHUTDOWN was not carried out).
        let r = c.request("GET", pats(".*", ".*")).await.unwrap();
        assert_eq!(pairs_of(&r), vec![]);
    }
    let status = cl.status().await;
    assert!(status.primary.is_some(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_operations_are_forbidden_on_the_shutdown_sap() {
    let cl = Cluster::start().await;
    let mut a = cl.admin().await;
    let cases = [
        ("GET", pats(".*", ".*")),
        ("get", pats(".*", ".*")),
        ("PUT", Some(Value::Array(vec![tpair("a", "1")]))),
        ("POST", Some(Value::Array(vec![tpair("a", "1")]))),
        ("DELETE", pats(".*", ".*")),
    ];
    for (op, args) in cases {
        let r = a.request(op, args).await.unwrap();
        assert_eq!(
            r.status,
            Status::Forbidden,
            "{op} on the shutdown SAP: {r:?}"
        );
        assert!(r.message.is_some(), "{r:?}");
    }
    // The PUT was not applied.
    let mut c = cl.client().await;
    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), vec![]);
    // Unknown operators are not-implemented there too.
    let r = a.request("FROB", None).await.unwrap();
    assert_eq!(r.status, Status::NotImplemented, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_describes_the_cluster() {
    let cl = Cluster::start().await;
    let mut c = cl.client().await;
    let args: Vec<Value> = (0..7).map(|i| tpair(&format!("s,{i}"), "v")).collect();
    let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());

    let st = cl.status().await;
    assert!(st.epoch >= 1, "epoch: {st:?}");
    let primary = st
        .primary
        .clone()
        .unwrap_or_else(|| panic!("no primary: {st:?}"));
    // SPEC §2: the handle of a local replica is its process id.
    assert_eq!(primary.handle, cl.server_pid().to_string(), "{st:?}");
    assert_eq!(primary.sap, cl.primary_sap, "{st:?}");
    assert_eq!(primary.pid, cl.server_pid(), "{st:?}");
    match &st.backup {
        Some(backup) => {
            assert_ne!(backup.pid, cl.server_pid(), "{st:?}");
            assert!(
                alive(backup.pid),
                "the backup's pid is not a live process: {st:?}"
            );
            assert_eq!(backup.handle, backup.pid.to_string(), "{st:?}");
            // SPEC §2: the backup listens on BACKUP_SAP.
            assert_eq!(backup.sap, cl.backup_sap, "{st:?}");
            assert_ne!(st.backup_state, BackupState::Absent, "{st:?}");
            assert_eq!(
                st.backup_synced,
                st.backup_state == BackupState::Synced,
                "{st:?}"
            );
        }
        None => assert_eq!(st.backup_state, BackupState::Absent, "{st:?}"),
    }
    assert!(st.clients >= 1, "{st:?}");
    // `pairs` is counted by the primary after every write answered before the STATUS: exact.
    assert_eq!(st.pairs, Some(7), "{st:?}");

    // On the wire: the keys of PROTOCOL.md §4, with their types.
    let raw = raw_connect(&cl.shutdown_sap, &cl.certs, "admin", ALPN)
        .await
        .expect("admin connection");
    let mut stream = raw.open().await;
    stream.write_value(&req(99, "STATUS", None)).await;
    let wire = stream.read_value().await;
    let cluster = get(&wire, "cluster").unwrap_or_else(|| panic!("{wire:?}"));
    for key in ["epoch", "clients", "pairs", "pending"] {
        assert!(
            get(cluster, key).and_then(as_u64).is_some(),
            "{key}: {cluster:?}"
        );
    }
    assert!(
        get(cluster, "primary")
            .and_then(|p| get(p, "pid"))
            .is_some()
    );
    assert!(
        get(cluster, "backup").is_some(),
        "`backup` present (maybe null)"
    );
    assert!(matches!(
        get(cluster, "backup_synced"),
        Some(Value::Bool(_))
    ));
    assert!(get(cluster, "backup_state").and_then(as_text).is_some());
    assert!(get(cluster, "replication_lag").is_some(), "{cluster:?}");
}

// ---------------------------------------------------------------------------------------------
// too-large
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_over_max_response_bytes_are_too_large_and_change_nothing() {
    let cl = Cluster::builder()
        .set("max_response_bytes=4096")
        .set("max_request_bytes=2048")
        .start()
        .await;
    let mut c = cl.client().await;
    let value = "v".repeat(90);
    for chunk in 0..4 {
        let args: Vec<Value> = (chunk * 15..chunk * 15 + 15)
            .map(|i| pair(&["k", &i.to_string()], &[&value]))
            .collect();
        let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
        assert_eq!(rejected_of(&r), Vec::<Value>::new());
    }
    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(
        r.status,
        Status::TooLarge,
        "60 pairs of ~100 bytes exceed 4096: {r:?}"
    );
    assert!(r.message.is_some() && r.pairs.is_none(), "{r:?}");

    let r = c.request("DELETE", pats(".*", ".*")).await.unwrap();
    assert_eq!(r.status, Status::TooLarge, "{r:?}");
    assert!(r.pairs.is_none(), "{r:?}");

    // Nothing was deleted: count with narrow GETs.
    let mut n = 0;
    for p in [r"k,\d", r"k,[12]\d", r"k,[34]\d", r"k,5\d"] {
        let r = c.request("GET", pats(p, ".*")).await.unwrap();
        n += pairs_of(&r).len();
    }
    assert_eq!(n, 60, "a too-large DELETE must not change anything");
    // A narrow DELETE still works.
    let r = c.request("DELETE", pats(r"k,5\d", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r).len(), 10);
}

// ---------------------------------------------------------------------------------------------
// unavailable, unknown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_server_requests_are_unavailable_after_the_request_timeout() {
    let cl = Cluster::builder()
        .no_server()
        .set("request_timeout_ms=1500")
        .start()
        .await;
    let mut c = cl.client().await;
    for (op, args) in [
        ("GET", pats(".*", ".*")),
        ("PUT", Some(Value::Array(vec![tpair("a", "1")]))),
    ] {
        let t0 = Instant::now();
        let r = c.request(op, args).await.unwrap();
        let took = t0.elapsed();
        assert_eq!(r.status, Status::Unavailable, "{op}: {r:?}");
        assert!(r.message.is_some(), "{r:?}");
        assert!(
            took >= Duration::from_millis(1300) && took < Duration::from_millis(6000),
            "{op}: answered after {took:?}, expected about the 1500 ms request timeout"
        );
    }
    let st = cl.status().await;
    assert_eq!(st.primary, None, "{st:?}");
    assert_eq!(st.pairs, None, "no primary, nothing counted: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_stopped_primary_with_no_replica_left_is_unknown() {
    let cl = Cluster::builder()
        .set("request_timeout_ms=1500")
        .set("heartbeat_timeout_ms=1000")
        .start()
        .await;
    let mut c = cl.client().await;
    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), vec![]);
    // Stop every replica (the primary, and its backup if it has one): no replica is left that
    // could tell whether the write was applied.
    let st = cl.status().await;
    let mut stopped = vec![cl.server_pid()];
    if let Some(b) = st.pid_of("backup") {
        stopped.push(b);
    }
    for pid in &stopped {
        signal(*pid, Signal::SIGSTOP);
    }
    let t0 = Instant::now();
    let r = c
        .request("PUT", Some(Value::Array(vec![tpair("a", "1")])))
        .await
        .unwrap();
    for pid in &stopped {
        signal(*pid, Signal::SIGCONT);
    }
    assert_eq!(r.status, Status::Unknown, "{r:?} after {:?}", t0.elapsed());
    assert!(r.message.is_some(), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Close codes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_limit_are_refused() {
    let cl = Cluster::builder().max_clients(1).start().await;
    let first = cl.raw_client().await;
    let mut s1 = first.open().await;
    let r = s1.call(1, "GET", pats(".*", ".*")).await;
    assert_eq!(pairs_of(&r), vec![]);

    // The handshake of the second one succeeds; then it is closed at once.
    let second = cl.raw_client().await;
    match second.ended(Duration::from_secs(5)).await {
        Ended::App { code, reason } => {
            assert_eq!(code, 1, "SERVICE_REFUSED: {reason}");
            assert!(reason.starts_with("service refused"), "reason: {reason:?}");
        }
        other => panic!("second client not refused: {other:?}"),
    }
    // The first one is unaffected.
    let r = s1.call(2, "GET", pats(".*", ".*")).await;
    assert_eq!(pairs_of(&r), vec![]);

    // Its slot is freed when it leaves: a new client gets in.
    first.conn.close(0u32.into(), b"bye");
    let _ = tokio::time::timeout(Duration::from_secs(2), first.ep.wait_idle()).await;
    let ok = wait_until(Duration::from_secs(10), || async {
        let Ok(c) = raw_connect(&cl.client_sap, &cl.certs, "client", ALPN).await else {
            return false;
        };
        let mut s = c.open().await;
        s.write_value(&req(3, "GET", pats(".*", ".*"))).await;
        let got = matches!(s.read().await, Read::Answer(r) if r.status == Status::Ok);
        c.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), c.ep.wait_idle()).await;
        got
    })
    .await;
    assert!(
        ok,
        "after the first client left, a new one must be accepted"
    );
}

/// Opens a connection with `name`'s certificate, sends a valid `op`, and checks that no answer
/// comes and the connection is closed with FORBIDDEN.
async fn expect_forbidden(
    sap: &str,
    certs: &std::path::Path,
    name: &str,
    op: &str,
    args: Option<Value>,
) {
    let raw = raw_connect(sap, certs, name, ALPN)
        .await
        .unwrap_or_else(|e| {
            panic!("the handshake itself should succeed for a {name} certificate: {e}")
        });
    // Opening a stream or writing may fail if the close already arrived: that is fine too.
    if let Ok(Ok((send, recv))) =
        tokio::time::timeout(Duration::from_secs(5), raw.conn.open_bi()).await
    {
        let mut s = RawStream {
            send,
            recv: tuplespace::net::stream::FramedRecv::new(recv, 1 << 20),
        };
        let _ = s.write(&framed(&cbor(&req(1, op, args)))).await;
        match s.read().await {
            Read::Answer(r) => panic!("{name} certificate on {sap}: got an answer {r:?}"),
            Read::End | Read::Failed(_) => {}
        }
    }
    match raw.ended(Duration::from_secs(5)).await {
        Ended::App { code, reason } => {
            assert_eq!(code, 2, "FORBIDDEN expected for {name}: {reason}")
        }
        other => panic!("{name} certificate on {sap}: not closed with FORBIDDEN: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificate_roles_are_closed_with_forbidden() {
    let cl = Cluster::start().await;
    expect_forbidden(&cl.shutdown_sap, &cl.certs, "client", "STATUS", None).await;
    expect_forbidden(&cl.shutdown_sap, &cl.certs, "node", "STATUS", None).await;
    expect_forbidden(&cl.client_sap, &cl.certs, "node", "GET", pats(".*", ".*")).await;
    // A node certificate issued later by the same CA, under another name, is refused as well.
    let extra = cl.dir.path().join("extra");
    tls::issue(&cl.certs, CertRole::Node, "intruder", &[], &extra).unwrap();
    expect_forbidden(&cl.client_sap, &extra, "node", "GET", pats(".*", ".*")).await;
    // The refused peers did not count as clients, and the service still serves.
    let mut c = cl.client().await;
    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), vec![]);
    // An issued client certificate (same CA) is accepted.
    let extra2 = cl.dir.path().join("extra2");
    tls::issue(&cl.certs, CertRole::Client, "bob", &[], &extra2).unwrap();
    let raw = raw_connect(&cl.client_sap, &extra2, "client", ALPN)
        .await
        .unwrap();
    let mut s = raw.open().await;
    let r = s.call(5, "GET", pats(".*", ".*")).await;
    assert_eq!(pairs_of(&r), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_length_zero_closes_with_frame_too_large() {
    let cl = Cluster::start().await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    let r = s.call(1, "GET", pats(".*", ".*")).await;
    assert_eq!(pairs_of(&r), vec![]);
    s.write(&[0, 0, 0, 0]).await.unwrap();
    match raw.ended(Duration::from_secs(5)).await {
        Ended::App { code, reason } => assert_eq!(code, 3, "FRAME_TOO_LARGE expected: {reason}"),
        other => panic!("length 0 did not close with FRAME_TOO_LARGE: {other:?}"),
    }
    // Other connections are not affected.
    let mut c = cl.client().await;
    assert_eq!(
        pairs_of(&c.request("GET", pats(".*", ".*")).await.unwrap()),
        vec![]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_max_request_bytes_close_with_frame_too_large() {
    let cl = Cluster::builder()
        .set("max_request_bytes=2048")
        .start()
        .await;
    // Exactly at the limit: accepted (a PUT of one ill-formed text element, echoed back).
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    let body = exact_size_put(7, 2048);
    assert_eq!(body.len(), 2048);
    s.write_frame(&body).await;
    let r = s.answer().await;
    assert_eq!(r.id, Some(7));
    assert_eq!(rejected_of(&r).len(), 1, "{r:?}");

    // One byte over: the connection is closed.
    let body = exact_size_put(8, 2049);
    s.write_frame(&body).await;
    match raw.ended(Duration::from_secs(5)).await {
        Ended::App { code, reason } => assert_eq!(code, 3, "FRAME_TOO_LARGE expected: {reason}"),
        other => panic!("a 2049-byte frame did not close with FRAME_TOO_LARGE: {other:?}"),
    }

    // Only the header of a huge frame: closed without waiting for the body.
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    s.write(&(64u32 << 20).to_be_bytes()).await.unwrap();
    match raw.ended(Duration::from_secs(5)).await {
        Ended::App { code, reason } => assert_eq!(code, 3, "FRAME_TOO_LARGE expected: {reason}"),
        other => panic!("a 64 MiB length did not close with FRAME_TOO_LARGE: {other:?}"),
    }
}

/// A PUT request `{id, op: "PUT", args: ["xxx…"]}` whose CBOR encoding is exactly `n` bytes.
fn exact_size_put(id: u64, n: usize) -> Vec<u8> {
    for pad in (0..n).rev() {
        let body = cbor(&req(
            id,
            "PUT",
            Some(Value::Array(vec![text(&"x".repeat(pad))])),
        ));
        if body.len() == n {
            return body;
        }
    }
    panic!("cannot build a request of exactly {n} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_client_connections_with_shutting_down() {
    let cl = Cluster::start().await;
    let client = cl.raw_client().await;
    let mut s = client.open().await;
    let r = s.call(1, "GET", pats(".*", ".*")).await;
    assert_eq!(pairs_of(&r), vec![]);

    let admin = raw_connect(&cl.shutdown_sap, &cl.certs, "admin", ALPN)
        .await
        .unwrap();
    let mut a = admin.open().await;
    let r = a.call(1, "SHUTDOWN", None).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");

    match client.ended(Duration::from_secs(10)).await {
        Ended::App { code, reason } => assert_eq!(code, 4, "SHUTTING_DOWN expected: {reason}"),
        other => panic!("client not closed with SHUTTING_DOWN: {other:?}"),
    }
    match admin.ended(Duration::from_secs(10)).await {
        Ended::App { code, reason } => {
            assert_eq!(code, 4, "SHUTTING_DOWN expected on the admin too: {reason}")
        }
        other => panic!("admin not closed with SHUTTING_DOWN: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_close_frees_the_client_slot() {
    let cl = Cluster::start().await;
    let clients = || async { Some(cl.status().await.clients) };
    let base = clients().await.expect("STATUS clients");
    let c = cl.client().await;
    let mut c2 = cl.client().await;
    // Both are counted once they are served.
    let _ = c2.request("GET", pats(".*", ".*")).await.unwrap();
    let ok = wait_until(Duration::from_secs(5), || async {
        clients().await == Some(base + 2)
    })
    .await;
    assert!(ok, "two clients connected: STATUS {:?}", cl.status().await);
    c.close();
    c.wait_closed(Duration::from_secs(2)).await;
    let ok = wait_until(Duration::from_secs(5), || async {
        clients().await == Some(base + 1)
    })
    .await;
    assert!(
        ok,
        "a client that closed with NO_ERROR is still counted: STATUS {:?}",
        cl.status().await
    );
    let r = c2.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), vec![]);
    // Our side sees a local close, code 0.
    match c.connection().close_reason() {
        Some(quinn::ConnectionError::LocallyClosed) => {}
        other => panic!("unexpected close state: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// TLS: foreign CA, wrong ALPN
// ---------------------------------------------------------------------------------------------

/// Tries a GET with `certs/client.pem`; returns an `ok` answer if one ever comes.
async fn try_get(
    sap: &str,
    certs: &std::path::Path,
    name: &str,
    alpn: &[u8],
) -> Result<Option<String>, String> {
    let raw = raw_connect(sap, certs, name, alpn)
        .await
        .map_err(|e| e.to_string())?;
    let mut s = match tokio::time::timeout(Duration::from_secs(5), raw.conn.open_bi()).await {
        Ok(Ok((send, recv))) => RawStream {
            send,
            recv: tuplespace::net::stream::FramedRecv::new(recv, 1 << 20),
        },
        other => return Err(format!("no stream: {other:?}")),
    };
    if let Err(e) = s
        .write(&framed(&cbor(&req(1, "GET", pats(".*", ".*")))))
        .await
    {
        return Err(e.to_string());
    }
    match s.read().await {
        Read::Answer(r) => Ok(Some(format!("{r:?}"))),
        Read::End => Ok(None),
        Read::Failed(e) => Err(e),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_a_foreign_ca_are_refused() {
    let cl = Cluster::start().await;
    let foreign = cl.dir.path().join("foreign");
    tls::create_cluster(&foreign, &[], false).unwrap();
    // A client that trusts our CA but presents a foreign client/admin certificate.
    for (name, sap) in [
        ("client", &cl.client_sap),
        ("admin", &cl.shutdown_sap),
        ("admin", &cl.client_sap),
    ] {
        let mixed = cl.dir.path().join(format!("mixed-{name}"));
        mixed_certs(&cl.certs, &foreign, &mixed, name);
        // Refused either way: the handshake fails, or the connection is closed unanswered.
        if let Ok(Some(answer)) = try_get(sap, &mixed, name, ALPN).await {
            panic!("a foreign {name} certificate got an answer on {sap}: {answer}");
        }
    }
    // A client entirely from another cluster (also does not trust our servers).
    if let Ok(Some(answer)) = try_get(&cl.client_sap, &foreign, "client", ALPN).await {
        panic!("a foreign cluster's client got an answer: {answer}");
    }
    // Our own certificate still works on the same SAP.
    assert!(matches!(
        try_get(&cl.client_sap, &cl.certs, "client", ALPN).await,
        Ok(Some(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_with_another_alpn_fails() {
    let cl = Cluster::start().await;
    for alpn in [&b"h3"[..], b"tuplespace-node/1", b"tuplespace/2"] {
        let r = raw_connect(&cl.client_sap, &cl.certs, "client", alpn).await;
        assert!(
            r.is_err(),
            "ALPN {:?} accepted on the client SAP",
            String::from_utf8_lossy(alpn)
        );
        let r = raw_connect(&cl.shutdown_sap, &cl.certs, "admin", alpn).await;
        assert!(
            r.is_err(),
            "ALPN {:?} accepted on the shutdown SAP",
            String::from_utf8_lossy(alpn)
        );
    }
    assert!(
        raw_connect(&cl.client_sap, &cl.certs, "client", ALPN)
            .await
            .is_ok()
    );
}

// ---------------------------------------------------------------------------------------------
// Framing: pipelining, FIN, several streams
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_pipelined_requests_are_all_answered() {
    let cl = Cluster::start().await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    const N: u64 = 500;
    let mut bytes = Vec::new();
    for id in 1..=N {
        let v = if id % 2 == 1 {
            req(
                id,
                "PUT",
                Some(Value::Array(vec![pair(&["p", &id.to_string()], &["v"])])),
            )
        } else {
            req(id, "GET", pats(&format!("p,{}", id - 1), "v"))
        };
        bytes.extend(framed(&cbor(&v)));
    }
    s.write(&bytes).await.unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..N {
        let r = s.answer().await;
        let id = r.id.unwrap_or_else(|| panic!("answer without id: {r:?}"));
        assert!(seen.insert(id, r).is_none(), "id {id} answered twice");
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>()
    );
    for (id, r) in &seen {
        if id % 2 == 1 {
            assert_eq!(rejected_of(r), Vec::<Value>::new(), "id {id}");
        } else {
            // Requests on one stream take effect in order: the PUT just before is visible.
            assert_eq!(
                pairs_of(r),
                owned(&[(format!("p,{}", id - 1).as_str(), "v")]),
                "id {id}"
            );
        }
    }
    let r = s.call(N + 1, "GET", pats("p,.*", ".*")).await;
    assert_eq!(pairs_of(&r).len(), (N / 2) as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_fin_every_request_read_is_answered_then_the_stream_ends() {
    let cl = Cluster::start().await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    const N: u64 = 20;
    let mut bytes = Vec::new();
    for id in 1..=N {
        let v = match id % 4 {
            0 => req(id, "FROB", None), // not-implemented
            1 => req(
                id,
                "PUT",
                Some(Value::Array(vec![tpair(&format!("f,{id}"), "x")])),
            ),
            2 => req(id, "GET", pats(".*", ".*")),
            _ => req(id, "PUT", Some(text("bad"))), // malformed
        };
        bytes.extend(framed(&cbor(&v)));
    }
    s.write(&bytes).await.unwrap();
    s.finish();
    let mut ids = Vec::new();
    loop {
        match s.read().await {
            Read::Answer(r) => ids.push(r.id.expect("id")),
            Read::End => break,
            Read::Failed(e) => panic!("after {} answers: {e}", ids.len()),
        }
    }
    ids.sort();
    assert_eq!(ids, (1..=N).collect::<Vec<_>>());
    // The writes were applied.
    let mut s2 = raw.open().await;
    let r = s2.call(100, "GET", pats("f,.*", ".*")).await;
    assert_eq!(pairs_of(&r).len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_streams_free_their_slot_and_streams_are_independent() {
    let cl = Cluster::start().await;
    let raw = cl.raw_client().await;
    // Far more streams than the default limit of 16, one after another, each finished.
    for i in 0..48u64 {
        let mut s = raw.open().await;
        s.write_value(&req(
            i,
            "PUT",
            Some(Value::Array(vec![tpair(&format!("s,{i}"), "v")])),
        ))
        .await;
        s.finish();
        let r = s.answer().await;
        assert_eq!(rejected_of(&r), Vec::<Value>::new(), "stream {i}");
        assert!(
            matches!(s.read().await, Read::End),
            "stream {i} not finished by the service"
        );
    }
    // Several streams open at once, used in interleaved order.
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(raw.open().await);
    }
    for (i, s) in streams.iter_mut().enumerate() {
        s.write_value(&req(i as u64, "GET", pats(r"s,\d+", "v")))
            .await;
    }
    for (i, s) in streams.iter_mut().enumerate().rev() {
        let r = s.answer().await;
        assert_eq!(r.id, Some(i as u64));
        assert_eq!(pairs_of(&r).len(), 48);
    }
    // A stream finished without any request is simply finished back.
    let mut empty = raw.open().await;
    empty.write(&[]).await.unwrap();
    empty.finish();
    assert!(
        matches!(empty.read().await, Read::End),
        "an empty finished stream must end"
    );
    // A stream the client resets does not disturb the connection.
    let mut reset = raw.open().await;
    reset.write_value(&req(1, "GET", pats(".*", ".*"))).await;
    reset.send.reset(7u32.into()).unwrap();
    // Garbage on one stream does not disturb another.
    streams[0].write_frame(&[0xff]).await;
    let r = streams[1].call(77, "GET", pats("s,1", "v")).await;
    assert_eq!(pairs_of(&r).len(), 1);
    assert_eq!(streams[0].answer().await.status, Status::Malformed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_past_the_outstanding_limit_is_flow_controlled_not_dropped() {
    let cl = Cluster::builder()
        .proxy_set("max_outstanding_per_stream=8")
        .start()
        .await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    const N: u64 = 300;
    let mut bytes = Vec::new();
    for id in 1..=N {
        let v = req(
            id,
            "PUT",
            Some(Value::Array(vec![pair(&["q", &id.to_string()], &["v"])])),
        );
        bytes.extend(framed(&cbor(&v)));
    }
    s.write(&bytes).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..N {
        let r = s.answer().await;
        assert_eq!(rejected_of(&r), Vec::<Value>::new(), "{r:?}");
        ids.push(r.id.expect("id"));
    }
    ids.sort();
    assert_eq!(ids, (1..=N).collect::<Vec<_>>());
}

/// PROTOCOL §2: after the client's FIN "the service still answers every request it read". A
/// stream that ends in the middle of a frame still had whole requests before that point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_a_truncated_frame_at_fin_are_still_answered() {
    let cl = Cluster::start().await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    let mut bytes = Vec::new();
    // Big enough writes that their answers come back after the proxy has read the FIN.
    for id in 1..=3u64 {
        let args = (0..2000)
            .map(|j| tpair(&format!("t{id},{j}"), "v"))
            .collect();
        bytes.extend(framed(&cbor(&req(id, "PUT", Some(Value::Array(args))))));
    }
    // Half a length prefix, then FIN.
    bytes.extend([0, 0]);
    s.write(&bytes).await.unwrap();
    s.finish();
    let mut ids = Vec::new();
    // Answers until the stream ends (a `malformed` answer without id for the stub is allowed).
    while let Read::Answer(r) = s.read().await {
        if let Some(id) = r.id {
            assert_eq!(rejected_of(&r), Vec::<Value>::new(), "{r:?}");
            ids.push(id);
        }
    }
    ids.sort();
    // The writes were applied (they reached the primary) ...
    let mut c = cl.client().await;
    let mut applied = 0;
    for id in 1..=3 {
        let r = c
            .request("GET", pats(&format!("t{id},0"), ".*"))
            .await
            .unwrap();
        applied += pairs_of(&r).len();
    }
    // ... so their answers must not be lost.
    assert_eq!(
        ids,
        vec![1, 2, 3],
        "requests read before the truncated frame were not all answered ({applied} of them were applied)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_exactly_the_keys_that_apply() {
    let cl = Cluster::start().await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    let keys = |v: &Value| -> Vec<String> {
        let Value::Map(m) = v else {
            panic!("answer is not a map: {v:?}")
        };
        let mut k: Vec<String> = m
            .iter()
            .map(|(k, _)| {
                as_text(k)
                    .unwrap_or_else(|| panic!("non-text key in {v:?}"))
                    .to_owned()
            })
            .collect();
        k.sort();
        k
    };
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "PUT",
            req(1, "PUT", Some(Value::Array(vec![tpair("a", "1")]))),
            &["id", "rejected", "status"],
        ),
        (
            "POST",
            req(2, "POST", Some(Value::Array(vec![tpair("a", "2")]))),
            &["id", "rejected", "status"],
        ),
        (
            "GET",
            req(3, "GET", pats(".*", ".*")),
            &["id", "pairs", "status"],
        ),
        (
            "GET empty",
            req(4, "GET", pats("none", ".*")),
            &["id", "pairs", "status"],
        ),
        (
            "GET bad pattern",
            req(5, "GET", pats("(", ".*")),
            &["id", "message", "pairs", "status"],
        ),
        (
            "DELETE",
            req(6, "DELETE", pats("a", ".*")),
            &["id", "pairs", "status"],
        ),
        (
            "malformed",
            req(7, "PUT", Some(text("x"))),
            &["id", "message", "status"],
        ),
        (
            "not-implemented",
            req(8, "FROB", None),
            &["id", "message", "status"],
        ),
        (
            "forbidden",
            req(9, "STATUS", None),
            &["id", "message", "status"],
        ),
    ];
    for (what, request, want) in cases {
        s.write_value(&request).await;
        let v = s.read_value().await;
        assert_eq!(keys(&v), want, "{what}: {v:?}");
        assert_eq!(get(&v, "id"), get(&request, "id"), "{what}: {v:?}");
    }
    // Unreadable id: `id` is present and null.
    s.write_frame(&[0xff]).await;
    let v = s.read_value().await;
    assert_eq!(keys(&v), ["id", "message", "status"], "{v:?}");
    assert_eq!(get(&v, "id"), Some(&Value::Null), "{v:?}");
    // STATUS on the shutdown SAP.
    let admin = raw_connect(&cl.shutdown_sap, &cl.certs, "admin", ALPN)
        .await
        .unwrap();
    let mut a = admin.open().await;
    a.write_value(&req(10, "STATUS", None)).await;
    let v = a.read_value().await;
    assert_eq!(keys(&v), ["cluster", "id", "status"], "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_certificate_is_refused() {
    let cl = Cluster::start().await;
    for sap in [&cl.client_sap, &cl.shutdown_sap] {
        let Ok(raw) = raw_connect_without_certificate(sap, &cl.certs).await else {
            continue; // the handshake failed: refused
        };
        if let Ok(Ok((send, recv))) =
            tokio::time::timeout(Duration::from_secs(5), raw.conn.open_bi()).await
        {
            let mut s = RawStream {
                send,
                recv: tuplespace::net::stream::FramedRecv::new(recv, 1 << 20),
            };
            let _ = s
                .write(&framed(&cbor(&req(1, "GET", pats(".*", ".*")))))
                .await;
            if let Read::Answer(r) = s.read().await {
                panic!("a peer without a certificate got an answer on {sap}: {r:?}");
            }
        }
        match raw.ended(Duration::from_secs(5)).await {
            Ended::Open => panic!("a peer without a certificate is still connected to {sap}"),
            Ended::App { code, reason } => assert_eq!(code, 2, "{reason}"),
            Ended::Other(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shutdown saves; init files
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_saves_and_a_new_cluster_loads_the_save_file() {
    let mut cl = Cluster::start().await;
    let mut c = cl.client().await;
    let args = vec![
        tpair("user,1", "alice"),
        tpair("user,2", "bob"),
        pair(&["é", "日本"], &["٣"]),
        tpair("gone", "x"),
    ];
    let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());
    let r = c.request("DELETE", pats("gone", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r).len(), 1);
    let r = c
        .request("POST", Some(Value::Array(vec![tpair("user,2", "carol")])))
        .await
        .unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());

    // The backup (if the primary runs one) must be stopped by the shutdown too.
    let backup_pid = cl.status().await.pid_of("backup");

    let mut a = cl.admin().await;
    let r = a.request("SHUTDOWN", None).await.unwrap();
    assert_eq!(r.status, Status::Ok, "{r:?}\n{}", cl.logs());

    let proxy = cl.proxy.as_mut().unwrap();
    let ps = wait_exit_async(proxy, EXIT_TIMEOUT).await;
    let server = cl.server.as_mut().unwrap();
    let ss = wait_exit_async(server, EXIT_TIMEOUT).await;
    let logs = cl.logs();
    assert!(
        ps.is_some_and(|s| s.success()),
        "proxy did not exit cleanly: {ps:?}\n{logs}"
    );
    assert!(
        ss.is_some_and(|s| s.success()),
        "server did not exit cleanly: {ss:?}\n{logs}"
    );
    assert!(
        cl.save_file.exists(),
        "no save file at {}\n{logs}",
        cl.save_file.display()
    );
    if let Some(b) = backup_pid {
        let gone = wait_until(EXIT_TIMEOUT, || async move { !alive(b) }).await;
        assert!(
            gone,
            "the backup (pid {b}) is still running after SHUTDOWN\n{logs}"
        );
    }

    let cl2 = Cluster::builder().init_file(&cl.save_file).start().await;
    let mut c2 = cl2.client().await;
    let r = c2.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(
        pairs_of(&r),
        owned(&[("user,1", "alice"), ("user,2", "carol"), ("é,日本", "٣")])
    );
    let r = c2
        .request("PUT", Some(Value::Array(vec![tpair("user,1", "again")])))
        .await
        .unwrap();
    assert_eq!(
        rejected_of(&r),
        vec![tpair("user,1", "again")],
        "loaded keys are present"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_file_is_loaded_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.json");
    std::fs::write(
        &init,
        "{\"format\":\"tuplespace-snapshot\",\"version\":1,\"pairs\":[\n[[\"b\"],[\"2\"]],\n[[\"a\",\"x\"],[\"1\",\"y\"]]\n]}\n",
    )
    .unwrap();
    let cl = Cluster::builder().init_file(&init).start().await;
    let mut c = cl.client().await;
    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r), owned(&[("a,x", "1,y"), ("b", "2")]));
}

/// Runs `tuplespace server` with `init` as INIT_FILE (no proxy) and returns (status, stderr).
fn server_with_init(init: &std::path::Path) -> (Option<std::process::ExitStatus>, String) {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    tls::create_cluster(&certs, &[], false).unwrap();
    let args: Vec<String> = vec![
        "server".into(),
        free_sap(),
        free_sap(),
        free_sap(),
        free_sap(),
        "null".into(),
        "null".into(),
        init.display().to_string(),
        "--certs".into(),
        certs.display().to_string(),
    ];
    let (status, out, err) = run_to_end(&args, dir.path(), EXIT_TIMEOUT);
    (status, format!("{out}{err}"))
}

#[test]
fn a_malformed_init_file_stops_the_server_naming_the_file_and_the_place() {
    let dir = tempfile::tempdir().unwrap();

    let bad_json = dir.path().join("bad-json.json");
    std::fs::write(
        &bad_json,
        "{\"format\":\"tuplespace-snapshot\",\"version\":1,\"pairs\":[\n[[\"a\"],[\"b\"]],\n[[\"c\"],[\"d\"]] oops\n]}\n",
    )
    .unwrap();
    let (status, err) = server_with_init(&bad_json);
    assert!(
        status.is_some_and(|s| !s.success()),
        "server must fail: {status:?}\n{err}"
    );
    assert!(
        err.contains(&bad_json.display().to_string()),
        "stderr must name the file:\n{err}"
    );
    assert!(
        err.contains("line 3"),
        "stderr must name the line (3):\n{err}"
    );

    let bad_tuple = dir.path().join("bad-tuple.json");
    std::fs::write(
        &bad_tuple,
        "{\"format\":\"tuplespace-snapshot\",\"version\":1,\"pairs\":[\n[[\"ok\"],[\"v\"]],\n[[\"a-b\"],[\"x\"]]\n]}\n",
    )
    .unwrap();
    let (status, err) = server_with_init(&bad_tuple);
    assert!(
        status.is_some_and(|s| !s.success()),
        "server must fail: {status:?}\n{err}"
    );
    assert!(
        err.contains(&bad_tuple.display().to_string()),
        "stderr must name the file:\n{err}"
    );
    assert!(
        err.contains("pair 1"),
        "stderr must name the pair (index 1):\n{err}"
    );
    assert!(
        err.contains("not alphanumeric"),
        "stderr must say what is wrong:\n{err}"
    );

    let missing = dir.path().join("does-not-exist.json");
    let (status, err) = server_with_init(&missing);
    assert!(
        status.is_some_and(|s| !s.success()),
        "server must fail: {status:?}\n{err}"
    );
    assert!(
        err.contains(&missing.display().to_string()),
        "stderr must name the file:\n{err}"
    );
}

/// The save file has one pair per line so that "load errors point at a line": the line named
/// must be the offending pair's, also when it is the last pair (followed by `\n]}`).
#[test]
fn an_init_file_error_names_the_line_of_the_bad_pair() {
    let dir = tempfile::tempdir().unwrap();
    let head = "{\"format\":\"tuplespace-snapshot\",\"version\":1,\"pairs\":[\n";
    // Bad pair on line 3, followed by another pair, then last (the layout the service writes).
    for (name, body) in [
        (
            "middle.json",
            "[[\"ok\"],[\"v\"]],\n[[\"a-b\"],[\"x\"]],\n[[\"z\"],[\"v\"]]\n]}\n",
        ),
        (
            "last.json",
            "[[\"ok\"],[\"v\"]],\n[[\"a-b\"],[\"x\"]]\n]}\n",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{head}{body}")).unwrap();
        let (status, err) = server_with_init(&path);
        assert!(
            status.is_some_and(|s| !s.success()),
            "{name}: server must fail: {status:?}\n{err}"
        );
        assert!(
            err.contains("pair 1"),
            "{name}: stderr must name the pair (index 1):\n{err}"
        );
        assert!(
            err.contains("line 3,"),
            "{name}: the bad pair is on line 3:\n{err}"
        );
    }
}

#[test]
fn bad_sap_arguments_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    tls::create_cluster(&certs, &[], false).unwrap();
    let c = certs.display().to_string();
    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };

    let (status, out, err) = run_to_end(
        &s(&[
            "proxy",
            &free_sap(),
            "127.0.0.1",
            &free_sap(),
            "--certs",
            &c,
        ]),
        dir.path(),
        EXIT_TIMEOUT,
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?} {out} {err}"
    );
    assert!(
        err.contains("SERVER_SAP") && err.contains("127.0.0.1"),
        "stderr: {err}"
    );

    let (status, out, err) = run_to_end(
        &s(&["proxy", "nonsense", &free_sap(), &free_sap(), "--certs", &c]),
        dir.path(),
        EXIT_TIMEOUT,
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?} {out} {err}"
    );
    assert!(
        err.contains("CLIENT_SAP") && err.contains("nonsense"),
        "stderr: {err}"
    );

    let (status, out, err) = run_to_end(
        &s(&[
            "server",
            &free_sap(),
            &free_sap(),
            &free_sap(),
            "127.0.0.1:notaport",
            "null",
            "null",
            "null",
            "--certs",
            &c,
        ]),
        dir.path(),
        EXIT_TIMEOUT,
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?} {out} {err}"
    );
    assert!(
        err.contains("HEARTBEAT_SAP") && err.contains("127.0.0.1:notaport"),
        "stderr: {err}"
    );

    // A SAP that cannot be opened (the port is taken).
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken_sap = taken.local_addr().unwrap().to_string();
    let (status, out, err) = run_to_end(
        &s(&["proxy", &free_sap(), &free_sap(), &taken_sap, "--certs", &c]),
        dir.path(),
        EXIT_TIMEOUT,
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?} {out} {err}"
    );
    assert!(
        err.contains("SHUTDOWN_SAP") && err.contains(&taken_sap),
        "stderr: {err}"
    );
    drop(taken);
}

/// SPEC §3: "On proxy failure the primary does the same after a reasonable timeout": it stops its
/// backup, saves its space and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_proxy_makes_the_primary_save_and_stop() {
    let mut cl = Cluster::builder()
        .set("proxy_loss_timeout_ms=1000")
        .start()
        .await;
    let mut c = cl.client().await;
    let r = c
        .request("PUT", Some(Value::Array(vec![tpair("kept", "1")])))
        .await
        .unwrap();
    assert_eq!(rejected_of(&r), Vec::<Value>::new());
    let backup_pid = cl.status().await.pid_of("backup");

    let proxy = cl.proxy.as_mut().unwrap();
    signal(proxy.id(), Signal::SIGKILL);
    let _ = proxy.wait();
    let t0 = Instant::now();
    let server = cl.server.as_mut().unwrap();
    let ss = wait_exit_async(server, EXIT_TIMEOUT).await;
    let logs = cl.logs();
    assert!(
        ss.is_some(),
        "the primary did not stop after losing the proxy\n{logs}"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "stopped too early: {:?}",
        t0.elapsed()
    );
    let saved = std::fs::read_to_string(&cl.save_file).unwrap_or_default();
    assert!(
        saved.contains(r#"[["kept"],["1"]]"#),
        "save file: {saved:?}\n{logs}"
    );
    if let Some(b) = backup_pid {
        let gone = wait_until(EXIT_TIMEOUT, || async move { !alive(b) }).await;
        assert!(gone, "the backup (pid {b}) is still running\n{logs}");
    }
}

/// Nesting depth is client input like any other: whatever the proxy accepts it must relay and
/// answer at once. A PUT element nested close to the CBOR decoder's recursion limit (256) is read
/// by the proxy, but the relay frame that wraps it is a few levels deeper; that must not turn into
/// a lost request (`unknown` after the request timeout, with no failure at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_put_elements_are_answered_at_once() {
    let cl = Cluster::builder()
        .set("request_timeout_ms=1500")
        .start()
        .await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    let mut wrong = Vec::new();
    for depth in 248..=258usize {
        let mut elem = Value::Integer(0.into());
        for _ in 0..depth {
            elem = Value::Array(vec![elem]);
        }
        let t0 = Instant::now();
        s.write_value(&req(
            depth as u64,
            "PUT",
            Some(Value::Array(vec![elem.clone()])),
        ))
        .await;
        let r = s.answer().await;
        let took = t0.elapsed();
        let fine = match r.status {
            // Read and relayed: the element is ill-formed, echoed exactly as sent.
            Status::Ok => r.rejected.as_deref().is_some_and(|x| x == [elem.clone()]),
            // Refused by the proxy as too deep to read.
            Status::Malformed => r.id.is_none() || r.id == Some(depth as u64),
            _ => false,
        };
        if !fine || took > Duration::from_millis(1000) {
            wrong.push(format!(
                "depth {depth}: {:?} {:?} after {took:?}",
                r.status, r.message
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "nested PUT elements not answered properly:\n{}",
        wrong.join("\n")
    );
    // Nothing was stored.
    let r = s.call(1, "GET", pats(".*", ".*")).await;
    assert_eq!(pairs_of(&r), vec![]);
}

/// PROTOCOL §2/§4: a client need accept responses only up to `max_response_bytes`; an answer that
/// would exceed it is `too-large`. Config validation allows `max_response_bytes ==
/// max_request_bytes` ("a PUT's rejected list echoes the request"), but the echo's envelope
/// (`status`, `rejected`) is larger than the request's (`op`, `args`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_never_exceed_max_response_bytes_even_when_it_equals_max_request_bytes() {
    let equal = tuplespace::config::Config {
        max_request_bytes: 2048,
        max_response_bytes: 2048,
        ..tuplespace::config::Config::default()
    };
    if equal.validate().is_err() {
        return; // such a configuration is refused: nothing to check
    }
    let cl = Cluster::builder()
        .set("max_request_bytes=2048")
        .set("max_response_bytes=2048")
        .start()
        .await;
    let raw = cl.raw_client().await;
    let mut s = raw.open().await;
    let mut over = Vec::new();
    for n in [1024usize, 2040, 2044, 2048] {
        s.write_frame(&exact_size_put(n as u64, n)).await;
        let body = s.read_body().await;
        if body.len() > 2048 {
            let v = tuplespace::wire::frame::decode_value(&body).unwrap();
            over.push(format!(
                "a {n}-byte PUT got a {}-byte answer ({:?})",
                body.len(),
                get(&v, "status")
            ));
        }
    }
    assert!(
        over.is_empty(),
        "answers over max_response_bytes (2048):\n{}",
        over.join("\n")
    );
}

/// The same on a space big enough for full scans to run off the store thread (> 10 000 pairs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_on_a_large_space_and_full_scans_still_answer() {
    let cl = Cluster::builder()
        .set("max_request_bytes=65536")
        .set("max_response_bytes=131072")
        .start()
        .await;
    let mut c = cl.client().await;
    const N: usize = 10_050;
    let mut i = 0;
    while i < N {
        let end = (i + 2_600).min(N);
        let args: Vec<Value> = (i..end)
            .map(|j| pair(&["b", &j.to_string()], &["value", "x"]))
            .collect();
        let r = c.request("PUT", Some(Value::Array(args))).await.unwrap();
        assert_eq!(rejected_of(&r), Vec::<Value>::new());
        i = end;
    }
    let r = c.request("GET", pats(".*", ".*")).await.unwrap();
    assert_eq!(r.status, Status::TooLarge, "{:?} {:?}", r.status, r.message);
    let r = c.request("DELETE", pats("b,.*", ".*")).await.unwrap();
    assert_eq!(r.status, Status::TooLarge, "{:?} {:?}", r.status, r.message);
    // Full scans that fit are answered.
    let r = c.request("GET", pats(".*", "value,y")).await.unwrap();
    assert_eq!(pairs_of(&r), vec![]);
    let r = c.request("GET", pats(r".*,\d*7", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r).len(), N / 10);
    let r = c.request("GET", pats(r"b,1\d{3}", ".*")).await.unwrap();
    assert_eq!(pairs_of(&r).len(), 1000);
    // Nothing was deleted.
    let st = cl.status().await;
    assert_eq!(st.pairs, Some(N as u64), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_of_a_proxy_without_servers_is_ok_and_it_exits() {
    let mut cl = Cluster::builder().no_server().start().await;
    let mut a = cl.admin().await;
    let r = a.request("SHUTDOWN", None).await.unwrap();
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let ps = wait_exit_async(cl.proxy.as_mut().unwrap(), EXIT_TIMEOUT).await;
    assert!(
        ps.is_some_and(|s| s.success()),
        "proxy: {ps:?}\n{}",
        cl.logs()
    );
}
