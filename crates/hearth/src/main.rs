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

use tracing_subscriber::{EnvFilter, Registry, layer::Layered, reload};

type LogBase = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type LogFormat = Box<dyn tracing_subscriber::Layer<LogBase> + Send + Sync>;

/// The handles that let a configuration file change the log level and format after start-up
/// (`logging:` in litestream.yml is only known once the file is read).
static LOG_RELOAD: std::sync::OnceLock<(
    reload::Handle<EnvFilter, Registry>,
    reload::Handle<LogFormat, LogBase>,
)> = std::sync::OnceLock::new();

fn log_filter(level: Option<&str>) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.unwrap_or("info")))
}

fn log_format(json: bool) -> LogFormat {
    use tracing_subscriber::Layer;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        fmt.json().boxed()
    } else {
        // Colour only on a terminal: logs written to a file or collected by Nomad stay plain text.
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed()
    }
}

/// Sets up logging to stderr as text: `RUST_LOG` if set, else `level` (default `info`).
pub fn init_logging(level: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, filter_handle) = reload::Layer::new(log_filter(level));
    let (format, format_handle) = reload::Layer::new(log_format(false));
    if tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .try_init()
        .is_ok()
    {
        let _ = LOG_RELOAD.set((filter_handle, format_handle));
    }
}

/// A level given on the command line (Litestream's `-log-level`), which wins over the file's.
static LOG_LEVEL_FLAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the log level from a command-line flag; a configuration file read later cannot change it.
pub fn set_log_level_flag(level: &str) {
    let _ = LOG_LEVEL_FLAG.set(level.to_owned());
    reconfigure_logging(None, false);
}

/// Switches the log level and format (JSON lines or text), as a configuration file asks.
pub fn reconfigure_logging(level: Option<&str>, json: bool) {
    let level = LOG_LEVEL_FLAG.get().map(String::as_str).or(level);
    if let Some((filter, format)) = LOG_RELOAD.get() {
        let _ = filter.reload(log_filter(level));
        let _ = format.reload(log_format(json));
    }
}

/// Runs `f` on a multi-threaded tokio runtime; `None` when the runtime cannot start (said on
/// stderr, prefixed the way the calling command line prints errors).
pub fn block_on<T>(prefix: &str, f: impl std::future::Future<Output = T>) -> Option<T> {
    // Blocking work (file I/O, SQLite, chunking) runs in tokio's blocking pool. Capped well below
    // tokio's default of 512: a replicator of a hundred databases would otherwise keep a thread per
    // database, each with its own stack and allocator arena, for work that takes a millisecond.
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
    {
        Ok(r) => Some(r.block_on(f)),
        Err(e) => {
            eprintln!("{prefix}: start the async runtime: {e}");
            None
        }
    }
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
