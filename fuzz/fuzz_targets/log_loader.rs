#![no_main]
//! Body: `tuplespace::fuzzing::log_loader` (also replayed over fuzz/corpus/log_loader by tests/fuzz_corpus.rs).
//! Files go to a scratch directory (see `tuplespace::fuzzing::Scratch`); scripts/fuzz.sh points
//! TMPDIR at a directory it removes afterwards.

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tuplespace::fuzzing::Scratch;

static SCRATCH: OnceLock<Scratch> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let scratch = SCRATCH
        .get_or_init(|| Scratch::new("log_loader").expect("cannot make a scratch directory"));
    tuplespace::fuzzing::log_loader(data, scratch.path());
});
