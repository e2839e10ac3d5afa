//! examples/client.rs against a real proxy and primary: it pipelines PUTs, reads them back,
//! meets `not-implemented` and a pattern that does not compile, deletes, asks STATUS, and exits
//! 0; pointed at the admin SAP with a client certificate it gets the FORBIDDEN close code and
//! exits 2. `cargo test` builds the example beside the test binaries.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Cluster;

/// target/<profile>/examples/client, beside target/<profile>/deps/ where this test runs.
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile_dir.join("examples").join("client");
    assert!(
        path.exists(),
        "{} is not built: run the whole `cargo test --release` (it builds the examples) or \
         `cargo build --release --examples` first",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_client_runs_every_step() {
    let bin = example();
    let cl = Cluster::start().await;
    let certs = cl.certs.display().to_string();
    let out = Command::new(&bin)
        .args(["--sap", &cl.client_sap, "--admin-sap", &cl.shutdown_sap])
        .args(["--certs", &certs, "--count", "2000", "--in-flight", "256"])
        .output()
        .expect("run the example");
    let said = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{said}{err}");
    assert_eq!(out.status.code(), Some(0), "{said}{err}\n{}", cl.logs());
    for want in [
        "pipelined PUT: 2000 requests, 2000 inserted, 256 in flight",
        "GET: 2000 pairs match",
        "FROB: refused as expected: not implemented",
        "GET with a bad pattern: ok, 0 pairs",
        "take: took example,0",
        "take with nothing to take: ok, 0 pairs after 200 ms: timed out",
        "DELETE: 1999 pairs removed",
        "STATUS: epoch ",
    ] {
        assert!(said.contains(want), "no `{want}` in:\n{said}");
    }

    let out = Command::new(&bin)
        .args(["--sap", &cl.shutdown_sap, "--admin-sap", "none"])
        .args(["--certs", &certs, "--count", "1"])
        .output()
        .expect("run the example");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("FORBIDDEN (0x2)"), "{err}");
}
