//! The bytes as a chunked request body: the stream checker's chunk framing, by the
//! properties of baton::fuzzing::chunked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| baton::fuzzing::chunked(data));
