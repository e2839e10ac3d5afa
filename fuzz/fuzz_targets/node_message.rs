#![no_main]
//! Body: `tuplespace::fuzzing::node_message` (also replayed over fuzz/corpus/node_message by tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tuplespace::fuzzing::node_message(data);
});
