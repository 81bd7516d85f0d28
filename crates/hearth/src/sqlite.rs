//! `hearth sqlite`: replicate, restore, run and status for SQLite databases; also what `hearth litestream` calls.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use hearth_sqlite::config::{Config, ConfigError, default_config_path};
use hearth_sqlite::plan::Target;
use hearth_sqlite::replicate::{ReplicateOptions, replicate_all};
use hearth_sqlite::restore::{RestoreOptions, RestoreOutcome, restore};
use hearth_sqlite::status::{DbStatus, status};
use tokio::sync::watch;

use crate::EXIT_USAGE;

#[derive(Args)]
pub struct SqliteArgs {
    #[command(subcommand)]
    command: SqliteCommand,
}

#[derive(Subcommand)]
enum SqliteCommand {
    /// Replicate databases continuously until stopped (SIGINT/SIGTERM), then flush.
    Replicate {
        #[command(flatten)]
        source: Source,
        /// Replicate even over a non-empty replica that this database has no history with.
        #[arg(long)]
        force: bool,
        /// Sync what is committed now to every replica, then exit (Litestream's `-once`).
        #[arg(long)]
        once: bool,
    },
    /// Restore a database from its replicas.
    Restore(RestoreArgs),
    /// Restore if missing, then replicate while running a command; exits with the command's code.
    Run {
        #[command(flatten)]
        source: Source,
        #[arg(long)]
        force: bool,
        /// The command to run, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show each database's replication position, lag and last upload (from local state; no store request).
    Status {
        #[command(flatten)]
        source: Source,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Where the databases and replicas come from: a config file, or a database path and replica URLs.
#[derive(Args, Clone, Debug, Default)]
pub struct Source {
    /// Configuration file (Litestream's YAML). Default: $LITESTREAM_CONFIG or /etc/litestream.yml.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Do not expand $VARIABLES in the configuration file.
    #[arg(long)]
    pub no_expand_env: bool,
    /// A database path followed by one or more replica URLs (instead of a config file).
    pub db_and_urls: Vec<String>,
}

#[derive(Args, Clone, Debug, Default)]
pub struct RestoreArgs {
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub no_expand_env: bool,
    /// Where to write the database (default: the database's own path).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Restore up to this transaction id (hexadecimal, as Litestream prints it).
    #[arg(long, value_parser = parse_hex_txid)]
    pub txid: Option<u64>,
    /// Restore to this point in time (RFC 3339).
    #[arg(long, value_parser = parse_timestamp)]
    pub timestamp: Option<SystemTime>,
    /// Succeed without doing anything when the database exists.
    #[arg(long)]
    pub if_db_not_exists: bool,
    /// Succeed without doing anything when every replica is reachable and empty.
    #[arg(long)]
    pub if_replica_exists: bool,
    /// Downloads in flight at once.
    #[arg(long, default_value_t = 8)]
    pub parallelism: usize,
    /// Print which replica and files a restore would use, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The database path (as in the config) or a replica URL.
    pub target: String,
}

/// A failure and the exit code it maps to.
pub enum Failure {
    /// Bad usage or configuration: exit code 2, nothing was done.
    Usage(anyhow::Error),
    /// The command ran and failed: exit code 1.
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

/// Turns a result into an exit code, printing the error chain.
pub fn exit(result: Result<ExitCode, Failure>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(Failure::Usage(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn main(args: SqliteArgs) -> ExitCode {
    crate::init_logging(None);
    let result = crate::block_on("error", async {
        match args.command {
            SqliteCommand::Replicate {
                source,
                force,
                once,
            } => replicate_cmd(&source, force, None, once).await,
            SqliteCommand::Restore(r) => restore_cmd(&r).await,
            SqliteCommand::Run {
                source,
                force,
                command,
            } => replicate_cmd(&source, force, Some(command), false).await,
            SqliteCommand::Status { source, json } => status_cmd(&source, json),
        }
    });
    result.map_or(ExitCode::FAILURE, exit)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Loads the configuration the way Litestream does: databases and URLs on the command line, else the file.
pub fn load_config(source: &Source) -> Result<Config, Failure> {
    let config = if let Some((db, urls)) = source.db_and_urls.split_first() {
        if source.config.is_some() {
            return Err(Failure::Usage(anyhow!(
                "give either -config or a database path with replica URLs, not both"
            )));
        }
        Config::from_command_line(db, urls, &env)
    } else {
        let path = source
            .config
            .clone()
            .unwrap_or_else(|| default_config_path(&env));
        Config::load(&path, !source.no_expand_env)
    };
    let config = config.map_err(config_failure)?;
    // `logging:` of the file: JSON lines and the level take effect from here on. Logs stay on
    // standard error (hearth's convention) whatever `stderr:` says.
    if config.log_json || config.log_level.is_some() {
        crate::reconfigure_logging(config.log_level.as_deref(), config.log_json);
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    Ok(config)
}

fn config_failure(e: ConfigError) -> Failure {
    Failure::Usage(anyhow::Error::new(e).context("load the configuration"))
}

pub async fn replicate_cmd(
    source: &Source,
    force: bool,
    command: Option<Vec<String>>,
    once: bool,
) -> Result<ExitCode, Failure> {
    let config = load_config(source)?;
    if config.dbs.is_empty() {
        return Err(Failure::Usage(anyhow!(
            "the configuration lists no databases (dbs:)"
        )));
    }
    if once {
        if command.is_some() || config.exec.is_some() {
            return Err(Failure::Usage(anyhow!(
                "cannot replicate once and run a command (exec)"
            )));
        }
        // A one-off sync of a database that is not there would succeed at nothing.
        if let Some(db) = config.dbs.iter().find(|db| !db.path.exists()) {
            return Err(Failure::Usage(anyhow!(
                "{} does not exist; nothing to replicate once",
                db.path.display()
            )));
        }
    }
    let command = command.or_else(|| config.exec.as_ref().map(|e| shell_words(e)));
    if command.is_some() {
        // Like Litestream's -exec, restore missing databases first so the app never starts on an empty one
        // when a backup exists; an unreachable replica stops here instead of looking like "no backup".
        for db in &config.dbs {
            if db.path.exists() {
                continue;
            }
            let opts = RestoreOptions {
                dry_run: false,
                target: Target::Latest,
                output: db.path.clone(),
                if_db_not_exists: true,
                if_replica_exists: true,
                parallelism: 8,
                progress: None,
            };
            let outcome = restore(&db.replicas, &opts)
                .await
                .with_context(|| format!("restore {}", db.path.display()))?;
            report_restore(&db.path, &outcome);
        }
    }
    let mut opts = ReplicateOptions::from_config(&config, force);
    let (stop_tx, stop_rx) = watch::channel(false);
    if once {
        // The one-off sync is the final flush of a replication stopped at once; the user asked
        // for it, so it is not cut short by the shutdown budget meant for Nomad's kill timeout.
        opts.shutdown_budget = opts
            .shutdown_budget
            .max(std::time::Duration::from_secs(3600));
        let _ = stop_tx.send(true);
    }
    // The metrics server lives exactly as long as this command: it stops after replication has flushed.
    let _metrics_server = match &config.addr {
        Some(addr) => {
            let mut registry = prometheus_client::registry::Registry::default();
            opts.metrics = hearth_sqlite::metrics::Metrics::register(&mut registry);
            Some(
                crate::metrics::serve(addr, registry)
                    .await
                    .map_err(Failure::Usage)?,
            )
        }
        None => None,
    };
    let replication = replicate_all(&config, &opts, stop_rx);
    tokio::pin!(replication);

    let mut child = match &command {
        Some(argv) => {
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| Failure::Usage(anyhow!("empty command to run")))?;
            Some(
                tokio::process::Command::new(program)
                    .args(args)
                    .spawn()
                    .with_context(|| format!("start {program}"))?,
            )
        }
        None => None,
    };

    // Shutdown order, in one place: a signal is forwarded to the child; when the child exits (or, without a
    // child, on the signal) replication flushes within its budget; then hearth exits with the child's code.
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut child_code: Option<i32> = None;
    let results = loop {
        tokio::select! {
            results = &mut replication => break results,
            _ = sigterm.recv() => forward_or_stop(&mut child, libc_signal::TERM, &stop_tx),
            _ = sigint.recv() => forward_or_stop(&mut child, libc_signal::INT, &stop_tx),
            status = wait_child(&mut child) => {
                // A child killed by a signal exits as a shell reports it: 128 + the signal number.
                child_code = Some(status.map_or(1, |s| {
                    use std::os::unix::process::ExitStatusExt;
                    s.code().or_else(|| s.signal().map(|sig| 128 + sig)).unwrap_or(1)
                }));
                child = None;
                let _ = stop_tx.send(true);
            }
        }
    };
    let mut failed = false;
    for r in results {
        match r {
            Ok(report) if report.unflushed() > 0 => {
                eprintln!(
                    "hearth: {}: {} transaction(s) captured but not uploaded to every replica",
                    report.db.display(),
                    report.unflushed()
                );
                failed = true;
            }
            Ok(_) => {}
            // Already logged with its database when it happened (replicate_all); only the exit code is left.
            Err(_) => failed = true,
        }
    }
    if let Some(mut c) = child {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    Ok(match child_code {
        Some(code) => ExitCode::from(code.clamp(0, 255) as u8),
        None if failed => ExitCode::FAILURE,
        None => ExitCode::SUCCESS,
    })
}

mod libc_signal {
    pub const TERM: i32 = libc::SIGTERM;
    pub const INT: i32 = libc::SIGINT;
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal, Failure> {
    tokio::signal::unix::signal(kind)
        .context("install signal handlers")
        .map_err(Failure::Runtime)
}

fn forward_or_stop(
    child: &mut Option<tokio::process::Child>,
    sig: i32,
    stop: &watch::Sender<bool>,
) {
    match child.as_ref().and_then(|c| c.id()) {
        Some(pid) => {
            // Forward the signal; replication keeps running until the child has exited.
            send_signal(pid, sig);
        }
        None => {
            let _ = stop.send(true);
        }
    }
}

/// Sends a signal to the child. std and tokio can only send SIGKILL, and forwarding SIGTERM/SIGINT is the
/// point here, so this calls kill(2) directly.
#[allow(unsafe_code)]
fn send_signal(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and has no memory effects; the pid is our own child's.
    unsafe {
        libc::kill(pid, sig);
    }
}

async fn wait_child(
    child: &mut Option<tokio::process::Child>,
) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// Splits a command string on white space, honouring simple quotes (Litestream's `exec:` is split the same way).
pub fn shell_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        words.push(cur);
    }
    words
}

pub async fn restore_cmd(args: &RestoreArgs) -> Result<ExitCode, Failure> {
    if args.txid.is_some() && args.timestamp.is_some() {
        return Err(Failure::Usage(anyhow!(
            "give either -txid or -timestamp, not both"
        )));
    }
    let target = match (args.txid, args.timestamp) {
        (Some(t), _) => Target::Txid(t),
        (_, Some(ts)) => Target::Timestamp(ts),
        _ => Target::Latest,
    };
    let is_url = args.target.contains("://");
    let (replicas, default_output) = if is_url {
        let r =
            hearth_sqlite::config::replica_from_url(&args.target, &env).map_err(config_failure)?;
        (vec![r], None)
    } else {
        let source = Source {
            config: args.config.clone(),
            no_expand_env: args.no_expand_env,
            db_and_urls: Vec::new(),
        };
        let config = load_config(&source)?;
        let path = hearth_sqlite::config::expand_path(&args.target, &env);
        let db = config.db(&path).ok_or_else(|| {
            Failure::Usage(anyhow!(
                "database {} is not in the configuration; list it under dbs: or give a replica URL",
                path.display()
            ))
        })?;
        (db.replicas.clone(), Some(db.path.clone()))
    };
    let output = args.output.clone().or(default_output).ok_or_else(|| {
        Failure::Usage(anyhow!(
            "restoring from a URL needs an output path: add -o PATH"
        ))
    })?;
    let opts = RestoreOptions {
        dry_run: args.dry_run,
        target,
        output: output.clone(),
        if_db_not_exists: args.if_db_not_exists,
        if_replica_exists: args.if_replica_exists,
        parallelism: args.parallelism,
        progress: progress_bar(),
    };
    if !args.if_db_not_exists && !args.dry_run && output.exists() {
        return Err(Failure::Runtime(anyhow!(
            "{} already exists; hearth never overwrites a database: move it away, or pass -if-db-not-exists",
            output.display()
        )));
    }
    let outcome = restore(&replicas, &opts)
        .await
        .with_context(|| format!("restore {}", output.display()))?;
    report_restore(&output, &outcome);
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on stderr when it is a terminal; nothing otherwise (logs and CI stay clean).
fn progress_bar() -> Option<hearth_sqlite::restore::Progress> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} restoring [{bar:30}] {pos}/{len} files, {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(hearth_sqlite::restore::Progress(std::sync::Arc::new(
        move |done, total, bytes| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(indicatif::HumanBytes(bytes).to_string());
            if done == total {
                bar.finish_and_clear();
            }
        },
    )))
}

fn report_restore(output: &Path, outcome: &RestoreOutcome) {
    match outcome {
        RestoreOutcome::Restored(r) => {
            let proof = if r.checksum_verified {
                "end-state checksum verified"
            } else {
                "written by a tool that records no checksum; PRAGMA integrity_check passed"
            };
            eprintln!(
                "hearth: restored {} from replica {} to TXID {:#x} ({} files, {} bytes; {proof})",
                output.display(),
                r.replica,
                r.txid,
                r.files,
                r.bytes
            );
            for aside in &r.set_aside {
                eprintln!("hearth: set aside stale {}", aside.display());
            }
        }
        RestoreOutcome::DatabaseExists => {
            eprintln!("hearth: {} exists; nothing restored", output.display())
        }
        RestoreOutcome::NoReplica => eprintln!(
            "hearth: no backup exists yet for {}; nothing restored",
            output.display()
        ),
        RestoreOutcome::Planned { replica, files } => {
            // On stdout, like Litestream's plan: it is the command's answer, not a log line.
            println!("Restore plan:");
            println!("  target: {}", output.display());
            println!("  replica: {replica}");
            if let (Some(first), Some(last)) = (files.first(), files.last()) {
                println!(
                    "  txid range: {:016x} - {:016x}",
                    first.min_txid, last.max_txid
                );
            }
            println!();
            println!("level\tmin_txid\tmax_txid\tsize");
            for f in files {
                println!(
                    "{}\t{:016x}\t{:016x}\t{}",
                    f.level, f.min_txid, f.max_txid, f.size
                );
            }
        }
    }
}

fn status_cmd(source: &Source, json: bool) -> Result<ExitCode, Failure> {
    let config = load_config(source)?;
    let now = SystemTime::now();
    let statuses: Vec<DbStatus> = config
        .dbs
        .iter()
        .map(|db| status(&db.path, &db.replicas, now))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&statuses).context("encode status")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<40} {:<12} {:>10} {:>10} {:>10}  LAST UPLOAD",
        "DATABASE", "REPLICA", "CAPTURED", "UPLOADED", "LAG"
    );
    for s in &statuses {
        if s.replicas.is_empty() {
            println!(
                "{:<40} {:<12} {:>10}",
                s.path.display(),
                "-",
                format!("{:#x}", s.txid)
            );
        }
        for r in &s.replicas {
            let last = r.last_upload_ms.map_or("never".to_string(), |ms| {
                format!("{:.1}s ago", (now_ms(now) - ms) as f64 / 1000.0)
            });
            println!(
                "{:<40} {:<12} {:>10} {:>10} {:>9.1}s  {}",
                s.path.display(),
                r.name,
                format!("{:#x}", s.txid),
                format!("{:#x}", r.uploaded_txid),
                r.lag_seconds,
                last
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn now_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn parse_hex_txid(s: &str) -> Result<u64, String> {
    let digits = s.trim_start_matches("0x");
    u64::from_str_radix(digits, 16)
        .map_err(|_| format!("`{s}` is not a hexadecimal TXID (e.g. 000000000000002a)"))
}

fn parse_timestamp(s: &str) -> Result<SystemTime, String> {
    crate::litestream_args::parse_go_rfc3339(s)
        .ok_or_else(|| format!("`{s}` is not an RFC 3339 time such as 2026-11-23T19:00:00Z"))
}
