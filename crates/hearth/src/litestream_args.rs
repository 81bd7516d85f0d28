//! Parses a Litestream 0.5.17 command line (Go `flag` package rules) into a typed command, without any I/O.
//!
//! Go's flag rules differ from clap's, so they are reproduced here by hand: `-flag` and `--flag` are the same,
//! values come as `-flag=value` or `-flag value`, boolean flags take a value only as `-flag=false`, parsing stops
//! at the first argument that is not a flag (or after `--`), and `-h`/`-help` print the usage. Error texts,
//! where output goes (usage on stdout, errors on stderr) and exit codes match the real binary: 0 for help that
//! was asked for with `-h`, `-help` or `--help`, and 1 for every other error, usage errors included.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// A Litestream command line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LitestreamCommand {
    Replicate(ReplicateArgs),
    Restore(RestoreArgs),
    Databases(DatabasesArgs),
    Version {
        verbose: bool,
    },
    /// Usage text to print on stdout, then exit 0 (`-h`, `help`, ...).
    Help(String),
    /// A Litestream command hearth does not implement; `message` says so and what to use instead.
    /// Print `Error: {message}` on stderr and exit 1.
    Unsupported {
        command: String,
        message: String,
    },
}

/// `litestream replicate [flags] [DB_PATH REPLICA_URL...]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicateArgs {
    /// `-config PATH`; `None` means `$LITESTREAM_CONFIG` or `/etc/litestream.yml` (only when no DB_PATH given).
    pub config: Option<PathBuf>,
    /// `-no-expand-env`.
    pub no_expand_env: bool,
    /// `-exec CMD`: overrides the config's `exec:`.
    pub exec: Option<String>,
    /// `-once`: sync once and exit. The caller must still refuse it when the config file sets `exec:`.
    pub once: bool,
    /// `-force-snapshot` (requires `-once`).
    pub force_snapshot: bool,
    /// `-enforce-retention` (requires `-once`).
    pub enforce_retention: bool,
    /// `-restore-if-db-not-exists`: applies to every database.
    pub restore_if_db_not_exists: bool,
    /// `-log-level LEVEL`: wins over `$LOG_LEVEL` and the config.
    pub log_level: Option<String>,
    /// `DB_PATH REPLICA_URL...` when given on the command line (then at least two items); empty otherwise.
    pub db_and_urls: Vec<String>,
}

/// Post-restore integrity check (`-integrity-check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IntegrityCheck {
    #[default]
    None,
    /// `PRAGMA quick_check`.
    Quick,
    /// `PRAGMA integrity_check`.
    Full,
}

/// `litestream restore [flags] DB_PATH|REPLICA_URL`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestoreArgs {
    pub config: Option<PathBuf>,
    pub no_expand_env: bool,
    /// `-o PATH`; required when `target` is a URL, else defaults to the database path.
    pub output: Option<PathBuf>,
    /// `-txid` (16 hex digits, as Litestream). `0000000000000000` means "latest", as in Litestream, so `None`.
    pub txid: Option<u64>,
    /// `-timestamp` exactly as given; validated as Go's `time.Parse(time.RFC3339)` would. See `timestamp_time`.
    pub timestamp: Option<String>,
    pub if_db_not_exists: bool,
    pub if_replica_exists: bool,
    /// `-parallelism N` (at least 1); `None` means Litestream's default of 8.
    pub parallelism: Option<usize>,
    pub dry_run: bool,
    pub force: bool,
    /// `-json`: print a JSON summary; logs go to stderr.
    pub json: bool,
    /// `-f`: follow mode.
    pub follow: bool,
    /// `-follow-interval`; `None` means 1s.
    pub follow_interval: Option<Duration>,
    pub integrity_check: IntegrityCheck,
    /// The database path (looked up in the config) or a replica URL.
    pub target: String,
}

impl RestoreArgs {
    /// Whether `target` is a replica URL (`scheme://...`) rather than a database path, as Litestream decides.
    pub fn target_is_url(&self) -> bool {
        is_url(&self.target)
    }

    /// The `-timestamp` as a point in time.
    pub fn timestamp_time(&self) -> Option<SystemTime> {
        self.timestamp.as_deref().and_then(parse_go_rfc3339)
    }
}

/// `litestream databases [flags]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DatabasesArgs {
    pub config: Option<PathBuf>,
    pub no_expand_env: bool,
    pub json: bool,
}

/// A command line Litestream would refuse: what to print and the exit code to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    /// The error in one line (empty when Litestream prints only the usage text).
    pub message: String,
    /// Text for standard output (Litestream prints the command's usage there on flag errors).
    pub stdout: String,
    /// Text for standard error, newline-terminated (`Error: ...`, sometimes a `Try: ...` hint).
    pub stderr: String,
    /// Litestream's exit code: 1 for every usage error, 0 when help was asked for in an odd spelling.
    pub exit_code: u8,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.message.is_empty() {
            "usage"
        } else {
            &self.message
        })
    }
}

impl std::error::Error for UsageError {}

/// Litestream's exit code for every error.
const EXIT_ERROR: u8 = 1;

/// Parses Litestream's arguments (without the program name).
pub fn parse(args: &[String]) -> Result<LitestreamCommand, UsageError> {
    let Some((cmd, rest)) = args.split_first() else {
        return help_or_error(args, TOP_USAGE);
    };
    match cmd.as_str() {
        "replicate" => replicate(args, rest),
        "restore" => restore(args, rest),
        "databases" => databases(args, rest),
        "version" => version(args, rest),
        "help" | "-h" | "-help" | "--help" => Ok(LitestreamCommand::Help(TOP_USAGE.to_string())),
        "start" | "stop" | "register" | "unregister" | "reset" | "status" | "sync" | "list"
        | "info" | "ltx" | "wal" => {
            let instead = match cmd.as_str() {
                "status" | "info" | "list" => "use `hearth sqlite status` instead",
                "ltx" | "wal" => "use `hearth sqlite status --json` to see replica positions",
                "sync" => {
                    "hearth syncs every sync-interval and on shutdown; use `litestream replicate -once` for a one-off sync"
                }
                _ => "hearth has no control socket; edit the config and restart instead",
            };
            Ok(LitestreamCommand::Unsupported {
                command: cmd.clone(),
                message: format!("litestream {cmd}: not supported by hearth; {instead}"),
            })
        }
        c if c.is_empty() || c.starts_with('-') => help_or_error(args, TOP_USAGE),
        c => Err(error(format!("litestream {c}: unknown command"), None)),
    }
}

/// An error returned after flag parsing: `Error: message` (and `Try: hint`) on stderr, exit 1.
fn error(message: String, hint: Option<String>) -> UsageError {
    let mut stderr = format!("Error: {message}\n");
    if let Some(hint) = hint {
        stderr.push_str(&format!("Try: {hint}\n"));
    }
    UsageError {
        message,
        stdout: String::new(),
        stderr,
        exit_code: EXIT_ERROR,
    }
}

/// Go's `flag.ErrHelp`: the usage goes to stdout and nothing to stderr. Litestream exits 0 only when the
/// whole argument list contains exactly `-h`, `-help` or `--help`, else 1 (so `--h` and `-h=1` exit 1).
fn help_error(all_args: &[String], usage: &str) -> UsageError {
    let asked = all_args
        .iter()
        .any(|a| a == "-h" || a == "-help" || a == "--help");
    UsageError {
        message: String::new(),
        stdout: usage.to_string(),
        stderr: String::new(),
        exit_code: if asked { 0 } else { EXIT_ERROR },
    }
}

/// Turns a help request into `Help` when Litestream would exit 0, or into an error otherwise.
fn help_or_error(all_args: &[String], usage: &str) -> Result<LitestreamCommand, UsageError> {
    let e = help_error(all_args, usage);
    if e.exit_code == 0 {
        Ok(LitestreamCommand::Help(e.stdout))
    } else {
        Err(e)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Go's flag package.

#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Bool,
    Value,
}

/// Receives each flag as it is parsed: its name and its value (`None` for a bare boolean flag). An error
/// becomes Go's "invalid value" message.
type SetFlag<'a> = dyn FnMut(&'static str, Option<&str>) -> Result<(), String> + 'a;

/// Why flag parsing stopped.
enum FlagFailure {
    /// `-h` or `-help` (in any spelling Go accepts).
    Help,
    /// The error text Go prints (`flag provided but not defined: -x`).
    Failed(String),
}

/// Parses flags as Go's `FlagSet.Parse` does, calling `set(name, value)` for each flag in order (value `None`
/// for a bare boolean flag). Returns the remaining positional arguments.
fn go_parse_flags(
    specs: &[(&'static str, FlagKind)],
    args: &[String],
    set: &mut SetFlag<'_>,
) -> Result<Vec<String>, FlagFailure> {
    let mut i = 0;
    while i < args.len() {
        let s = args[i].as_str();
        if s.len() < 2 || !s.starts_with('-') {
            break;
        }
        let mut name = &s[1..];
        if let Some(after) = name.strip_prefix('-') {
            if after.is_empty() {
                // `--` ends the flags and is consumed.
                i += 1;
                break;
            }
            name = after;
        }
        if name.is_empty() || name.starts_with('-') || name.starts_with('=') {
            return Err(FlagFailure::Failed(format!("bad flag syntax: {s}")));
        }
        i += 1;
        // Go looks for `=` from the second byte on.
        let (name, value) = match name.char_indices().skip(1).find(|(_, c)| *c == '=') {
            Some((eq, _)) => (&name[..eq], Some(&name[eq + 1..])),
            None => (name, None),
        };
        let Some((spec_name, kind)) = specs.iter().find(|(n, _)| *n == name).copied() else {
            if name == "help" || name == "h" {
                return Err(FlagFailure::Help);
            }
            return Err(FlagFailure::Failed(format!(
                "flag provided but not defined: -{name}"
            )));
        };
        match kind {
            FlagKind::Bool => {
                let parsed = match value {
                    None => None,
                    Some(v) => match go_parse_bool(v) {
                        Some(b) => Some(if b { "true" } else { "false" }),
                        None => {
                            return Err(FlagFailure::Failed(format!(
                                "invalid boolean value {} for -{name}: parse error",
                                go_quote(v)
                            )));
                        }
                    },
                };
                set(spec_name, parsed).map_err(|e| {
                    FlagFailure::Failed(format!("invalid boolean value for -{name}: {e}"))
                })?;
            }
            FlagKind::Value => {
                let value = match value {
                    Some(v) => v,
                    None if i < args.len() => {
                        i += 1;
                        args[i - 1].as_str()
                    }
                    None => {
                        return Err(FlagFailure::Failed(format!(
                            "flag needs an argument: -{name}"
                        )));
                    }
                };
                set(spec_name, Some(value)).map_err(|e| {
                    FlagFailure::Failed(format!(
                        "invalid value {} for flag -{name}: {e}",
                        go_quote(value)
                    ))
                })?;
            }
        }
    }
    Ok(args[i..].to_vec())
}

/// Runs the flag parser for one command and converts failures into Litestream's output.
fn flags_or_usage(
    all_args: &[String],
    usage: &str,
    specs: &[(&'static str, FlagKind)],
    args: &[String],
    set: &mut SetFlag<'_>,
) -> Result<Result<Vec<String>, LitestreamCommand>, UsageError> {
    match go_parse_flags(specs, args, set) {
        Ok(rest) => Ok(Ok(rest)),
        Err(FlagFailure::Help) => help_or_error(all_args, usage).map(Err),
        // Go prints the error, then the usage (stdout), then Litestream prints `Error: ...`.
        Err(FlagFailure::Failed(message)) => Err(UsageError {
            stderr: format!("{message}\nError: {message}\n"),
            stdout: usage.to_string(),
            message,
            exit_code: EXIT_ERROR,
        }),
    }
}

/// Go's `strconv.ParseBool`.
fn go_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `%q` for the strings that appear in flag errors.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `strconv.ParseInt(s, 0, 64)` as the `flag` package reports it: base prefixes (`0x`, `0o`, `0b`, a
/// leading `0` for octal) and `_` between digits are accepted.
fn go_parse_int(s: &str) -> Result<i64, String> {
    let parse_error = || "parse error".to_string();
    let (negative, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.to_string(), true)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.to_string(), true)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.to_string(), true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_string(), true)
    } else {
        (10, lower.clone(), false)
    };
    // Underscores must separate digits (or follow a base prefix), as Go's `underscoreOK`.
    if digits.contains('_') {
        let bad = digits.ends_with('_')
            || digits.contains("__")
            || (!prefixed && digits.starts_with('_'));
        if bad {
            return Err(parse_error());
        }
    }
    let digits: String = digits.chars().filter(|c| *c != '_').collect();
    if digits.is_empty() {
        return Err(parse_error());
    }
    let magnitude = u64::from_str_radix(&digits, radix).map_err(|e| match e.kind() {
        std::num::IntErrorKind::PosOverflow => "value out of range".to_string(),
        _ => parse_error(),
    })?;
    if negative {
        if magnitude > i64::MAX as u64 + 1 {
            return Err("value out of range".to_string());
        }
        Ok((magnitude as i128).wrapping_neg() as i64)
    } else {
        i64::try_from(magnitude).map_err(|_| "value out of range".to_string())
    }
}

/// Litestream's `IsURL`: `word://` at the start.
fn is_url(s: &str) -> bool {
    match s.find("://") {
        Some(i) if i > 0 => s[..i]
            .bytes()
            .all(|b| b == b'_' || b.is_ascii_alphanumeric()),
        _ => false,
    }
}

fn path_flag(v: Option<&str>) -> Option<PathBuf> {
    v.filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn string_flag(v: Option<&str>) -> Option<String> {
    v.filter(|v| !v.is_empty()).map(str::to_string)
}

fn bool_flag(v: Option<&str>) -> bool {
    v != Some("false")
}

// ---------------------------------------------------------------------------------------------------------
// Commands.

fn replicate(all: &[String], args: &[String]) -> Result<LitestreamCommand, UsageError> {
    use FlagKind::{Bool, Value};
    let specs = [
        ("exec", Value),
        ("log-level", Value),
        ("restore-if-db-not-exists", Bool),
        ("once", Bool),
        ("force-snapshot", Bool),
        ("enforce-retention", Bool),
        ("config", Value),
        ("no-expand-env", Bool),
    ];
    let mut a = ReplicateArgs::default();
    let rest = flags_or_usage(all, REPLICATE_USAGE, &specs, args, &mut |name, v| {
        match name {
            "exec" => a.exec = string_flag(v),
            "log-level" => a.log_level = string_flag(v),
            "restore-if-db-not-exists" => a.restore_if_db_not_exists = bool_flag(v),
            "once" => a.once = bool_flag(v),
            "force-snapshot" => a.force_snapshot = bool_flag(v),
            "enforce-retention" => a.enforce_retention = bool_flag(v),
            "config" => a.config = path_flag(v),
            _ => a.no_expand_env = bool_flag(v),
        }
        Ok(())
    })?;
    let rest = match rest {
        Ok(rest) => rest,
        Err(help) => return Ok(help),
    };
    match rest.len() {
        0 => {}
        1 => {
            return Err(error(
                format!("must specify at least one replica URL for {}", rest[0]),
                None,
            ));
        }
        _ => {
            if a.config.is_some() {
                return Err(error(
                    "cannot specify a replica URL and the -config flag".to_string(),
                    None,
                ));
            }
            if let Some(flag) = rest[1..].iter().find(|u| u.starts_with('-')) {
                return Err(error(
                    format!(
                        "flag {} must be positioned before DB_PATH and REPLICA_URL arguments",
                        go_quote(flag)
                    ),
                    None,
                ));
            }
            a.db_and_urls = rest;
        }
    }
    if a.once && a.exec.is_some() {
        return Err(error(
            "cannot specify -once flag with -exec".to_string(),
            None,
        ));
    }
    if a.force_snapshot && !a.once {
        return Err(error(
            "cannot specify -force-snapshot flag without -once".to_string(),
            None,
        ));
    }
    if a.enforce_retention && !a.once {
        return Err(error(
            "cannot specify -enforce-retention flag without -once".to_string(),
            None,
        ));
    }
    Ok(LitestreamCommand::Replicate(a))
}

fn restore(all: &[String], args: &[String]) -> Result<LitestreamCommand, UsageError> {
    use FlagKind::{Bool, Value};
    let specs = [
        ("config", Value),
        ("no-expand-env", Bool),
        ("o", Value),
        ("txid", Value),
        ("parallelism", Value),
        ("if-db-not-exists", Bool),
        ("if-replica-exists", Bool),
        ("timestamp", Value),
        ("dry-run", Bool),
        ("force", Bool),
        ("json", Bool),
        ("f", Bool),
        ("follow-interval", Value),
        ("integrity-check", Value),
    ];
    let mut a = RestoreArgs::default();
    let mut integrity = "none".to_string();
    let rest = flags_or_usage(all, RESTORE_USAGE, &specs, args, &mut |name, v| {
        match name {
            "config" => a.config = path_flag(v),
            "no-expand-env" => a.no_expand_env = bool_flag(v),
            "o" => a.output = path_flag(v),
            "txid" => {
                let v = v.unwrap_or_default();
                // ltx.ParseTXID: exactly 16 hex digits.
                if v.len() != 16 {
                    return Err("invalid txid format".to_string());
                }
                let txid =
                    u64::from_str_radix(v, 16).map_err(|_| "invalid txid format".to_string())?;
                a.txid = (txid != 0).then_some(txid);
            }
            "parallelism" => {
                let n = go_parse_int(v.unwrap_or_default())?;
                // hearth refuses what Litestream would accept and then misbehave on.
                let n = usize::try_from(n)
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| "must be at least 1".to_string())?;
                a.parallelism = Some(n);
            }
            "if-db-not-exists" => a.if_db_not_exists = bool_flag(v),
            "if-replica-exists" => a.if_replica_exists = bool_flag(v),
            "timestamp" => a.timestamp = string_flag(v),
            "dry-run" => a.dry_run = bool_flag(v),
            "force" => a.force = bool_flag(v),
            "json" => a.json = bool_flag(v),
            "f" => a.follow = bool_flag(v),
            "follow-interval" => {
                let d = hearth_sqlite::config::parse_go_duration(v.unwrap_or_default())
                    .map_err(|_| "parse error".to_string())?;
                a.follow_interval = Some(
                    d.non_negative()
                        .ok_or_else(|| "must not be negative".to_string())?,
                );
            }
            _ => integrity = v.unwrap_or_default().to_string(),
        }
        Ok(())
    })?;
    let rest = match rest {
        Ok(rest) => rest,
        Err(help) => return Ok(help),
    };
    if rest.first().is_none_or(String::is_empty) {
        return Err(error(
            "database path or replica URL required".to_string(),
            Some("litestream restore -o /path/to/db s3://bucket/prefix".to_string()),
        ));
    }
    if rest.len() > 1 {
        return Err(error("too many arguments".to_string(), None));
    }
    a.target = rest[0].clone();
    a.integrity_check = match integrity.as_str() {
        "none" => IntegrityCheck::None,
        "quick" => IntegrityCheck::Quick,
        "full" => IntegrityCheck::Full,
        other => {
            return Err(error(
                format!("invalid -integrity-check value: {other}"),
                None,
            ));
        }
    };
    if let Some(ts) = &a.timestamp
        && parse_go_rfc3339(ts).is_none()
    {
        // The non-breaking space is in Litestream's message too.
        return Err(error(
            "invalid -timestamp, must specify in ISO 8601\u{a0}format (e.g. 2000-01-01T00:00:00Z)"
                .to_string(),
            None,
        ));
    }
    if a.target_is_url() {
        if a.config.is_some() {
            return Err(error(
                "cannot specify a replica URL and the -config flag".to_string(),
                None,
            ));
        }
        if a.output.is_none() {
            return Err(error(
                "-o is required when restoring from a replica URL".to_string(),
                Some(format!("litestream restore -o /path/to/db {}", a.target)),
            ));
        }
    }
    // Litestream checks these after opening the replica; they do not depend on it.
    if a.dry_run && a.follow {
        return Err(error("cannot use -dry-run with -f".to_string(), None));
    }
    if a.txid.is_some() && a.timestamp.is_some() {
        return Err(error(
            "cannot specify index & timestamp to restore".to_string(),
            None,
        ));
    }
    if a.follow && a.txid.is_some() {
        return Err(error("cannot use follow mode with -txid".to_string(), None));
    }
    if a.follow && a.timestamp.is_some() {
        return Err(error(
            "cannot use follow mode with -timestamp".to_string(),
            None,
        ));
    }
    Ok(LitestreamCommand::Restore(a))
}

fn databases(all: &[String], args: &[String]) -> Result<LitestreamCommand, UsageError> {
    use FlagKind::{Bool, Value};
    let specs = [("config", Value), ("no-expand-env", Bool), ("json", Bool)];
    let mut a = DatabasesArgs::default();
    let rest = flags_or_usage(all, DATABASES_USAGE, &specs, args, &mut |name, v| {
        match name {
            "config" => a.config = path_flag(v),
            "no-expand-env" => a.no_expand_env = bool_flag(v),
            _ => a.json = bool_flag(v),
        }
        Ok(())
    })?;
    match rest {
        Err(help) => Ok(help),
        Ok(rest) if !rest.is_empty() => Err(error("too many arguments".to_string(), None)),
        Ok(_) => Ok(LitestreamCommand::Databases(a)),
    }
}

fn version(all: &[String], args: &[String]) -> Result<LitestreamCommand, UsageError> {
    let mut verbose = false;
    let rest = flags_or_usage(
        all,
        VERSION_USAGE,
        &[("verbose", FlagKind::Bool)],
        args,
        &mut |_, v| {
            verbose = bool_flag(v);
            Ok(())
        },
    )?;
    match rest {
        Err(help) => Ok(help),
        // Litestream ignores extra arguments here.
        Ok(_) => Ok(LitestreamCommand::Version { verbose }),
    }
}

// ---------------------------------------------------------------------------------------------------------
// RFC 3339 as Go's `time.Parse(time.RFC3339, s)` accepts it.

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; like Go, the hour may have one digit, the fraction may
/// use `,`, and `T`/`Z` must be upper case. Hand-written because no workspace crate follows Go's rules exactly.
pub fn parse_go_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(range)?;
        if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let year = num(0..4)?;
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || b.get(10) != Some(&b'T') {
        return None;
    }
    let month = num(5..7)?;
    let day = num(8..10)?;
    // The hour may be one or two digits.
    let hour_len = if b.get(12) == Some(&b':') { 1 } else { 2 };
    let hour = num(11..11 + hour_len)?;
    let mut i = 11 + hour_len;
    if b.get(i) != Some(&b':') || b.get(i + 3) != Some(&b':') {
        return None;
    }
    let minute = num(i + 1..i + 3)?;
    let second = num(i + 4..i + 6)?;
    i += 6;
    let mut nanos: u64 = 0;
    if matches!(b.get(i), Some(b'.' | b',')) && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = &s[start..i];
        let mut scale = 1_000_000_000u64;
        for d in digits.bytes().take(9) {
            scale /= 10;
            nanos += u64::from(d - b'0') * scale;
        }
    }
    let offset_secs: i64 = match b.get(i) {
        Some(b'Z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = i64::from(num(i + 1..i + 3)?);
            let om = i64::from(num(i + 4..i + 6)?);
            if oh > 24 || om > 59 {
                return None;
            }
            let off = oh * 3600 + om * 60;
            if *sign == b'-' { -off } else { off }
        }
        _ => return None,
    };
    if !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day < 1 || day > days_in_month[(month - 1) as usize] {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second)
        - offset_secs;
    let t = if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    };
    Some(t + Duration::from_nanos(nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------------------------------------
// Usage texts (hearth's own wording; same commands and flags as Litestream 0.5.17).

const TOP_USAGE: &str =
    "hearth, running as litestream: Litestream 0.5 command lines for hearth's SQLite replication.

Usage:

\tlitestream <command> [arguments]

The commands are:

\tdatabases    list databases specified in config file
\treplicate    runs a server to replicate databases
\trestore      recovers database backup from a replica
\tversion      prints the binary version

Not supported by hearth: info, list, ltx, register, reset, start, status, stop, sync, unregister.
Use `hearth sqlite --help` for hearth's own commands.
";

const REPLICATE_USAGE: &str =
    "The replicate command replicates databases continuously, from a config file or
from a database path and replica URLs given on the command line.

Usage:

\tlitestream replicate [arguments]

\tlitestream replicate [arguments] DB_PATH REPLICA_URL [REPLICA_URL...]

Arguments:

\t-config PATH
\t    Configuration file. Defaults to $LITESTREAM_CONFIG or /etc/litestream.yml.

\t-no-expand-env
\t    Do not expand $VAR and ${VAR} in the configuration file.

\t-exec CMD
\t    Run CMD as a child process; exit when it exits, with its exit code.

\t-once
\t    Sync every database once and exit. Cannot be used with -exec.

\t-force-snapshot
\t    With -once: write a full snapshot of every database.

\t-enforce-retention
\t    With -once: delete replica files older than the retention.

\t-log-level LEVEL
\t    trace, debug, info, warn or error. Overrides $LOG_LEVEL and the config.

\t-restore-if-db-not-exists
\t    Restore a database from its replica first if the database file is missing.
";

const RESTORE_USAGE: &str = "The restore command recovers a database from a replica.

Usage:

\tlitestream restore [arguments] DB_PATH

\tlitestream restore [arguments] REPLICA_URL

Arguments:

\t-config PATH
\t    Configuration file. Defaults to $LITESTREAM_CONFIG or /etc/litestream.yml.

\t-no-expand-env
\t    Do not expand $VAR and ${VAR} in the configuration file.

\t-txid TXID
\t    Restore up to this transaction ID (16 hex digits, inclusive). Defaults to the latest.

\t-timestamp TIMESTAMP
\t    Restore to this point in time (RFC 3339, e.g. 2000-01-01T00:00:00Z). Defaults to the latest.

\t-o PATH
\t    Where to write the restored database. Defaults to the database path; required with REPLICA_URL.

\t-if-db-not-exists
\t    Exit 0 without restoring if the output database already exists.

\t-if-replica-exists
\t    Exit 0 if the replica holds no backup. An unreachable store is still an error.

\t-dry-run
\t    Print the restore plan and exit without writing.

\t-force
\t    Overwrite an existing output database and its -wal, -shm and -journal files.

\t-json
\t    Print a JSON summary after a successful restore.

\t-f
\t    Follow mode: keep applying new changes after the restore. Not with -txid or -timestamp.

\t-follow-interval DURATION
\t    Polling interval for follow mode. Defaults to 1s.

\t-parallelism NUM
\t    Number of files downloaded in parallel. Defaults to 8.

\t-integrity-check MODE
\t    none, quick or full: check the restored database. Defaults to none.
";

const DATABASES_USAGE: &str = "The databases command lists the databases in the configuration file.

Usage:

\tlitestream databases [arguments]

Arguments:

\t-config PATH
\t    Configuration file. Defaults to $LITESTREAM_CONFIG or /etc/litestream.yml.

\t-json
\t    Print JSON instead of a table.

\t-no-expand-env
\t    Do not expand $VAR and ${VAR} in the configuration file.
";

const VERSION_USAGE: &str = "Prints the version.

Usage:

\tlitestream version [arguments]

Arguments:

\t-verbose
\t    Print build details.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn parse_str(s: &str) -> Result<LitestreamCommand, UsageError> {
        parse(&argv(s))
    }

    fn restore_ok(s: &str) -> RestoreArgs {
        match parse_str(s) {
            Ok(LitestreamCommand::Restore(a)) => a,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn replicate_ok(s: &str) -> ReplicateArgs {
        match parse_str(s) {
            Ok(LitestreamCommand::Replicate(a)) => a,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn restore_accepts_every_go_flag_form() {
        for (line, want) in restore_cases() {
            assert_eq!(restore_ok(line), want, "{line}");
        }
    }

    /// Accepted `restore` command lines and what they parse to.
    fn restore_cases() -> Vec<(&'static str, RestoreArgs)> {
        let base = RestoreArgs {
            target: "/data/app.db".into(),
            ..RestoreArgs::default()
        };
        let cases: Vec<(&str, RestoreArgs)> = vec![
            ("restore /data/app.db", base.clone()),
            (
                "restore -config /etc/l.yml /data/app.db",
                RestoreArgs {
                    config: Some("/etc/l.yml".into()),
                    ..base.clone()
                },
            ),
            (
                "restore --config /etc/l.yml /data/app.db",
                RestoreArgs {
                    config: Some("/etc/l.yml".into()),
                    ..base.clone()
                },
            ),
            (
                "restore -config=/etc/l.yml /data/app.db",
                RestoreArgs {
                    config: Some("/etc/l.yml".into()),
                    ..base.clone()
                },
            ),
            (
                "restore --config=/etc/l.yml /data/app.db",
                RestoreArgs {
                    config: Some("/etc/l.yml".into()),
                    ..base.clone()
                },
            ),
            ("restore -config= /data/app.db", base.clone()),
            (
                "restore -no-expand-env /data/app.db",
                RestoreArgs {
                    no_expand_env: true,
                    ..base.clone()
                },
            ),
            (
                "restore -no-expand-env=true /data/app.db",
                RestoreArgs {
                    no_expand_env: true,
                    ..base.clone()
                },
            ),
            (
                "restore -no-expand-env=T /data/app.db",
                RestoreArgs {
                    no_expand_env: true,
                    ..base.clone()
                },
            ),
            (
                "restore -no-expand-env=1 /data/app.db",
                RestoreArgs {
                    no_expand_env: true,
                    ..base.clone()
                },
            ),
            (
                "restore -no-expand-env -no-expand-env=false /data/app.db",
                base.clone(),
            ),
            (
                "restore -o /tmp/out.db /data/app.db",
                RestoreArgs {
                    output: Some("/tmp/out.db".into()),
                    ..base.clone()
                },
            ),
            (
                "restore -o=/tmp/a.db -o /tmp/b.db /data/app.db",
                RestoreArgs {
                    output: Some("/tmp/b.db".into()),
                    ..base.clone()
                },
            ),
            (
                "restore -txid 00000000000000ff /data/app.db",
                RestoreArgs {
                    txid: Some(255),
                    ..base.clone()
                },
            ),
            (
                "restore -txid 00000000000000FF /data/app.db",
                RestoreArgs {
                    txid: Some(255),
                    ..base.clone()
                },
            ),
            ("restore -txid 0000000000000000 /data/app.db", base.clone()),
            (
                "restore -timestamp 2024-01-02T03:04:05Z /data/app.db",
                RestoreArgs {
                    timestamp: Some("2024-01-02T03:04:05Z".into()),
                    ..base.clone()
                },
            ),
            (
                "restore -if-db-not-exists -if-replica-exists /data/app.db",
                RestoreArgs {
                    if_db_not_exists: true,
                    if_replica_exists: true,
                    ..base.clone()
                },
            ),
            (
                "restore --if-db-not-exists --if-replica-exists /data/app.db",
                RestoreArgs {
                    if_db_not_exists: true,
                    if_replica_exists: true,
                    ..base.clone()
                },
            ),
            (
                "restore -parallelism 4 /data/app.db",
                RestoreArgs {
                    parallelism: Some(4),
                    ..base.clone()
                },
            ),
            (
                "restore -parallelism=0x10 /data/app.db",
                RestoreArgs {
                    parallelism: Some(16),
                    ..base.clone()
                },
            ),
            (
                "restore -parallelism 1_0 /data/app.db",
                RestoreArgs {
                    parallelism: Some(10),
                    ..base.clone()
                },
            ),
            (
                "restore -parallelism 010 /data/app.db",
                RestoreArgs {
                    parallelism: Some(8),
                    ..base.clone()
                },
            ),
            (
                "restore -dry-run -force -json /data/app.db",
                RestoreArgs {
                    dry_run: true,
                    force: true,
                    json: true,
                    ..base.clone()
                },
            ),
            (
                "restore -f -follow-interval 250ms /data/app.db",
                RestoreArgs {
                    follow: true,
                    follow_interval: Some(Duration::from_millis(250)),
                    ..base.clone()
                },
            ),
            (
                "restore -integrity-check quick /data/app.db",
                RestoreArgs {
                    integrity_check: IntegrityCheck::Quick,
                    ..base.clone()
                },
            ),
            (
                "restore -integrity-check=full /data/app.db",
                RestoreArgs {
                    integrity_check: IntegrityCheck::Full,
                    ..base.clone()
                },
            ),
            ("restore -integrity-check none /data/app.db", base.clone()),
            ("restore -- /data/app.db", base.clone()),
            (
                "restore -- -weird-name.db",
                RestoreArgs {
                    target: "-weird-name.db".into(),
                    ..RestoreArgs::default()
                },
            ),
            (
                "restore -o - /data/app.db",
                RestoreArgs {
                    output: Some("-".into()),
                    ..base.clone()
                },
            ),
            (
                "restore -o -h /data/app.db",
                RestoreArgs {
                    output: Some("-h".into()),
                    ..base.clone()
                },
            ),
            (
                "restore -o /tmp/x.db s3://bucket/db",
                RestoreArgs {
                    output: Some("/tmp/x.db".into()),
                    target: "s3://bucket/db".into(),
                    ..RestoreArgs::default()
                },
            ),
        ];
        cases
    }

    /// The Nomad prestart line from the issue, verbatim.
    #[test]
    fn restore_nomad_prestart_line() {
        let a = restore_ok(
            "restore -config /local/litestream.yml -o /alloc/data/app.db -if-db-not-exists -if-replica-exists -timestamp 2025-06-01T12:00:00+02:00 /data/app.db",
        );
        assert_eq!(a.config, Some(PathBuf::from("/local/litestream.yml")));
        assert_eq!(a.output, Some(PathBuf::from("/alloc/data/app.db")));
        assert!(a.if_db_not_exists && a.if_replica_exists);
        assert!(!a.target_is_url());
        let at = a
            .timestamp_time()
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(at.as_secs(), 1_748_772_000);
        let a = restore_ok(
            "restore -if-db-not-exists -if-replica-exists -txid 000000000000002a /data/app.db",
        );
        assert_eq!(a.txid, Some(42));
        // -txid and -timestamp together are refused, as by Litestream.
        let e = parse_str(
            "restore -timestamp 2025-06-01T12:00:00Z -txid 000000000000002a /data/app.db",
        )
        .unwrap_err();
        assert_eq!(e.message, "cannot specify index & timestamp to restore");
    }

    /// (command line, stderr, whether usage goes to stdout, exit code), confirmed against litestream 0.5.17 by
    /// `usage_errors_match_the_real_litestream`.
    const USAGE_CASES: &[(&str, &str, bool, u8)] = &[
        (
            "restore -badflag x",
            "flag provided but not defined: -badflag\nError: flag provided but not defined: -badflag\n",
            true,
            1,
        ),
        (
            "restore --badflag x",
            "flag provided but not defined: -badflag\nError: flag provided but not defined: -badflag\n",
            true,
            1,
        ),
        (
            "restore",
            "Error: database path or replica URL required\nTry: litestream restore -o /path/to/db s3://bucket/prefix\n",
            false,
            1,
        ),
        ("restore a b", "Error: too many arguments\n", false, 1),
        (
            "restore -if-db-not-exists false x",
            "Error: too many arguments\n",
            false,
            1,
        ),
        (
            "restore -o",
            "flag needs an argument: -o\nError: flag needs an argument: -o\n",
            true,
            1,
        ),
        (
            "restore -txid 12 x",
            "invalid value \"12\" for flag -txid: invalid txid format\nError: invalid value \"12\" for flag -txid: invalid txid format\n",
            true,
            1,
        ),
        (
            "restore -txid 000000000000000g x",
            "invalid value \"000000000000000g\" for flag -txid: invalid txid format\nError: invalid value \"000000000000000g\" for flag -txid: invalid txid format\n",
            true,
            1,
        ),
        (
            "restore -parallelism x a",
            "invalid value \"x\" for flag -parallelism: parse error\nError: invalid value \"x\" for flag -parallelism: parse error\n",
            true,
            1,
        ),
        (
            "restore -parallelism 99999999999999999999 a",
            "invalid value \"99999999999999999999\" for flag -parallelism: value out of range\nError: invalid value \"99999999999999999999\" for flag -parallelism: value out of range\n",
            true,
            1,
        ),
        (
            "restore -follow-interval 5 a",
            "invalid value \"5\" for flag -follow-interval: parse error\nError: invalid value \"5\" for flag -follow-interval: parse error\n",
            true,
            1,
        ),
        (
            "restore -force=maybe a",
            "invalid boolean value \"maybe\" for -force: parse error\nError: invalid boolean value \"maybe\" for -force: parse error\n",
            true,
            1,
        ),
        (
            "restore ---x a",
            "bad flag syntax: ---x\nError: bad flag syntax: ---x\n",
            true,
            1,
        ),
        (
            "restore -=x a",
            "bad flag syntax: -=x\nError: bad flag syntax: -=x\n",
            true,
            1,
        ),
        (
            "restore -timestamp 2020-01-01 -o o.db file:///nonexistent/x",
            "Error: invalid -timestamp, must specify in ISO 8601\u{a0}format (e.g. 2000-01-01T00:00:00Z)\n",
            false,
            1,
        ),
        (
            "restore -integrity-check bad -o o.db file:///nonexistent/x",
            "Error: invalid -integrity-check value: bad\n",
            false,
            1,
        ),
        (
            "restore file:///nonexistent/x",
            "Error: -o is required when restoring from a replica URL\nTry: litestream restore -o /path/to/db file:///nonexistent/x\n",
            false,
            1,
        ),
        (
            "restore -config c.yml file:///nonexistent/x",
            "Error: cannot specify a replica URL and the -config flag\n",
            false,
            1,
        ),
        (
            "restore -f -txid 0000000000000001 -o o.db file:///nonexistent/x",
            "Error: cannot use follow mode with -txid\n",
            false,
            1,
        ),
        (
            "restore -f -timestamp 2020-01-01T00:00:00Z -o o.db file:///nonexistent/x",
            "Error: cannot use follow mode with -timestamp\n",
            false,
            1,
        ),
        (
            "restore -dry-run -f -o o.db file:///nonexistent/x",
            "Error: cannot use -dry-run with -f\n",
            false,
            1,
        ),
        ("restore --h", "", true, 1),
        ("restore -h=1", "", true, 1),
        ("restore -help=false x", "", true, 1),
        (
            "replicate /nonexistent/a.db",
            "Error: must specify at least one replica URL for /nonexistent/a.db\n",
            false,
            1,
        ),
        (
            "replicate -config x.yml /nonexistent/a.db file:///nonexistent/r",
            "Error: cannot specify a replica URL and the -config flag\n",
            false,
            1,
        ),
        (
            "replicate /nonexistent/a.db file:///nonexistent/r -exec foo",
            "Error: flag \"-exec\" must be positioned before DB_PATH and REPLICA_URL arguments\n",
            false,
            1,
        ),
        (
            "replicate -once -exec foo /nonexistent/a.db file:///nonexistent/r",
            "Error: cannot specify -once flag with -exec\n",
            false,
            1,
        ),
        (
            "replicate -force-snapshot /nonexistent/a.db file:///nonexistent/r",
            "Error: cannot specify -force-snapshot flag without -once\n",
            false,
            1,
        ),
        (
            "replicate -enforce-retention /nonexistent/a.db file:///nonexistent/r",
            "Error: cannot specify -enforce-retention flag without -once\n",
            false,
            1,
        ),
        (
            "replicate -once=maybe",
            "invalid boolean value \"maybe\" for -once: parse error\nError: invalid boolean value \"maybe\" for -once: parse error\n",
            true,
            1,
        ),
        (
            "replicate -exec",
            "flag needs an argument: -exec\nError: flag needs an argument: -exec\n",
            true,
            1,
        ),
        ("databases x", "Error: too many arguments\n", false, 1),
        (
            "databases -x",
            "flag provided but not defined: -x\nError: flag provided but not defined: -x\n",
            true,
            1,
        ),
        (
            "version -x",
            "flag provided but not defined: -x\nError: flag provided but not defined: -x\n",
            true,
            1,
        ),
        (
            "bogus",
            "Error: litestream bogus: unknown command\n",
            false,
            1,
        ),
        ("--version", "", true, 1),
        ("-x", "", true, 1),
        ("", "", true, 1),
    ];

    /// Command lines that print usage and exit 0.
    const HELP_CASES: &[&str] = &[
        "help",
        "-h",
        "-help",
        "--help",
        "restore -h",
        "restore -help",
        "restore --help",
        "replicate -h",
        "databases -h",
        "version -h",
        "restore -o x -h",
        "restore --h -h",
        "-x -h",
    ];

    #[test]
    fn usage_errors_match_litestream() {
        for (line, stderr, usage_on_stdout, code) in USAGE_CASES {
            let e = parse_str(line).unwrap_err();
            assert_eq!(e.stderr, *stderr, "{line}");
            assert_eq!(!e.stdout.is_empty(), *usage_on_stdout, "{line}");
            assert_eq!(e.exit_code, *code, "{line}");
        }
    }

    /// Runs every usage case and help case through Litestream 0.5.17 itself: same exit code, same stderr.
    #[test]
    fn usage_errors_match_the_real_litestream() {
        let bin = hearth_testkit::litestream_bin().unwrap();
        let cwd = tempfile::tempdir().unwrap();
        let run = |line: &str| {
            let out = hearth_testkit::command(&bin)
                .args(argv(line))
                .env_remove("LITESTREAM_CONFIG")
                .current_dir(cwd.path())
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        // Litestream reads the replica before it checks these, so against an empty replica it reports
        // "no backups found" first; hearth refuses the flags before any I/O. Same exit code.
        let order_differs =
            ["restore -f -timestamp 2020-01-01T00:00:00Z -o o.db file:///nonexistent/x"];
        for (line, stderr, usage_on_stdout, code) in USAGE_CASES {
            let (real_code, real_stdout, real_stderr) = run(line);
            assert_eq!(real_code, Some(i32::from(*code)), "{line}: {real_stderr}");
            if !order_differs.contains(line) {
                assert_eq!(real_stderr, *stderr, "{line}");
            }
            if *usage_on_stdout {
                assert!(real_stdout.contains("Usage:"), "{line}: {real_stdout}");
            }
        }
        // Every command line hearth accepts gets past Litestream's flag parsing too: with no config file it
        // fails only on that (or on the empty replica for URL targets).
        for (line, _) in restore_cases()
            .into_iter()
            .filter(|(line, _)| !line.contains("s3://"))
        {
            let (_, _, real_stderr) = run(line);
            assert!(
                real_stderr.starts_with("Error: config file not found")
                    || real_stderr.starts_with("Error: no backups found"),
                "{line}: {real_stderr}"
            );
        }
        for line in HELP_CASES {
            let (real_code, real_stdout, real_stderr) = run(line);
            assert_eq!((real_code, real_stderr.as_str()), (Some(0), ""), "{line}");
            assert!(real_stdout.contains("Usage:"), "{line}");
        }
    }

    #[test]
    fn help_exits_zero_only_when_asked_plainly() {
        for line in HELP_CASES {
            match parse_str(line) {
                Ok(LitestreamCommand::Help(text)) => assert!(text.contains("Usage:"), "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
        let Ok(LitestreamCommand::Help(text)) = parse_str("restore -h") else {
            panic!()
        };
        assert!(text.contains("-if-replica-exists"));
        let Ok(LitestreamCommand::Help(text)) = parse_str("replicate -h") else {
            panic!()
        };
        assert!(text.contains("-restore-if-db-not-exists"));
    }

    #[test]
    fn replicate_forms() {
        let cases: Vec<(&str, ReplicateArgs)> = vec![
            ("replicate", ReplicateArgs::default()),
            (
                "replicate -config /local/litestream.yml",
                ReplicateArgs {
                    config: Some("/local/litestream.yml".into()),
                    ..ReplicateArgs::default()
                },
            ),
            (
                "replicate --config=/l.yml -no-expand-env",
                ReplicateArgs {
                    config: Some("/l.yml".into()),
                    no_expand_env: true,
                    ..ReplicateArgs::default()
                },
            ),
            (
                "replicate -exec /bin/app",
                ReplicateArgs {
                    exec: Some("/bin/app".into()),
                    ..ReplicateArgs::default()
                },
            ),
            (
                "replicate -once -force-snapshot -enforce-retention",
                ReplicateArgs {
                    once: true,
                    force_snapshot: true,
                    enforce_retention: true,
                    ..ReplicateArgs::default()
                },
            ),
            (
                "replicate -restore-if-db-not-exists -log-level debug",
                ReplicateArgs {
                    restore_if_db_not_exists: true,
                    log_level: Some("debug".into()),
                    ..ReplicateArgs::default()
                },
            ),
            (
                "replicate -once=false -force-snapshot=false",
                ReplicateArgs::default(),
            ),
            (
                "replicate /data/app.db s3://b/app file:///backup/app",
                ReplicateArgs {
                    db_and_urls: argv("/data/app.db s3://b/app file:///backup/app"),
                    ..ReplicateArgs::default()
                },
            ),
            (
                "replicate -once /data/app.db file:///backup/app",
                ReplicateArgs {
                    once: true,
                    db_and_urls: argv("/data/app.db file:///backup/app"),
                    ..ReplicateArgs::default()
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(replicate_ok(line), want, "{line}");
        }
        // `-exec` takes the whole next argument, spaces included.
        let a = parse(&[
            "replicate".into(),
            "-exec".into(),
            "/bin/app --port 80".into(),
        ])
        .unwrap();
        assert_eq!(
            a,
            LitestreamCommand::Replicate(ReplicateArgs {
                exec: Some("/bin/app --port 80".into()),
                ..ReplicateArgs::default()
            })
        );
    }

    #[test]
    fn other_commands() {
        assert_eq!(
            parse_str("version").unwrap(),
            LitestreamCommand::Version { verbose: false }
        );
        assert_eq!(
            parse_str("version -verbose extra").unwrap(),
            LitestreamCommand::Version { verbose: true }
        );
        assert_eq!(
            parse_str("databases -config /x.yml -json").unwrap(),
            LitestreamCommand::Databases(DatabasesArgs {
                config: Some("/x.yml".into()),
                json: true,
                no_expand_env: false
            })
        );
        for cmd in [
            "status",
            "ltx",
            "wal",
            "start",
            "stop",
            "sync",
            "register",
            "unregister",
            "reset",
            "list",
            "info",
        ] {
            match parse_str(cmd).unwrap() {
                LitestreamCommand::Unsupported { command, message } => {
                    assert_eq!(command, cmd);
                    assert!(message.contains("not supported by hearth"), "{message}");
                }
                other => panic!("{cmd}: {other:?}"),
            }
        }
    }

    #[test]
    fn rfc3339_as_go_parses_it() {
        let t = |s: &str| {
            parse_go_rfc3339(s)
                .map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos())
        };
        let cases: &[(&str, Option<u128>)] = &[
            ("1970-01-01T00:00:00Z", Some(0)),
            ("2000-01-01T00:00:00Z", Some(946_684_800_000_000_000)),
            ("2000-01-01T01:00:00+01:00", Some(946_684_800_000_000_000)),
            ("1999-12-31T19:00:00-05:00", Some(946_684_800_000_000_000)),
            ("2000-01-01T00:00:00.5Z", Some(946_684_800_500_000_000)),
            ("2000-01-01T00:00:00,25Z", Some(946_684_800_250_000_000)),
            ("2000-01-01T0:00:00Z", Some(946_684_800_000_000_000)),
            ("2024-02-29T00:00:00Z", Some(1_709_164_800_000_000_000)),
            ("2023-02-29T00:00:00Z", None),
            ("2000-01-01", None),
            ("2000-01-01 00:00:00Z", None),
            ("2000-01-01t00:00:00Z", None),
            ("2000-01-01T00:00:00z", None),
            ("2000-01-01T00:00:00", None),
            ("2000-13-01T00:00:00Z", None),
            ("2000-01-01T24:00:00Z", None),
            ("2000-01-01T00:60:00Z", None),
            ("2000-01-01T00:00:60Z", None),
            ("2000-01-01T00:00:00+0100", None),
            ("2000-01-01T00:00:00Zjunk", None),
            ("20000-01-01T00:00:00Z", None),
        ];
        for (s, want) in cases {
            assert_eq!(t(s), *want, "{s}");
        }
    }

    #[test]
    fn go_int_parsing() {
        let cases: &[(&str, Result<i64, &str>)] = &[
            ("8", Ok(8)),
            ("+8", Ok(8)),
            ("-8", Ok(-8)),
            ("0x1f", Ok(31)),
            ("0o17", Ok(15)),
            ("017", Ok(15)),
            ("0b101", Ok(5)),
            ("1_000", Ok(1000)),
            ("0x_1f", Ok(31)),
            ("0", Ok(0)),
            ("_1", Err("parse error")),
            ("1__0", Err("parse error")),
            ("1_", Err("parse error")),
            ("", Err("parse error")),
            ("0x", Err("parse error")),
            ("08", Err("parse error")),
            ("1.5", Err("parse error")),
            ("9223372036854775807", Ok(i64::MAX)),
            ("-9223372036854775808", Ok(i64::MIN)),
            ("9223372036854775808", Err("value out of range")),
        ];
        for (s, want) in cases {
            assert_eq!(
                go_parse_int(s).map_err(|e| e.to_string()),
                want.map_err(str::to_string),
                "{s}"
            );
        }
    }
}
