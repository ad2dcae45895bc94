//! How this process was started, which is what a successor must exec (and what a rollback
//! returns to), and the runtime it runs on.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use baton_handoff::Inherited;

/// The name under which a generation passes its own binary to its successor.
pub const PREDECESSOR_BINARY: &str = "predecessor-binary";

/// How this process was started: what a successor must exec.
#[derive(Debug)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub config_path: Option<PathBuf>,
    pub tag: Option<String>,
    /// This process's own binary (`/proc/self/exe`, `O_PATH`), opened at start and passed to
    /// the successor, which can roll back to it whatever was installed at the path since.
    /// `None` without /proc.
    pub own_binary: Option<OwnedFd>,
    /// The binary of the generation this one took over from, for `baton rollback`; `None`
    /// for a first generation (or a predecessor too old to pass it).
    pub predecessor_binary: Option<OwnedFd>,
}

impl Launch {
    /// This process's launch: the program and the arguments as inherited from a predecessor
    /// (what the first generation was started as), else this process's own; its own binary
    /// and its predecessor's.
    pub fn current(
        inherited: &mut Inherited,
        config_path: Option<PathBuf>,
        tag: Option<String>,
    ) -> anyhow::Result<Launch> {
        let program = match inherited.program.clone() {
            Some(p) => p,
            None => resolve_program()?,
        };
        let args = inherited
            .args
            .clone()
            .unwrap_or_else(|| std::env::args_os().skip(1).collect());
        let own_binary = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open("/proc/self/exe");
        let own_binary = match own_binary {
            Ok(fd) => Some(OwnedFd::from(fd)),
            Err(e) => {
                tracing::warn!(
                    "cannot open this process's binary (/proc/self/exe): {e}; the next generation cannot roll back to it"
                );
                None
            }
        };
        Ok(Launch {
            program,
            args,
            config_path,
            tag,
            own_binary,
            predecessor_binary: inherited.take_extra(PREDECESSOR_BINARY),
        })
    }
}

/// `p` made absolute against the current directory, without `.` components. Symlinks and
/// `..` stay as given: the path, not the inode, is the point.
pub fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(p)
    };
    Ok(joined
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect())
}

/// The absolute path this binary was started as (never /proc/self/exe, which names the old
/// inode after an in-place install): a successor execs whatever is installed there now.
fn resolve_program() -> anyhow::Result<PathBuf> {
    let argv0 = std::env::args_os().next().unwrap_or_else(|| OsString::from("baton"));
    let p = Path::new(&argv0);
    if p.components().count() > 1 {
        return absolute(p);
    }
    // No PATH: nothing is found, and the caller's error names the program.
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(p))
        .find(|c| nix::unistd::access(c, nix::unistd::AccessFlags::X_OK).is_ok())
        .map(|c| absolute(&c))
        .transpose()?
        .with_context(|| format!("cannot find {} on PATH to re-exec on upgrade", p.display()))
}

/// The runtime for `workers` threads (`None`: one per CPU this process may run on, which
/// honours `taskset`, CPUAffinity= and cgroup CPU quotas). One worker gets tokio's
/// single-threaded scheduler: the same work without the work-stealing machinery (atomics,
/// cross-thread wakeups); docs/benchmarks.md has the figures. Blocking work (bcrypt, DNS)
/// runs on tokio's blocking pool either way.
pub fn build_runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let n = workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut builder = if n == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(n);
        b
    };
    let runtime = builder.enable_all().build().context("cannot start the runtime")?;
    tracing::debug!(workers = n, "runtime started");
    Ok(runtime)
}
