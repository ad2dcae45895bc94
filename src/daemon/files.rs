//! Files other processes read (the pid file, the state directory's files): written
//! atomically, so a reader sees the old content or the new, never a torn file; and the
//! directories they live in, which no other user may be able to tamper with.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use baton_handoff::process::euid;

/// Why a directory for the control socket or the state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// Another user could tamper with what baton keeps there: baton refuses to use it.
    #[error("{0}")]
    Unsafe(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a directory baton keeps files in must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirRule {
    /// The directory holding the control socket (and the state directory): owned by baton's
    /// user or root, and writable by no one else unless sticky (like /tmp, where no one may
    /// remove or rename another user's entries). Symlinks to it are followed.
    SocketParent,
    /// The state directory and what is in it, which baton creates for itself: a directory
    /// (not a symlink) owned by baton's user and writable by no one else.
    Private,
}

impl DirRule {
    fn describe(self, uid: u32) -> String {
        match self {
            DirRule::SocketParent => format!(
                "the control socket's directory must be owned by uid {uid} (the user baton runs as) or root, and not writable by group or others unless sticky (like /tmp): fix its owner or mode, or set `control_socket` to a path in such a directory"
            ),
            DirRule::Private => format!(
                "the state directory must be a directory owned by uid {uid} (the user baton runs as), not writable by group or others: remove it (baton creates it, mode 0700), or set `control_socket` elsewhere"
            ),
        }
    }

    fn what(self) -> &'static str {
        match self {
            DirRule::SocketParent => "control socket directory",
            DirRule::Private => "state directory",
        }
    }
}

/// Checks `path` against `rule` (see [`DirRule`]).
pub fn check_dir(path: &Path, rule: DirRule) -> Result<(), DirError> {
    let meta = match rule {
        DirRule::SocketParent => std::fs::metadata(path),
        DirRule::Private => std::fs::symlink_metadata(path),
    }
    .map_err(|source| DirError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let uid = euid();
    let mode = meta.mode() & 0o7777;
    let others_write = mode & 0o022 != 0;
    let problem = if meta.file_type().is_symlink() {
        Some("is a symlink".to_string())
    } else if !meta.is_dir() {
        Some("is not a directory".to_string())
    } else {
        let owner_ok = meta.uid() == uid || (rule == DirRule::SocketParent && meta.uid() == 0);
        let write_ok = !others_write || (rule == DirRule::SocketParent && mode & 0o1000 != 0);
        (!owner_ok || !write_ok).then(|| format!("is owned by uid {} with mode {mode:04o}", meta.uid()))
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(DirError::Unsafe(format!(
            "unsafe {} {}: it {p}; {}",
            rule.what(),
            path.display(),
            rule.describe(uid)
        ))),
    }
}

/// Creates the directory `path` (mode 0700) unless it exists, then checks it by
/// [`DirRule::Private`] and narrows an existing one of ours to 0700 (it may predate this
/// process, created by an older version).
pub fn create_private_dir(path: &Path) -> Result<(), DirError> {
    let io_err = |source| DirError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_err(e)),
        _ => {}
    }
    check_dir(path, DirRule::Private)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io_err)
}

/// Creates the directory of the control socket `socket` if it is missing (mode 0700, with
/// any missing parents), then checks it by [`DirRule::SocketParent`].
pub fn prepare_socket_dir(socket: &Path) -> Result<(), DirError> {
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| DirError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    check_dir(dir, DirRule::SocketParent)
}

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
    write_pid(path, std::process::id())
}

/// Writes `pid` to the pid file `path`: a generation hands the file to its successor.
pub fn write_pid(path: &Path, pid: u32) -> io::Result<()> {
    write_atomically(path, format!("{pid}\n").as_bytes())
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

    fn dir_with_mode(parent: &Path, name: &str, mode: u32) -> PathBuf {
        let dir = parent.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        dir
    }

    #[test]
    fn private_dirs_are_ours_and_closed_to_others() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("fresh");
        create_private_dir(&fresh).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o7777, 0o700);
        let older = dir_with_mode(tmp.path(), "older", 0o755);
        create_private_dir(&older).unwrap();
        assert_eq!(std::fs::metadata(&older).unwrap().mode() & 0o7777, 0o700);
        for mode in [0o777, 0o770, 0o1777] {
            let open = dir_with_mode(tmp.path(), &format!("open{mode:o}"), mode);
            let err = create_private_dir(&open).unwrap_err().to_string();
            assert!(
                err.contains(&format!("mode {mode:04o}")) && err.contains("open"),
                "{err}"
            );
        }
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        let err = create_private_dir(&link).unwrap_err().to_string();
        assert!(err.contains("is a symlink"), "{err}");
    }

    #[test]
    fn a_socket_directory_may_be_shared_only_when_sticky() {
        let tmp = tempfile::tempdir().unwrap();
        let made = tmp.path().join("a/b");
        prepare_socket_dir(&made.join("c.sock")).unwrap();
        assert_eq!(std::fs::metadata(&made).unwrap().mode() & 0o7777, 0o700);
        let sticky = dir_with_mode(tmp.path(), "sticky", 0o1777);
        prepare_socket_dir(&sticky.join("c.sock")).unwrap();
        let open = dir_with_mode(tmp.path(), "open", 0o777);
        let err = prepare_socket_dir(&open.join("c.sock")).unwrap_err();
        assert!(matches!(err, DirError::Unsafe(_)), "{err}");
        assert!(err.to_string().contains("control_socket"), "{err}");
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
