//! The `baton` command: parses the CLI and calls the library.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use baton::config::Config;
use baton::generation::{Exit, Generation, Launch};
use baton::handoff::Inherited;

#[derive(Parser)]
#[command(
    name = "baton",
    version,
    about = "HTTP forward proxy with zero-downtime binary upgrades and reloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (the default). Without --config it serves the embedded default.
    Run(RunArgs),
    /// Validate a configuration and print what it would listen on (like nginx -t).
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Hand over to a new generation (re-reads the binary and config) and wait for the outcome.
    Upgrade(UpgradeArgs),
    /// Show the serving generation.
    Status(ClientArgs),
    /// Stop gracefully: drain, then exit.
    Stop(ClientArgs),
}

#[derive(clap::Args, Default)]
struct RunArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A free-form label shown by `baton status` (e.g. a build or deploy id).
    #[arg(long)]
    tag: Option<String>,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// The configuration of the running baton (locates its control socket).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The control socket, overriding the configuration.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct UpgradeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Wait until the old generation has drained, then report how many connections finished
    /// and how many were cut at the drain timeout.
    #[arg(long)]
    wait_drain: bool,
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any thread exists: reading and removing the
    // inheritance variables cannot race with anything.
    let inherited = unsafe { Inherited::from_env() };
    baton::handoff::close_on_exec_all();
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(RunArgs::default(), inherited),
        Some(Cmd::Run(args)) => run(args, inherited),
        Some(Cmd::Check { config }) => check(config.as_deref()),
        Some(Cmd::Upgrade(args)) => upgrade(args),
        Some(Cmd::Status(args)) => client(args, "status"),
        Some(Cmd::Stop(args)) => client(args, "stop"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(p)
    };
    // Drop `.` components; keep symlinks and `..` as given (the path, not the inode, is the point).
    Ok(joined
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect())
}

fn run(args: RunArgs, inherited: Inherited) -> anyhow::Result<ExitCode> {
    let config_path = args.config.as_deref().map(absolute).transpose()?;
    let config = Config::load(config_path.as_deref())?;
    baton::telemetry::init_with_access(config.log_format, &config.access_log)?;
    let program = match inherited.program.clone() {
        Some(p) => p,
        None => resolve_program()?,
    };
    let launch = Launch {
        program,
        args: std::env::args_os().skip(1).collect(),
        config_path,
        tag: args.tag,
    };
    let runtime = build_runtime(config.workers)?;
    let pid_file = config.pid_file.clone();
    let exit = runtime.block_on(async move {
        let generation = Generation::start(launch, config, inherited).await?;
        Ok::<_, anyhow::Error>(generation.run().await)
    })?;
    // Tasks still parked (reapers, cut tunnels) must not hold the exit up.
    runtime.shutdown_background();
    if !matches!(exit, Exit::HandedOff(_)) {
        remove_own_pid_file(pid_file.as_deref());
    }
    Ok(match exit {
        Exit::HandedOff(_) | Exit::Stopped(_) => ExitCode::SUCCESS,
        Exit::Forced => ExitCode::from(1),
    })
}

/// The runtime for `workers` threads (`None`: one per CPU this process may run on, which
/// honours `taskset`, CPUAffinity= and cgroup CPU quotas). One worker gets tokio's
/// single-threaded scheduler: it serves the same connections without the work-stealing
/// machinery (atomics, cross-thread wakeups), about 8% more keep-alive requests per second
/// on one core (docs/benchmarks.md). Blocking work (bcrypt, DNS) still runs on tokio's
/// blocking pool either way.
fn build_runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
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

/// A stopped baton removes its pid file, unless it names another process by now (a
/// generation that handed off leaves it to its successor, which wrote its own pid there).
fn remove_own_pid_file(path: Option<&Path>) {
    let Some(path) = path else { return };
    let own = std::fs::read_to_string(path).is_ok_and(|p| p.trim() == std::process::id().to_string());
    if own {
        let _ = std::fs::remove_file(path);
    }
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

fn check(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let name = path.map_or_else(|| "embedded default".to_string(), |p| p.display().to_string());
    println!("{name}: configuration ok");
    for l in &config.listeners {
        println!("  listener {} on {}", l.name, l.addr);
    }
    println!("  control socket {}", config.control_socket.display());
    match config.workers {
        Some(n) => println!("  workers {n}"),
        None => println!("  workers one per CPU"),
    }
    if let Some(a) = &config.admin {
        println!("  admin (metrics, healthz, status) on {}", a.addr);
    }
    if let baton::config::AccessSink::File(p) = &config.access_log.sink {
        println!("  access log {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn client(args: ClientArgs, command: &str) -> anyhow::Result<ExitCode> {
    let socket = match args.control {
        Some(p) => p,
        None => Config::load(args.config.as_deref())?.control_socket,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut ok = true;
    let json = args.json;
    runtime.block_on(baton::control::request(&socket, command, |v| {
        if json {
            println!("{v}");
        } else {
            print_human(&v);
        }
        if matches!(
            v.get("event").and_then(|e| e.as_str()),
            Some("failed" | "refused" | "error")
        ) {
            ok = false;
        }
    }))?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `baton upgrade`: the phases as lines, or with `--json` one object at the end (the
/// upgrade report: pids, generations, time to ready, connections handed to the drain, with
/// `--wait-drain` how they ended, and the reason on failure).
fn upgrade(args: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let command = if args.wait_drain {
        "upgrade wait-drain"
    } else {
        "upgrade"
    };
    if !args.client.json {
        return client(args.client, command);
    }
    let socket = match args.client.control {
        Some(p) => p,
        None => Config::load(args.client.config.as_deref())?.control_socket,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut report = serde_json::Map::new();
    let mut result: Option<String> = None;
    let mut drained = false;
    let outcome = runtime.block_on(baton::control::request(&socket, command, |v| {
        let event = v.get("event").and_then(|e| e.as_str()).unwrap_or("").to_string();
        let mut fields = v.as_object().cloned().unwrap_or_default();
        fields.remove("event");
        match event.as_str() {
            "spawned" => {
                for (k, x) in [("pid", "new_pid"), ("generation", "new_generation")] {
                    if let Some(val) = fields.remove(k) {
                        fields.insert(x.to_string(), val);
                    }
                }
                report.extend(fields);
            }
            "done" => {
                result = Some("ok".into());
                report.extend(fields);
            }
            "drained" => {
                drained = true;
                fields.remove("old_pid");
                report.insert("drain".into(), serde_json::Value::Object(fields));
            }
            other => {
                result = Some(if other.is_empty() { "error".into() } else { other.into() });
                report.extend(fields);
            }
        }
    }));
    if let Err(e) = outcome {
        result = Some("error".into());
        report.insert("reason".into(), e.to_string().into());
    }
    let result = result.unwrap_or_else(|| {
        report.insert(
            "reason".into(),
            "the control connection closed before the outcome".into(),
        );
        "error".into()
    });
    if result == "ok" && args.wait_drain && !drained {
        report.insert("drain".into(), serde_json::Value::Null);
        eprintln!("baton: the old generation ended without reporting its drain");
    }
    let ok = result == "ok";
    report.insert("result".into(), result.into());
    println!("{}", serde_json::Value::Object(report));
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print_human(v: &serde_json::Value) {
    let s = |k: &str| {
        v.get(k)
            .map(|x| x.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    match v.get("event").and_then(|e| e.as_str()) {
        Some("spawned") => println!("new generation {} started: pid {}", s("generation"), s("pid")),
        Some("done") => println!(
            "ready after {} ms: pid {} (generation {}) serving; old pid {} draining {} connections, {} tunnels",
            s("ready_ms"),
            s("new_pid"),
            s("new_generation"),
            s("old_pid"),
            s("draining_connections"),
            s("draining_tunnels")
        ),
        Some("drained") => println!(
            "old pid {} drained in {} ms: {} finished, {} cut at the drain timeout",
            s("old_pid"),
            s("drain_ms"),
            s("finished"),
            s("cut")
        ),
        Some("failed") => eprintln!("upgrade failed, old generation serves on: {}", s("reason")),
        Some("refused") => eprintln!("upgrade refused: {}", s("reason")),
        Some("error") => eprintln!("error: {}", s("reason")),
        Some("stopping") => println!("stopping: draining"),
        _ => {
            // status
            println!("pid         {}", s("pid"));
            println!("generation  {}", s("generation"));
            println!(
                "version     {}{}",
                s("version"),
                v.get("tag")
                    .and_then(|t| t.as_str())
                    .map(|t| format!(" ({t})"))
                    .unwrap_or_default()
            );
            println!("state       {}", s("state"));
            println!("workers     {}", s("workers"));
            println!("started     {} (unix)", s("started_unix"));
            println!("connections {}", s("active_connections"));
            println!("tunnels     {}", s("active_tunnels"));
            println!(
                "handoff     {}",
                if v.get("handoff_in_progress").and_then(|b| b.as_bool()) == Some(true) {
                    "in progress"
                } else {
                    "none"
                }
            );
            if let Some(ds) = v.get("draining").and_then(|d| d.as_array()) {
                for d in ds {
                    println!(
                        "draining    pid {} (generation {}): {} connections, {} tunnels",
                        d["pid"], d["generation"], d["connections"], d["tunnels"]
                    );
                }
            }
            if let Some(ls) = v.get("listeners").and_then(|l| l.as_array()) {
                for l in ls {
                    println!(
                        "listener    {} {}{}",
                        l.get("name").and_then(|x| x.as_str()).unwrap_or(""),
                        l.get("address").and_then(|x| x.as_str()).unwrap_or(""),
                        if l.get("adopted").and_then(|x| x.as_bool()) == Some(true) {
                            " (inherited)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
    }
}
