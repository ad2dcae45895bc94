//! The bytes as a field value: the Connection token list, hop-by-hop stripping and the
//! Content-Length parser, by the properties of baton::fuzzing::connection_tokens.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| baton::fuzzing::connection_tokens(data));
