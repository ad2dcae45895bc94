//! The bytes as a client's stream starting with a request head: strict::parse_head and the
//! stream checker (proxy::framing), by the properties of baton::fuzzing::request_head.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| baton::fuzzing::request_head(data));
