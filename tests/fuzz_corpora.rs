//! The fuzz targets' kept corpora (`fuzz/corpus/<target>/`) replayed on stable, through the
//! properties the targets check (`baton::fuzzing`): an input that once failed, kept in its
//! corpus, fails here if its bug comes back, on a machine without nightly.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

/// Runs every file of `target`'s corpus through `check`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut replayed = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // The file's name with the property's own message.
        if panic::catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            panic!("{} fails a property of {target} (message above)", path.display());
        }
        replayed += 1;
    }
    // A positive witness: an empty or misplaced corpus must not pass as replayed.
    assert!(replayed > 0, "no input in {}", dir.display());
    replayed
}

#[test]
fn request_head_corpus_holds() {
    replay("request_head", baton::fuzzing::request_head);
}

#[test]
fn connection_tokens_corpus_holds() {
    replay("connection_tokens", baton::fuzzing::connection_tokens);
}

#[test]
fn chunked_corpus_holds() {
    replay("chunked", baton::fuzzing::chunked);
}

#[test]
fn response_head_corpus_holds() {
    replay("response_head", baton::fuzzing::response_head);
}
