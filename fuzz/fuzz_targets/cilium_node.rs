#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshd::fuzzing::cilium_nodes(data));
