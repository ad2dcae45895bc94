//! The bytes as a response's field lines: the framing and hop-by-hop fields of the head relayed
//! to the client, by the properties of baton::fuzzing::response_head.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| baton::fuzzing::response_head(data));
