//! How this process was started, which is what a successor must exec, and the runtime it
//! runs on.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// How this process was started: what a successor must exec.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub config_path: Option<PathBuf>,
    pub tag: Option<String>,
}

impl Launch {
    /// This process's launch: `program` as inherited from a predecessor (the path the first
    /// generation resolved), else resolved now; the arguments as given.
    pub fn current(
        program: Option<PathBuf>,
        config_path: Option<PathBuf>,
        tag: Option<String>,
    ) -> anyhow::Result<Launch> {
        let program = match program {
            Some(p) => p,
            None => resolve_program()?,
        };
        Ok(Launch {
            program,
            args: std::env::args_os().skip(1).collect(),
            config_path,
            tag,
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
