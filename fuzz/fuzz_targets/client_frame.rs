#![no_main]
//! Body: `tuplespace::fuzzing::client_frame` (also replayed over fuzz/corpus/client_frame by tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tuplespace::fuzzing::client_frame(data);
});
