//! Files other processes read (the pid file, the state directory's files): written
//! atomically, so a reader sees the old content or the new, never a torn file.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `data` to `path` through a temporary file beside it and a rename. The temporary
/// file is created exclusively and never through a symlink, so nothing planted at its name
/// redirects the write.
pub fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(data)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// Writes this process's pid to `path`.
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    write_atomically(path, format!("{}\n", std::process::id()).as_bytes())
}

/// Removes the pid file if it still names this process (a generation that handed off
/// leaves it to its successor, which wrote its own pid there).
pub fn remove_own_pid_file(path: &Path) -> io::Result<()> {
    let own = std::fs::read_to_string(path).is_ok_and(|p| p.trim() == std::process::id().to_string());
    if own { std::fs::remove_file(path) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_is_written_and_removed_only_while_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.pid");
        write_pid_file(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        remove_own_pid_file(&path).unwrap();
        assert!(!path.exists());
        std::fs::write(&path, "1\n").unwrap();
        remove_own_pid_file(&path).unwrap();
        assert!(path.exists(), "another process's pid file is left alone");
    }

    #[test]
    fn a_planted_symlink_at_the_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let path = dir.path().join("ledger.json");
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    }
}
