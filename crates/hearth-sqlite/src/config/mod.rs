//! hearth's SQLite replication configuration, read from a Litestream `litestream.yml` (0.3 `replicas:` or
//! 0.5 `replica:` form) or built from a command line (`replicate DB URL...`, `restore URL`).
//!
//! The YAML is walked by hand over `serde_yaml::Value` rather than derived with serde, for three reasons:
//! Litestream (Go, yaml.v2) ignores unknown keys, and hearth must do the same but report them as warnings;
//! every error must name the key path (`dbs[0].replica.url`); and yaml.v2 reads YAML 1.1 scalars (`yes`/`on`
//! booleans, numbers in string fields) that serde_yaml's YAML 1.2 types would refuse.

mod duration;
mod expand;
mod url;

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use hearth_store::{Location, S3Location};
use serde_yaml::{Mapping, Value};

pub use duration::{DurationError, GoDuration, format_go_duration, parse_go_duration};
pub use expand::expand_env;

/// Where Litestream looks for its config when `-config` is not given and `LITESTREAM_CONFIG` is unset.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/litestream.yml";

/// Litestream's default config path: `$LITESTREAM_CONFIG` if set and non-empty, else `/etc/litestream.yml`.
pub fn default_config_path(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    env("LITESTREAM_CONFIG")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH), PathBuf::from)
}

/// The whole configuration: global settings and the databases to replicate.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub dbs: Vec<DbConfig>,
    /// Listen address for Prometheus metrics (`addr:`, e.g. `:9090`); `None` serves no metrics.
    pub addr: Option<String>,
    /// Command to run as a child while replicating (`exec:`); hearth exits when it exits.
    pub exec: Option<String>,
    /// `logging.level` (or `$LOG_LEVEL`, which wins, as in Litestream 0.5): trace, debug, info, warn, error.
    pub log_level: Option<String>,
    /// `logging.type: json`.
    pub log_json: bool,
    /// `logging.stderr: true`: log to standard error instead of standard output.
    pub log_stderr: bool,
    /// How often a full snapshot is written (`snapshot.interval`, default 24h).
    pub snapshot_interval: Duration,
    /// How long snapshots are kept (`snapshot.retention`, default 24h).
    pub snapshot_retention: Duration,
    /// Compaction intervals of levels 1.. (`levels: [{interval: 30s}, ...]`, default 30s, 5m, 1h).
    pub levels: Vec<Duration>,
    /// How long level-0 files stay after compaction (`l0-retention`, default 5m; 0 disables).
    pub l0_retention: Duration,
    /// `retention.enabled` (default true): whether hearth deletes old files itself.
    pub retention_enabled: bool,
    /// Budget for the final flush on shutdown (`shutdown-sync-timeout`). hearth's default is 4s, not
    /// Litestream's 30s, so that the flush fits Nomad's default 5s `kill_timeout`.
    pub shutdown_sync_timeout: Duration,
    /// `validation.interval`: how often replicas are checked against the database, if set.
    pub validation_interval: Option<Duration>,
    /// Keys that were read but are unknown or ignored by hearth, one sentence each, for the CLI to log.
    pub warnings: Vec<String>,
}

/// One database and where it is replicated.
#[derive(Debug, Clone, PartialEq)]
pub struct DbConfig {
    /// Absolute, cleaned path of the database file (`~` expanded, `sqlite://` prefix removed).
    pub path: PathBuf,
    /// At least one. hearth, unlike Litestream 0.5, allows several replicas per database.
    pub replicas: Vec<ReplicaConfig>,
    /// How often the WAL is checked for new frames (`monitor-interval`, default 1s).
    pub monitor_interval: Duration,
    /// How often a PASSIVE checkpoint is attempted (`checkpoint-interval`, default 1m).
    pub checkpoint_interval: Duration,
    /// SQLite busy timeout for hearth's connection (`busy-timeout`, default 1s).
    pub busy_timeout: Duration,
    /// WAL size in pages that triggers a PASSIVE checkpoint (`min-checkpoint-page-count`, default 1000).
    pub min_checkpoint_page_count: u32,
    /// WAL size in pages that triggers a TRUNCATE checkpoint with a bounded wait (`truncate-page-n`,
    /// default 121359, about 500 MB of 4 KiB pages; 0 disables). 0.3's `max-checkpoint-page-count` maps here.
    pub truncate_page_n: u32,
    /// `restore-if-db-not-exists: true` (or the `-restore-if-db-not-exists` flag): restore before replicating
    /// when the database file is missing.
    pub restore_if_db_not_exists: bool,
}

/// One replica of a database.
#[derive(Clone, PartialEq)]
pub struct ReplicaConfig {
    /// The `name:` given, else the type (`file`, `s3`), else `type-N` (N = position) when that name is taken.
    pub name: String,
    pub location: Location,
    /// How often new WAL frames are shipped (`sync-interval`, default 1s).
    pub sync_interval: Duration,
    /// 0.3's per-replica `retention` (0.5 dropped it for the global `snapshot.retention`).
    pub retention: Option<Duration>,
    /// 0.3's `retention-check-interval`.
    pub retention_check_interval: Option<Duration>,
    /// 0.3's per-replica `snapshot-interval`.
    pub snapshot_interval: Option<Duration>,
    /// `validation-interval`.
    pub validation_interval: Option<Duration>,
    /// `age.recipients`: public keys replica objects are encrypted to. Litestream 0.5 cannot read such replicas.
    pub age_recipients: Vec<String>,
    /// `age.identities`: private keys used to decrypt on restore. Secret: never logged.
    pub age_identities: Vec<String>,
}

impl std::fmt::Debug for ReplicaConfig {
    // Hand-written so that age identities (private keys) never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaConfig")
            .field("name", &self.name)
            .field("location", &self.location)
            .field("sync_interval", &self.sync_interval)
            .field("retention", &self.retention)
            .field("retention_check_interval", &self.retention_check_interval)
            .field("snapshot_interval", &self.snapshot_interval)
            .field("validation_interval", &self.validation_interval)
            .field("age_recipients", &self.age_recipients)
            .field(
                "age_identities",
                &format_args!("<{} set>", self.age_identities.len()),
            )
            .finish()
    }
}

/// Why a configuration (file, URL or command line) could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file does not exist. Retrying does not help; fix the path.
    #[error("config file not found: {}; pass -config with the right path or set LITESTREAM_CONFIG", path.display())]
    NotFound { path: PathBuf },
    /// The config file could not be read (permissions, I/O). Retrying may help if the error is transient.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid YAML.
    #[error(
        "{}invalid YAML: {message}; check indentation and quoting",
        file_prefix(file)
    )]
    Yaml {
        file: Option<PathBuf>,
        message: String,
    },
    /// A key has a wrong type or value, a required key is missing, or keys conflict.
    #[error("{}{key}: {problem}{}; {fix}", file_prefix(file), got(value))]
    Invalid {
        file: Option<PathBuf>,
        /// Where in the file, e.g. `dbs[0].replica.url`.
        key: String,
        /// The offending value, `None` when it is secret or not a scalar.
        value: Option<String>,
        problem: String,
        fix: String,
    },
    /// A Litestream feature hearth does not implement (yet).
    #[error(
        "{}{key}: {feature} is not supported by hearth yet; {fix}",
        file_prefix(file)
    )]
    Unsupported {
        file: Option<PathBuf>,
        key: String,
        feature: String,
        fix: String,
    },
}

fn file_prefix(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|f| format!("{}: ", f.display()))
        .unwrap_or_default()
}

fn got(value: &Option<String>) -> String {
    value
        .as_ref()
        .map(|v| format!(" (got {v:?})"))
        .unwrap_or_default()
}

impl ConfigError {
    /// Whether retrying the same operation could succeed: only transient read errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConfigError::Read { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }

    /// The key path the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } | ConfigError::Unsupported { key, .. } => Some(key),
            _ => None,
        }
    }

    fn in_file(mut self, path: &Path) -> Self {
        match &mut self {
            ConfigError::Yaml { file, .. }
            | ConfigError::Invalid { file, .. }
            | ConfigError::Unsupported { file, .. } => {
                *file = Some(path.to_path_buf());
            }
            ConfigError::NotFound { .. } | ConfigError::Read { .. } => {}
        }
        self
    }
}

fn invalid(
    key: &str,
    value: Option<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        file: None,
        key: key.to_string(),
        value,
        problem: problem.into(),
        fix: fix.into(),
    }
}

fn unsupported(key: &str, feature: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported {
        file: None,
        key: key.to_string(),
        feature: feature.into(),
        fix: fix.into(),
    }
}

const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_SHUTDOWN_SYNC_TIMEOUT: Duration = Duration::from_secs(4);

impl Config {
    /// A configuration with Litestream 0.5's defaults (and hearth's 4s shutdown budget) and no databases.
    pub fn empty() -> Config {
        Config {
            dbs: Vec::new(),
            addr: None,
            exec: None,
            log_level: None,
            log_json: false,
            log_stderr: false,
            snapshot_interval: Duration::from_secs(24 * 3600),
            snapshot_retention: Duration::from_secs(24 * 3600),
            levels: vec![
                Duration::from_secs(30),
                Duration::from_secs(300),
                Duration::from_secs(3600),
            ],
            l0_retention: Duration::from_secs(300),
            retention_enabled: true,
            shutdown_sync_timeout: DEFAULT_SHUTDOWN_SYNC_TIMEOUT,
            validation_interval: None,
            warnings: Vec::new(),
        }
    }

    /// Reads a config file, expanding `$VAR`/`${VAR}` from the process environment unless `expand_env` is
    /// false (`-no-expand-env`). `~` in `path` is expanded and relative paths are taken from the current directory.
    pub fn load(path: &Path, expand_env: bool) -> Result<Config, ConfigError> {
        let env = process_env;
        let path = expand_path(&path.to_string_lossy(), &env);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::NotFound { path });
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Config::parse(&text, expand_env, &env).map_err(|e| e.in_file(&path))
    }

    /// Parses config text. `env` answers environment lookups (for expansion, `LOG_LEVEL`, `HOME` and S3
    /// credentials); relative database paths are resolved against the current directory.
    pub fn parse(
        text: &str,
        expand_env: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = if expand_env {
            expand::expand_env(text, env)
        } else {
            text.to_string()
        };
        let mut value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_yaml::from_str(&text).map_err(|e| ConfigError::Yaml {
                file: None,
                message: e.to_string(),
            })?
        };
        // yaml.v2 applies `<<: *anchor` merge keys; serde_yaml only does so on request.
        value.apply_merge().map_err(|e| ConfigError::Yaml {
            file: None,
            message: e.to_string(),
        })?;
        let empty = Mapping::new();
        let root = match &value {
            Value::Null => &empty,
            Value::Mapping(m) => m,
            other => {
                return Err(invalid(
                    "(top level)",
                    None,
                    format!("expected a mapping of keys, found {}", kind(other)),
                    "start the file with keys such as `dbs:`",
                ));
            }
        };
        let mut reader = Reader {
            warnings: Vec::new(),
            env,
        };
        reader.config(root)
    }

    /// A configuration for `litestream replicate DB_PATH REPLICA_URL...`: one database, one replica per URL.
    pub fn from_command_line(
        db_path: &str,
        replica_urls: &[String],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut replicas: Vec<ReplicaConfig> = Vec::with_capacity(replica_urls.len());
        for (i, u) in replica_urls.iter().enumerate() {
            let mut r = replica_from_url(u, env)?;
            if replicas.iter().any(|other| other.name == r.name) {
                r.name = format!("{}-{i}", r.name);
            }
            replicas.push(r);
        }
        if replicas.is_empty() {
            return Err(invalid(
                "replica URL",
                None,
                format!("no replica URL given for {db_path}"),
                "add a replica URL after the database path, e.g. file:///var/lib/backup/db",
            ));
        }
        let mut config = Config::empty();
        config
            .dbs
            .push(DbConfig::new(expand_path(db_path, env), replicas));
        Ok(config)
    }

    /// The database configured for `path`, compared as Litestream does: after `~` expansion, making the path
    /// absolute and cleaning it (no symlink resolution).
    pub fn db(&self, path: &Path) -> Option<&DbConfig> {
        let wanted = expand_path(&path.to_string_lossy(), &process_env);
        self.dbs.iter().find(|db| db.path == wanted)
    }
}

impl DbConfig {
    /// A database with Litestream 0.5's default timings.
    pub fn new(path: PathBuf, replicas: Vec<ReplicaConfig>) -> DbConfig {
        DbConfig {
            path,
            replicas,
            monitor_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(60),
            busy_timeout: Duration::from_secs(1),
            min_checkpoint_page_count: 1000,
            truncate_page_n: 121_359,
            restore_if_db_not_exists: false,
        }
    }
}

fn process_env(name: &str) -> Option<String> {
    // Litestream 0.5 expands `$PID` to its own process id.
    if name == "PID" {
        return Some(std::process::id().to_string());
    }
    std::env::var(name).ok()
}

/// Builds a replica from a URL given on the command line (`replicate DB URL`, `restore -o OUT URL`), with
/// default settings and S3 credentials from the environment.
pub fn replica_from_url(
    url: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ReplicaConfig, ConfigError> {
    let raw = RawReplica {
        url: Some(url.to_string()),
        ..RawReplica::default()
    };
    build_replica(&raw, "replica URL", env)
}

// ---------------------------------------------------------------------------------------------------------
// Reading YAML values.

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Keys whose values must never appear in a message.
fn is_secret(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    let last = last.split('[').next().unwrap_or(last);
    matches!(
        last,
        "secret-access-key"
            | "access-key-id"
            | "identities"
            | "password"
            | "webdav-password"
            | "sse-customer-key"
            | "account-key"
            | "sas-token"
            | "token"
            | "seed"
            | "jwt"
            | "nkey"
    )
}

/// The value to show in a message: scalars only, never secrets; URLs with their user-info hidden.
fn shown(key: &str, v: &Value) -> Option<String> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    if key.ends_with(".url") || key == "url" {
        return Some(url::redact_url(&text));
    }
    if is_secret(key) { None } else { Some(text) }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A present, non-null value for `key`.
fn get<'a>(map: &'a Mapping, key: &str) -> Option<&'a Value> {
    match map.get(key) {
        None | Some(Value::Null) => None,
        Some(v) => Some(v),
    }
}

/// A string, as yaml.v2 reads one: any scalar's text; empty means unset.
fn get_string(map: &Mapping, key: &str, path: &str) -> Result<Option<String>, ConfigError> {
    let Some(v) = get(map, key) else {
        return Ok(None);
    };
    let full = join(path, key);
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => {
            return Err(invalid(
                &full,
                None,
                format!("expected a string, found {}", kind(other)),
                "write a single value",
            ));
        }
    };
    Ok(if s.is_empty() { None } else { Some(s) })
}

/// A boolean, accepting YAML 1.1's spellings (`yes`, `on`, `y`...) as yaml.v2 does.
fn get_bool(map: &Mapping, key: &str, path: &str) -> Result<Option<bool>, ConfigError> {
    let Some(v) = get(map, key) else {
        return Ok(None);
    };
    let full = join(path, key);
    match v {
        Value::Bool(b) => Ok(Some(*b)),
        Value::String(s) => match s.as_str() {
            "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
                Ok(Some(true))
            }
            "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off"
            | "OFF" => Ok(Some(false)),
            _ => Err(invalid(
                &full,
                shown(&full, v),
                "expected true or false",
                "write true or false",
            )),
        },
        other => Err(invalid(
            &full,
            shown(&full, other),
            "expected true or false",
            "write true or false",
        )),
    }
}

/// A Go duration (`1s`, `500ms`, `1m30s`). A bare 0 means zero; other bare numbers are refused because
/// Litestream would read them as nanoseconds, which is never what was meant.
fn get_go_duration(
    map: &Mapping,
    key: &str,
    path: &str,
) -> Result<Option<GoDuration>, ConfigError> {
    let Some(v) = get(map, key) else {
        return Ok(None);
    };
    let full = join(path, key);
    match v {
        Value::String(s) => parse_go_duration(s).map(Some).map_err(|e| {
            invalid(
                &full,
                shown(&full, v),
                format!("not a duration: {e}"),
                "write a Go duration such as 1s, 500ms, 1m30s or 24h",
            )
        }),
        Value::Number(n) if n.as_u64() == Some(0) => Ok(Some(GoDuration {
            negative: false,
            magnitude: Duration::ZERO,
        })),
        Value::Number(n) => Err(invalid(
            &full,
            shown(&full, v),
            "a bare number has no unit (Litestream would read it as nanoseconds)",
            format!("add a unit, e.g. {n}s or {n}ms"),
        )),
        other => Err(invalid(
            &full,
            shown(&full, other),
            format!("expected a duration, found {}", kind(other)),
            "write a Go duration such as 1s, 500ms, 1m30s or 24h",
        )),
    }
}

/// A duration that must not be negative.
fn get_duration(map: &Mapping, key: &str, path: &str) -> Result<Option<Duration>, ConfigError> {
    let Some(d) = get_go_duration(map, key, path)? else {
        return Ok(None);
    };
    let full = join(path, key);
    d.non_negative().map(Some).ok_or_else(|| {
        invalid(
            &full,
            Some(format!("-{}", format_go_duration(d.magnitude))),
            "must not be negative",
            "use 0 or a positive duration",
        )
    })
}

/// A duration that must be greater than zero.
fn get_positive_duration(
    map: &Mapping,
    key: &str,
    path: &str,
) -> Result<Option<Duration>, ConfigError> {
    let Some(d) = get_go_duration(map, key, path)? else {
        return Ok(None);
    };
    let full = join(path, key);
    if d.negative || d.magnitude.is_zero() {
        let text = format!(
            "{}{}",
            if d.negative { "-" } else { "" },
            format_go_duration(d.magnitude)
        );
        return Err(invalid(
            &full,
            Some(text),
            "must be greater than 0",
            "use a positive duration such as 1s",
        ));
    }
    Ok(Some(d.magnitude))
}

fn get_u32(map: &Mapping, key: &str, path: &str) -> Result<Option<u32>, ConfigError> {
    let Some(v) = get(map, key) else {
        return Ok(None);
    };
    let full = join(path, key);
    match v {
        Value::Number(n) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(invalid(
                &full,
                shown(&full, v),
                "expected a whole number from 0 to 4294967295",
                "write a plain number of pages",
            )),
        },
        other => Err(invalid(
            &full,
            shown(&full, other),
            format!("expected a number, found {}", kind(other)),
            "write a plain number of pages without quotes",
        )),
    }
}

fn get_string_list(map: &Mapping, key: &str, path: &str) -> Result<Vec<String>, ConfigError> {
    let Some(v) = get(map, key) else {
        return Ok(Vec::new());
    };
    let full = join(path, key);
    let Value::Sequence(items) = v else {
        return Err(invalid(
            &full,
            shown(&full, v),
            format!("expected a list, found {}", kind(v)),
            "write a YAML list, one `- item` per line",
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(invalid(
                &format!("{full}[{i}]"),
                None,
                format!("expected a string, found {}", kind(other)),
                "quote the value",
            )),
        })
        .collect()
}

fn get_map<'a>(
    map: &'a Mapping,
    key: &str,
    path: &str,
) -> Result<Option<&'a Mapping>, ConfigError> {
    match get(map, key) {
        None => Ok(None),
        Some(Value::Mapping(m)) => Ok(Some(m)),
        Some(other) => {
            let full = join(path, key);
            Err(invalid(
                &full,
                shown(&full, other),
                format!("expected a mapping, found {}", kind(other)),
                "indent the sub-keys under it",
            ))
        }
    }
}

fn get_seq<'a>(
    map: &'a Mapping,
    key: &str,
    path: &str,
) -> Result<Option<&'a Vec<Value>>, ConfigError> {
    match get(map, key) {
        None => Ok(None),
        Some(Value::Sequence(s)) => Ok(Some(s)),
        Some(other) => {
            let full = join(path, key);
            Err(invalid(
                &full,
                shown(&full, other),
                format!("expected a list, found {}", kind(other)),
                "write a YAML list, one `- item` per line",
            ))
        }
    }
}

/// How hearth treats a key it finds in a mapping.
#[derive(Clone, Copy)]
enum Rule {
    /// Read and used.
    Used,
    /// Accepted for compatibility but has no effect; the reason goes into the warning.
    Ignored(&'static str),
}

/// Replica-level settings, which Litestream 0.5 also accepts at the top level as defaults for every replica.
const REPLICA_SETTING_KEYS: &[(&str, Rule)] = &[
    ("sync-interval", Rule::Used),
    ("validation-interval", Rule::Used),
    ("access-key-id", Rule::Used),
    ("secret-access-key", Rule::Used),
    ("region", Rule::Used),
    ("bucket", Rule::Used),
    ("endpoint", Rule::Used),
    ("force-path-style", Rule::Used),
    ("skip-verify", Rule::Used),
    ("age", Rule::Used),
    // Refused in `settings()`, listed here so that they are not reported as unknown.
    ("sse-customer-algorithm", Rule::Used),
    ("sse-customer-key", Rule::Used),
    ("sse-customer-key-path", Rule::Used),
    ("sse-kms-key-id", Rule::Used),
    (
        "max-sync-ltx-files",
        Rule::Ignored("hearth ships every pending transaction in one sync"),
    ),
    (
        "auto-recover",
        Rule::Ignored("hearth always re-bases a broken replica chain and logs why"),
    ),
    (
        "sign-payload",
        Rule::Ignored("hearth's S3 client decides payload signing itself"),
    ),
    (
        "require-content-md5",
        Rule::Ignored("hearth's S3 client decides checksums itself"),
    ),
    (
        "storage-class",
        Rule::Ignored("hearth writes with the bucket's default storage class"),
    ),
    (
        "part-size",
        Rule::Ignored("hearth chooses multipart sizes itself"),
    ),
    (
        "concurrency",
        Rule::Ignored("hearth chooses upload concurrency itself"),
    ),
    // Settings of replica types hearth does not support; they only matter to replicas of those types.
    (
        "account-name",
        Rule::Ignored("Azure Blob Storage replicas are not supported"),
    ),
    (
        "account-key",
        Rule::Ignored("Azure Blob Storage replicas are not supported"),
    ),
    (
        "sas-token",
        Rule::Ignored("Azure Blob Storage replicas are not supported"),
    ),
    ("host", Rule::Ignored("SFTP replicas are not supported")),
    ("user", Rule::Ignored("SFTP replicas are not supported")),
    (
        "password",
        Rule::Ignored("SFTP and NATS replicas are not supported"),
    ),
    ("key-path", Rule::Ignored("SFTP replicas are not supported")),
    (
        "concurrent-writes",
        Rule::Ignored("SFTP replicas are not supported"),
    ),
    ("host-key", Rule::Ignored("SFTP replicas are not supported")),
    (
        "webdav-url",
        Rule::Ignored("WebDAV replicas are not supported"),
    ),
    (
        "webdav-username",
        Rule::Ignored("WebDAV replicas are not supported"),
    ),
    (
        "webdav-password",
        Rule::Ignored("WebDAV replicas are not supported"),
    ),
    ("jwt", Rule::Ignored("NATS replicas are not supported")),
    ("seed", Rule::Ignored("NATS replicas are not supported")),
    ("creds", Rule::Ignored("NATS replicas are not supported")),
    ("nkey", Rule::Ignored("NATS replicas are not supported")),
    ("username", Rule::Ignored("NATS replicas are not supported")),
    ("token", Rule::Ignored("NATS replicas are not supported")),
    ("tls", Rule::Ignored("NATS replicas are not supported")),
    ("root-cas", Rule::Ignored("NATS replicas are not supported")),
    (
        "client-cert",
        Rule::Ignored("NATS replicas are not supported"),
    ),
    (
        "client-key",
        Rule::Ignored("NATS replicas are not supported"),
    ),
    (
        "max-reconnects",
        Rule::Ignored("NATS replicas are not supported"),
    ),
    (
        "reconnect-wait",
        Rule::Ignored("NATS replicas are not supported"),
    ),
    ("timeout", Rule::Ignored("NATS replicas are not supported")),
];

const TOP_KEYS: &[(&str, Rule)] = &[
    ("dbs", Rule::Used),
    ("addr", Rule::Used),
    ("exec", Rule::Used),
    ("logging", Rule::Used),
    ("snapshot", Rule::Used),
    ("levels", Rule::Used),
    ("l0-retention", Rule::Used),
    ("retention", Rule::Used),
    ("shutdown-sync-timeout", Rule::Used),
    ("validation", Rule::Used),
    (
        "socket",
        Rule::Ignored("hearth has no control socket; use `hearth sqlite status`"),
    ),
    (
        "l0-retention-check-interval",
        Rule::Ignored("hearth enforces level-0 retention when it compacts"),
    ),
    (
        "verify-compaction",
        Rule::Ignored("hearth always verifies transaction ranges when it compacts"),
    ),
    (
        "heartbeat-url",
        Rule::Ignored("heartbeat pings are not implemented"),
    ),
    (
        "heartbeat-interval",
        Rule::Ignored("heartbeat pings are not implemented"),
    ),
    (
        "mcp-addr",
        Rule::Ignored("the MCP server is not implemented"),
    ),
    (
        "shutdown-sync-interval",
        Rule::Ignored("hearth retries the final flush on its own schedule"),
    ),
];

const DB_KEYS: &[(&str, Rule)] = &[
    ("path", Rule::Used),
    ("dir", Rule::Used),
    ("pattern", Rule::Used),
    ("recursive", Rule::Used),
    ("watch", Rule::Used),
    ("meta-dir", Rule::Used),
    ("snapshot", Rule::Used),
    ("monitor-interval", Rule::Used),
    ("checkpoint-interval", Rule::Used),
    ("busy-timeout", Rule::Used),
    ("min-checkpoint-page-count", Rule::Used),
    ("truncate-page-n", Rule::Used),
    ("max-checkpoint-page-count", Rule::Used),
    ("restore-if-db-not-exists", Rule::Used),
    ("replica", Rule::Used),
    ("replicas", Rule::Used),
    (
        "meta-path",
        Rule::Ignored("hearth keeps its own state next to the database"),
    ),
    (
        "max-sync-wal-bytes",
        Rule::Ignored("hearth bounds each sync's memory itself"),
    ),
];

const REPLICA_KEYS: &[(&str, Rule)] = &[
    ("type", Rule::Used),
    ("name", Rule::Used),
    ("path", Rule::Used),
    ("url", Rule::Used),
    ("retention", Rule::Used),
    ("retention-check-interval", Rule::Used),
    ("snapshot-interval", Rule::Used),
];

/// S3 and encryption settings before defaults are applied; Go's "empty string means unset" is `None`.
#[derive(Debug, Clone, Default)]
struct RawSettings {
    sync_interval: Option<Duration>,
    validation_interval: Option<Duration>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    region: Option<String>,
    bucket: Option<String>,
    endpoint: Option<String>,
    force_path_style: Option<bool>,
    skip_verify: bool,
    age_identities: Vec<String>,
    age_recipients: Vec<String>,
}

impl RawSettings {
    /// Litestream's `ReplicaSettings.SetDefaults`: fills what the replica left unset from the top level.
    fn set_defaults(&mut self, top: &RawSettings) {
        fn fill<T: Clone>(mine: &mut Option<T>, theirs: &Option<T>) {
            if mine.is_none() {
                mine.clone_from(theirs);
            }
        }
        fill(&mut self.sync_interval, &top.sync_interval);
        fill(&mut self.validation_interval, &top.validation_interval);
        fill(&mut self.access_key_id, &top.access_key_id);
        fill(&mut self.secret_access_key, &top.secret_access_key);
        fill(&mut self.region, &top.region);
        fill(&mut self.bucket, &top.bucket);
        fill(&mut self.endpoint, &top.endpoint);
        fill(&mut self.force_path_style, &top.force_path_style);
        self.skip_verify |= top.skip_verify;
        if self.age_identities.is_empty() {
            self.age_identities.clone_from(&top.age_identities);
        }
        if self.age_recipients.is_empty() {
            self.age_recipients.clone_from(&top.age_recipients);
        }
    }
}

#[derive(Debug, Clone, Default)]
struct RawReplica {
    typ: Option<String>,
    name: Option<String>,
    path: Option<String>,
    url: Option<String>,
    retention: Option<Duration>,
    retention_check_interval: Option<Duration>,
    snapshot_interval: Option<Duration>,
    settings: RawSettings,
}

struct Reader<'e> {
    warnings: Vec<String>,
    env: &'e dyn Fn(&str) -> Option<String>,
}

impl Reader<'_> {
    /// Warns about keys that are unknown or ignored. `rules` lists every key the mapping may hold.
    fn check_keys(&mut self, map: &Mapping, path: &str, rules: &[&[(&str, Rule)]]) {
        for key in map.keys() {
            let Value::String(key) = key else {
                self.warnings.push(format!(
                    "{}: a key that is not a string was ignored",
                    if path.is_empty() { "(top level)" } else { path }
                ));
                continue;
            };
            match rules.iter().flat_map(|r| r.iter()).find(|(k, _)| k == key) {
                Some((_, Rule::Used)) => {}
                Some((_, Rule::Ignored(why))) => {
                    self.warnings.push(format!(
                        "{}: accepted but ignored by hearth ({why})",
                        join(path, key)
                    ));
                }
                None => self.warnings.push(format!(
                    "{}: unknown key, ignored (Litestream ignores it too); check its spelling",
                    join(path, key)
                )),
            }
        }
    }

    fn config(&mut self, root: &Mapping) -> Result<Config, ConfigError> {
        self.check_keys(root, "", &[TOP_KEYS, REPLICA_SETTING_KEYS]);
        let mut config = Config::empty();
        config.addr = get_string(root, "addr", "")?;
        if let Some(addr) = &config.addr {
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if !port_ok {
                return Err(invalid(
                    "addr",
                    Some(addr.clone()),
                    "the metrics address needs a port",
                    "write it as :9090 or 127.0.0.1:9090",
                ));
            }
        }
        config.exec = get_string(root, "exec", "")?;
        if let Some(logging) = get_map(root, "logging", "")? {
            self.check_keys(
                logging,
                "logging",
                &[&[
                    ("level", Rule::Used),
                    ("type", Rule::Used),
                    ("stderr", Rule::Used),
                    (
                        "source",
                        Rule::Ignored("hearth's log lines do not carry source locations"),
                    ),
                ]],
            );
            config.log_level = get_string(logging, "level", "logging")?;
            match get_string(logging, "type", "logging")?.as_deref() {
                None | Some("text") => {}
                Some("json") => config.log_json = true,
                Some(other) => self.warnings.push(format!(
                    "logging.type: unknown log type {other:?}, using text (expected text or json)"
                )),
            }
            config.log_stderr = get_bool(logging, "stderr", "logging")?.unwrap_or(false);
        }
        if let Some(level) = (self.env)("LOG_LEVEL").filter(|v| !v.is_empty()) {
            config.log_level = Some(level);
        }

        let mut global_snapshot_interval = false;
        let mut global_snapshot_retention = false;
        if let Some(snapshot) = get_map(root, "snapshot", "")? {
            self.check_keys(
                snapshot,
                "snapshot",
                &[&[("interval", Rule::Used), ("retention", Rule::Used)]],
            );
            if let Some(d) = get_positive_duration(snapshot, "interval", "snapshot")? {
                config.snapshot_interval = d;
                global_snapshot_interval = true;
            }
            if let Some(d) = get_positive_duration(snapshot, "retention", "snapshot")? {
                config.snapshot_retention = d;
                global_snapshot_retention = true;
            }
        }
        if let Some(levels) = get_seq(root, "levels", "")? {
            config.levels.clear();
            for (i, level) in levels.iter().enumerate() {
                let path = format!("levels[{i}]");
                let Value::Mapping(level) = level else {
                    return Err(invalid(
                        &path,
                        None,
                        format!("expected a mapping, found {}", kind(level)),
                        "write each level as `- interval: 5m`",
                    ));
                };
                self.check_keys(level, &path, &[&[("interval", Rule::Used)]]);
                let interval =
                    get_positive_duration(level, "interval", &path)?.ok_or_else(|| {
                        invalid(
                            &join(&path, "interval"),
                            None,
                            "compaction interval must be greater than 0",
                            "write each level as `- interval: 5m`",
                        )
                    })?;
                config.levels.push(interval);
            }
        }
        if let Some(d) = get_duration(root, "l0-retention", "")? {
            config.l0_retention = d;
        }
        if let Some(retention) = get_map(root, "retention", "")? {
            self.check_keys(retention, "retention", &[&[("enabled", Rule::Used)]]);
            config.retention_enabled = get_bool(retention, "enabled", "retention")?.unwrap_or(true);
        }
        if let Some(d) = get_duration(root, "shutdown-sync-timeout", "")? {
            config.shutdown_sync_timeout = d;
        }
        if let Some(validation) = get_map(root, "validation", "")? {
            self.check_keys(validation, "validation", &[&[("interval", Rule::Used)]]);
            config.validation_interval =
                get_positive_duration(validation, "interval", "validation")?;
        }

        let top = self.settings(root, "")?;
        let mut db_snapshot_interval: Option<(Duration, String)> = None;
        let mut db_snapshot_retention: Option<(Duration, String)> = None;
        if let Some(dbs) = get_seq(root, "dbs", "")? {
            for (i, db) in dbs.iter().enumerate() {
                let path = format!("dbs[{i}]");
                let Value::Mapping(db) = db else {
                    return Err(invalid(
                        &path,
                        None,
                        format!("expected a mapping, found {}", kind(db)),
                        "write each database as `- path: /data/app.db` with a replica under it",
                    ));
                };
                let (db_config, snapshot) = self.db(db, &path, &top)?;
                // Litestream 0.5 applies per-database snapshot settings globally, and refuses conflicts.
                for (value, slot, what) in [
                    (snapshot.0, &mut db_snapshot_interval, "snapshot.interval"),
                    (snapshot.1, &mut db_snapshot_retention, "snapshot.retention"),
                ] {
                    let Some(value) = value else { continue };
                    if let Some((earlier, earlier_key)) = slot {
                        if *earlier != value {
                            return Err(invalid(
                                &join(&path, what),
                                Some(format_go_duration(value)),
                                format!(
                                    "conflicts with {earlier_key} ({})",
                                    format_go_duration(*earlier)
                                ),
                                format!(
                                    "set {what} once at the top level, or give every database the same value"
                                ),
                            ));
                        }
                    } else {
                        *slot = Some((value, join(&path, what)));
                    }
                }
                config.dbs.push(db_config);
            }
        }
        if !global_snapshot_interval && let Some((d, _)) = db_snapshot_interval {
            config.snapshot_interval = d;
        }
        if !global_snapshot_retention && let Some((d, _)) = db_snapshot_retention {
            config.snapshot_retention = d;
        }
        for (i, db) in config.dbs.iter().enumerate() {
            if let Some(j) = config.dbs[..i]
                .iter()
                .position(|other| other.path == db.path)
            {
                return Err(invalid(
                    &format!("dbs[{i}].path"),
                    Some(db.path.display().to_string()),
                    format!("the same database is already configured as dbs[{j}]"),
                    "list each database once, with all its replicas under `replicas:`",
                ));
            }
        }
        config.warnings = std::mem::take(&mut self.warnings);
        Ok(config)
    }

    /// Replica settings at `path` (the top level or one replica).
    fn settings(&mut self, map: &Mapping, path: &str) -> Result<RawSettings, ConfigError> {
        for key in [
            "sse-customer-algorithm",
            "sse-customer-key",
            "sse-customer-key-path",
            "sse-kms-key-id",
        ] {
            if get(map, key).is_some() {
                return Err(unsupported(
                    &join(path, key),
                    "S3 server-side encryption (SSE-C, SSE-KMS)",
                    "remove it, and use `age: {recipients: [...]}` for client-side encryption instead",
                ));
            }
        }
        let mut s = RawSettings {
            sync_interval: get_positive_duration(map, "sync-interval", path)?,
            validation_interval: get_positive_duration(map, "validation-interval", path)?,
            access_key_id: get_string(map, "access-key-id", path)?,
            secret_access_key: get_string(map, "secret-access-key", path)?,
            region: get_string(map, "region", path)?,
            bucket: get_string(map, "bucket", path)?,
            endpoint: get_string(map, "endpoint", path)?,
            force_path_style: get_bool(map, "force-path-style", path)?,
            skip_verify: get_bool(map, "skip-verify", path)?.unwrap_or(false),
            ..RawSettings::default()
        };
        if let Some(age) = get_map(map, "age", path)? {
            let age_path = join(path, "age");
            self.check_keys(
                age,
                &age_path,
                &[&[("identities", Rule::Used), ("recipients", Rule::Used)]],
            );
            s.age_identities = get_string_list(age, "identities", &age_path)?;
            s.age_recipients = get_string_list(age, "recipients", &age_path)?;
            if s.age_identities
                .iter()
                .chain(&s.age_recipients)
                .any(|k| k.trim().is_empty())
            {
                return Err(invalid(
                    &age_path,
                    None,
                    "an age key is empty",
                    "give each recipient (age1...) or identity (AGE-SECRET-KEY-1...) in full",
                ));
            }
        }
        Ok(s)
    }

    /// One database entry; also returns its `snapshot.interval` and `snapshot.retention`, if set.
    #[allow(clippy::type_complexity)]
    fn db(
        &mut self,
        map: &Mapping,
        path: &str,
        top: &RawSettings,
    ) -> Result<(DbConfig, (Option<Duration>, Option<Duration>)), ConfigError> {
        self.check_keys(map, path, &[DB_KEYS]);
        let db_path = get_string(map, "path", path)?;
        let dir = get_string(map, "dir", path)?;
        match (&db_path, &dir) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    path,
                    None,
                    "cannot specify both 'path' and 'dir'",
                    "keep `path:` for a single database",
                ));
            }
            (None, Some(_)) => {
                return Err(unsupported(
                    &join(path, "dir"),
                    "directory discovery (`dir:` with `pattern:`)",
                    "list each database with its own `path:` entry",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    path,
                    None,
                    "must specify 'path'",
                    "add `path: /path/to/app.db`",
                ));
            }
            (Some(_), None) => {}
        }
        for key in ["watch", "meta-dir"] {
            if get(map, key).is_some() {
                return Err(invalid(
                    &join(path, key),
                    None,
                    format!("'{key}' can only be used with 'dir'"),
                    format!("remove `{key}:`"),
                ));
            }
        }
        for key in ["pattern", "recursive"] {
            if get(map, key).is_some() {
                self.warnings.push(format!(
                    "{}: ignored because the database is given by `path:`",
                    join(path, key)
                ));
            }
        }
        let db_path = expand_path(db_path.as_deref().unwrap_or_default(), self.env);

        let mut snapshot = (None, None);
        if let Some(s) = get_map(map, "snapshot", path)? {
            let sp = join(path, "snapshot");
            self.check_keys(
                s,
                &sp,
                &[&[("interval", Rule::Used), ("retention", Rule::Used)]],
            );
            snapshot = (
                get_positive_duration(s, "interval", &sp)?,
                get_positive_duration(s, "retention", &sp)?,
            );
        }

        let one = get(map, "replica");
        let many = get_seq(map, "replicas", path)?;
        let raw: Vec<(String, &Value)> = match (one, many) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    path,
                    None,
                    "cannot specify 'replica' and 'replicas' on a database",
                    "use `replicas:` (a list) to give several replicas",
                ));
            }
            (Some(r), None) => vec![(join(path, "replica"), r)],
            (None, Some(rs)) => rs
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("{path}.replicas[{i}]"), r))
                .collect(),
            (None, None) => Vec::new(),
        };
        if raw.is_empty() {
            return Err(invalid(
                path,
                None,
                "must specify replica for database",
                "add `replica: {url: s3://bucket/path}` or `replica: {path: /var/lib/backup}`",
            ));
        }
        let mut replicas: Vec<ReplicaConfig> = Vec::with_capacity(raw.len());
        for (i, (rpath, value)) in raw.into_iter().enumerate() {
            let Value::Mapping(rmap) = value else {
                return Err(invalid(
                    &rpath,
                    None,
                    format!("expected a mapping, found {}", kind(value)),
                    "write the replica as `url: s3://bucket/path` on its own indented line",
                ));
            };
            self.check_keys(rmap, &rpath, &[REPLICA_KEYS, REPLICA_SETTING_KEYS]);
            let mut raw = RawReplica {
                typ: get_string(rmap, "type", &rpath)?,
                name: get_string(rmap, "name", &rpath)?,
                path: get_string(rmap, "path", &rpath)?,
                url: get_string(rmap, "url", &rpath)?,
                retention: get_positive_duration(rmap, "retention", &rpath)?,
                retention_check_interval: get_positive_duration(
                    rmap,
                    "retention-check-interval",
                    &rpath,
                )?,
                snapshot_interval: get_positive_duration(rmap, "snapshot-interval", &rpath)?,
                settings: self.settings(rmap, &rpath)?,
            };
            raw.settings.set_defaults(top);
            if raw.typ.is_none() && raw.url.is_none() && raw.settings.bucket.is_some() {
                self.warnings.push(format!(
                    "{rpath}: has a bucket but no `type: s3` or `url:`, so it is a file replica (as in Litestream); add `type: s3` if you meant S3"
                ));
            }
            let mut replica = build_replica(&raw, &rpath, self.env)?;
            if replicas.iter().any(|r| r.name == replica.name) {
                if raw.name.is_some() {
                    return Err(invalid(
                        &join(&rpath, "name"),
                        Some(replica.name.clone()),
                        "another replica of this database has the same name",
                        "give each replica a different `name:`",
                    ));
                }
                replica.name = format!("{}-{i}", replica.name);
            }
            replicas.push(replica);
        }

        let mut db = DbConfig::new(db_path, replicas);
        if let Some(d) = get_positive_duration(map, "monitor-interval", path)? {
            db.monitor_interval = d;
        }
        if let Some(d) = get_positive_duration(map, "checkpoint-interval", path)? {
            db.checkpoint_interval = d;
        }
        if let Some(d) = get_duration(map, "busy-timeout", path)? {
            db.busy_timeout = d;
        }
        if let Some(n) = get_u32(map, "min-checkpoint-page-count", path)? {
            db.min_checkpoint_page_count = n;
        }
        match (
            get_u32(map, "truncate-page-n", path)?,
            get_u32(map, "max-checkpoint-page-count", path)?,
        ) {
            (Some(n), old) => {
                db.truncate_page_n = n;
                if old.is_some() {
                    self.warnings.push(format!(
                        "{}: ignored because truncate-page-n is set",
                        join(path, "max-checkpoint-page-count")
                    ));
                }
            }
            (None, Some(n)) => {
                db.truncate_page_n = n;
                self.warnings.push(format!(
                    "{}: Litestream 0.3's forced-checkpoint threshold, read as truncate-page-n (hearth never runs RESTART checkpoints)",
                    join(path, "max-checkpoint-page-count")
                ));
            }
            (None, None) => {}
        }
        db.restore_if_db_not_exists =
            get_bool(map, "restore-if-db-not-exists", path)?.unwrap_or(false);
        Ok((db, snapshot))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Building replicas.

fn build_replica(
    raw: &RawReplica,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ReplicaConfig, ConfigError> {
    if let Some(p) = &raw.path
        && url::is_url(p)
    {
        return Err(invalid(
            &join(key, "path"),
            Some(url::redact_url(p)),
            "replica path cannot be a url",
            "use the `url:` key for URLs",
        ));
    }
    let url_key = if key == "replica URL" {
        key.to_string()
    } else {
        join(key, "url")
    };
    let typ = raw
        .url
        .as_deref()
        .and_then(url::replica_type_from_url)
        .or_else(|| raw.typ.clone())
        .unwrap_or_else(|| "file".to_string());
    let location = match typ.as_str() {
        "file" => file_location(raw, key, &url_key, env)?,
        "s3" => Location::S3(s3_location(raw, key, &url_key, env)?),
        "gs" | "gcs" | "abs" | "sftp" | "webdav" | "nats" | "oss" => {
            let k = if raw.url.is_some() {
                url_key
            } else {
                join(key, "type")
            };
            return Err(unsupported(
                &k,
                format!("the {typ:?} replica type"),
                "use an s3:// replica (any S3-compatible store) or a file replica",
            ));
        }
        other => {
            let (k, v) = match &raw.url {
                Some(u) => (url_key, url::redact_url(u)),
                None => (join(key, "type"), other.to_string()),
            };
            return Err(invalid(
                &k,
                Some(v),
                format!("unknown replica type {other:?}"),
                "use type file or s3 (or an s3:// or file:// URL)",
            ));
        }
    };
    Ok(ReplicaConfig {
        name: raw.name.clone().unwrap_or_else(|| typ.clone()),
        location,
        sync_interval: raw.settings.sync_interval.unwrap_or(DEFAULT_SYNC_INTERVAL),
        retention: raw.retention,
        retention_check_interval: raw.retention_check_interval,
        snapshot_interval: raw.snapshot_interval,
        validation_interval: raw.settings.validation_interval,
        age_recipients: raw.settings.age_recipients.clone(),
        age_identities: raw.settings.age_identities.clone(),
    })
}

fn file_location(
    raw: &RawReplica,
    key: &str,
    url_key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Location, ConfigError> {
    let path = match (&raw.url, &raw.path) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key,
                None,
                "cannot specify url & path for file replica",
                "keep only one of `url:` and `path:`",
            ));
        }
        (Some(u), None) => {
            let parsed = url::parse_replica_url(u).map_err(|e| {
                invalid(
                    url_key,
                    Some(url::redact_url(u)),
                    format!("invalid replica URL: {e}"),
                    "write it as file:///absolute/path",
                )
            })?;
            parsed.path
        }
        (None, Some(p)) => p.clone(),
        (None, None) => {
            return Err(invalid(
                key,
                None,
                "file replica path required",
                "add `path: /var/lib/backup/app` or `url: s3://bucket/path`",
            ));
        }
    };
    Ok(Location::File {
        root: expand_path(&path, env),
    })
}

fn s3_location(
    raw: &RawReplica,
    key: &str,
    url_key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<S3Location, ConfigError> {
    let s = &raw.settings;
    if raw.url.is_some() && raw.path.is_some() {
        return Err(invalid(
            key,
            None,
            "cannot specify url & path for s3 replica",
            "put the prefix in the URL (s3://bucket/prefix) and remove `path:`",
        ));
    }
    if raw.url.is_some() && s.bucket.is_some() {
        return Err(invalid(
            key,
            None,
            "cannot specify url & bucket for s3 replica (a top-level `bucket:` counts too)",
            "put the bucket in the URL and remove `bucket:`",
        ));
    }
    let mut bucket = s.bucket.clone();
    let mut prefix = raw.path.clone().unwrap_or_default();
    let mut region = s.region.clone();
    let mut endpoint = s.endpoint.clone();
    let mut skip_verify = s.skip_verify;
    // Litestream: path style when an endpoint is configured (only AWS itself uses virtual hosts).
    let mut force_path_style = s.force_path_style.unwrap_or(endpoint.is_some());

    if let Some(u) = &raw.url {
        let shown_url = Some(url::redact_url(u));
        if u.to_ascii_lowercase().starts_with("s3://arn:") {
            return Err(unsupported(
                url_key,
                "S3 access point ARNs",
                "use the bucket name: s3://bucket/prefix",
            ));
        }
        let parsed = url::parse_replica_url(u).map_err(|e| {
            invalid(
                url_key,
                shown_url.clone(),
                format!("invalid replica URL: {e}"),
                "write it as s3://bucket/prefix",
            )
        })?;
        let host = url::parse_s3_host(&parsed.host);
        let mut u_endpoint = host.endpoint;
        let mut u_force_path_style = host.force_path_style;
        let mut u_region = host.region;
        if let Some(e) = parsed.query("endpoint") {
            u_endpoint = Some(url::ensure_endpoint_scheme(e));
            if parsed.query("forcePathStyle") != Some("false") {
                u_force_path_style = true;
            }
        }
        if let Some(r) = parsed.query("region") {
            u_region = Some(r.to_string());
        }
        if let Some(v) = parsed.query("forcePathStyle") {
            u_force_path_style = v == "true";
        }
        if let Some(v) = parsed.query("skipVerify") {
            skip_verify = v == "true";
        }
        for k in ["partSize", "part-size", "concurrency"] {
            if let Some(v) = parsed.query(k)
                && !v.parse::<i64>().is_ok_and(|n| n > 0)
            {
                return Err(invalid(
                    url_key,
                    None,
                    format!("query parameter {k:?} must be a positive integer, got {v:?}"),
                    format!("fix or remove ?{k}="),
                ));
            }
        }
        if prefix.is_empty() {
            prefix = parsed.path;
        }
        if bucket.is_none() && !host.bucket.is_empty() {
            bucket = Some(host.bucket);
        }
        region = region.or(u_region);
        endpoint = endpoint.or(u_endpoint);
        if !force_path_style {
            force_path_style = u_force_path_style;
        }
    }
    let Some(bucket) = bucket else {
        let k = if raw.url.is_some() {
            url_key.to_string()
        } else {
            join(key, "bucket")
        };
        return Err(invalid(
            &k,
            raw.url.as_deref().map(url::redact_url),
            "bucket required for s3 replica",
            "name the bucket: s3://bucket/prefix or `bucket: name`",
        ));
    };
    let endpoint = endpoint.map(|e| url::ensure_endpoint_scheme(&e));
    // Litestream turns on path style for MinIO-like `host:port` endpoints, Backblaze, Filebase and Supabase
    // unless `force-path-style` was set explicitly.
    if s.force_path_style.is_none()
        && endpoint
            .as_deref()
            .is_some_and(url::provider_wants_path_style)
    {
        force_path_style = true;
    }
    let (access_key_id, secret_access_key) = credentials(s, env);
    let cleaned = url::clean_slash_path(&prefix);
    let prefix = cleaned.trim_matches('/');
    let prefix = if prefix == "." { "" } else { prefix };
    Ok(S3Location {
        bucket,
        prefix: prefix.to_string(),
        endpoint,
        region,
        force_path_style,
        access_key_id,
        secret_access_key,
        skip_verify,
        // Fields hearth-store adds later keep their defaults.
        ..S3Location::default()
    })
}

/// S3 credentials: the replica's own, else the top level's (already merged into `s`), else the environment.
/// The environment order is Litestream's: `AWS_*` wins, `LITESTREAM_*` is used when the `AWS_*` one is unset
/// (Litestream copies `LITESTREAM_ACCESS_KEY_ID` into `AWS_ACCESS_KEY_ID` only if the latter is unset).
fn credentials(
    s: &RawSettings,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Option<String>, Option<String>) {
    let from_env = |aws: &str, litestream: &str| {
        env(aws)
            .filter(|v| !v.is_empty())
            .or_else(|| env(litestream).filter(|v| !v.is_empty()))
    };
    let id = s
        .access_key_id
        .clone()
        .or_else(|| from_env("AWS_ACCESS_KEY_ID", "LITESTREAM_ACCESS_KEY_ID"));
    let secret = s
        .secret_access_key
        .clone()
        .or_else(|| from_env("AWS_SECRET_ACCESS_KEY", "LITESTREAM_SECRET_ACCESS_KEY"));
    (id, secret)
}

// ---------------------------------------------------------------------------------------------------------
// Paths.

/// Litestream's `expand`: strips a `sqlite://`/`sqlite3://` prefix, expands `~` from `$HOME`, makes the path
/// absolute against the current directory, and cleans it lexically (as Go's `filepath.Abs`).
pub fn expand_path(s: &str, env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let s = s
        .strip_prefix("sqlite3://")
        .or_else(|| s.strip_prefix("sqlite://"))
        .unwrap_or(s);
    let home = || env("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
    let joined = if s == "~" {
        home().unwrap_or_else(|| PathBuf::from("~"))
    } else if let (Some(rest), Some(home)) = (s.strip_prefix("~/"), home()) {
        home.join(rest)
    } else {
        let p = PathBuf::from(s);
        if p.is_absolute() {
            p
        } else {
            std::env::current_dir()
                .unwrap_or_else(|_| PathBuf::from("/"))
                .join(p)
        }
    };
    clean_path(&joined)
}

/// Lexical cleaning of an absolute path: drops `.`, resolves `..`, never touches the file system.
fn clean_path(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                // `..` removes the previous name; at the root it stays at the root, as in Go.
                if matches!(out.components().next_back(), Some(Component::Normal(_))) {
                    out.pop();
                } else if !out.has_root() {
                    out.push("..");
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_and_expands_paths() {
        let env = |k: &str| (k == "HOME").then(|| "/home/u".to_string());
        let cwd = std::env::current_dir().unwrap();
        let cases: Vec<(&str, PathBuf)> = vec![
            ("/data/app.db", PathBuf::from("/data/app.db")),
            ("/data/./x/../app.db", PathBuf::from("/data/app.db")),
            ("/../app.db", PathBuf::from("/app.db")),
            ("//data//app.db", PathBuf::from("/data/app.db")),
            ("~/app.db", PathBuf::from("/home/u/app.db")),
            ("~", PathBuf::from("/home/u")),
            ("sqlite3:///data/app.db", PathBuf::from("/data/app.db")),
            ("sqlite:///data/app.db", PathBuf::from("/data/app.db")),
            ("app.db", cwd.join("app.db")),
        ];
        for (input, want) in cases {
            assert_eq!(expand_path(input, &env), want, "{input}");
        }
    }
}
