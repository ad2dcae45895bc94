//! The `baton` command: parses the CLI and calls the library.

mod cli;
mod manual;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
    Run(cli::RunArgs),
    /// Validate a configuration and print what it would listen on (like nginx -t); against a
    /// running baton, what the next reload does with each listener.
    Check(cli::CheckArgs),
    /// Hand over to a new generation (re-reads the binary and config) and wait for the outcome.
    Upgrade(cli::UpgradeArgs),
    /// Hand over to a new generation of the binary the serving generation took over from
    /// (held open since, whatever is installed now), re-reading the config; wait for the outcome.
    Rollback(cli::UpgradeArgs),
    /// Show the serving generation.
    Status(cli::ClientArgs),
    /// Stop gracefully: drain, then exit.
    Stop(cli::StopArgs),
    /// Write the manual pages and shell completions (for packaging; see scripts/package).
    #[command(hide = true)]
    Manual(manual::ManualArgs),
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any thread exists: reading and removing the
    // inheritance variables cannot race with anything.
    let inherited = unsafe { baton_handoff::Inherited::from_env() };
    let command = Cli::parse().command.unwrap_or(Cmd::Run(cli::RunArgs::default()));
    let result = match command {
        Cmd::Run(args) => cli::run(args, inherited),
        Cmd::Check(args) => cli::check(&args),
        Cmd::Upgrade(args) => cli::upgrade(args),
        Cmd::Rollback(args) => cli::rollback(args),
        Cmd::Status(args) => cli::status(args),
        Cmd::Stop(args) => cli::stop(args),
        Cmd::Manual(args) => manual::run(&args, Cli::command()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}
