//! The `hearth` binary: command-line parsing, logging set-up, and the mapping from errors to exit codes.

mod jobspec;
mod litestream;
mod litestream_args;
mod metrics;
mod sqlite;
mod volume;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad usage, bad configuration or unreadable input (as clap and Litestream use).
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Replication, failover and backup for a small cluster's stateful services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continuous SQLite replication and point-in-time restore.
    Sqlite(sqlite::SqliteArgs),
    /// Litestream 0.5 command lines, accepted verbatim (Go-style single-dash flags included).
    #[command(disable_help_flag = true)]
    Litestream {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Find data hazards in Nomad jobspecs and rewrite storage references.
    Jobspec(jobspec::JobspecArgs),
    /// Replicate a service data directory from a primary to standbys over mutual TLS.
    Volume(volume::VolumeArgs),
}

/// Sets up logging to stderr: `RUST_LOG` if set, else `level` (default `info`).
pub fn init_logging(level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.unwrap_or("info")));
    // Colour only on a terminal: logs written to a file or collected by Nomad stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

fn main() -> ExitCode {
    // Invoked as `litestream` (a symlink or a renamed copy): behave as Litestream's CLI.
    let argv: Vec<String> = std::env::args().collect();
    let invoked_as = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("hearth");
    if invoked_as == "litestream" {
        return litestream::main(argv.into_iter().skip(1).collect());
    }

    let cli = Cli::parse();
    match cli.command {
        Command::Sqlite(args) => sqlite::main(args),
        Command::Litestream { args } => litestream::main(args),
        Command::Jobspec(args) => jobspec::main(args),
        Command::Volume(args) => volume::main(args),
    }
}
