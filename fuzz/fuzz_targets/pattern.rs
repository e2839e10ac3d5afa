#![no_main]
//! Body: `tuplespace::fuzzing::pattern` (also replayed over fuzz/corpus/pattern by tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tuplespace::fuzzing::pattern(data);
});
