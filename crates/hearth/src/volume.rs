//! `hearth volume`: keygen, serve (standby), push (primary, once or repeated), status and verify.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use hearth_volume::metrics::Metrics;
use hearth_volume::net::identity::{Identity, PeerId};
use hearth_volume::primary::{Backend, PushConfig, PushReport, Target, push_once, verify};
use hearth_volume::schedule::{ChangeWatcher, LoopState, Next, Schedule, next};
use hearth_volume::source_watch::SourceWatch;
use hearth_volume::standby::{ServeConfig, serve};
use hearth_volume::state::{self, PrimaryState, StandbyState, VolumeDirs, now_ms};
use hearth_volume::{CaptureOptions, UnstablePolicy};
use serde::Serialize;

use crate::sqlite::{Failure, exit};

/// Where keys live unless `--identity` says otherwise.
const DEFAULT_IDENTITY: &str = "/var/lib/hearth/identity";
/// Where state lives unless `--state` says otherwise.
const DEFAULT_STATE: &str = "/var/lib/hearth/volume";

#[derive(Args)]
pub struct VolumeArgs {
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Args, Clone)]
struct Common {
    /// Directory holding this node's key (made by `hearth volume keygen`).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_IDENTITY, env = "HEARTH_IDENTITY")]
    identity: PathBuf,
    /// Directory for hearth's state: snapshots, progress, chunk stores.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE, env = "HEARTH_VOLUME_STATE")]
    state: PathBuf,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Make this node's key pair and print its id (give the id to the peers).
    Keygen {
        /// Directory for the key.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_IDENTITY, env = "HEARTH_IDENTITY")]
        identity: PathBuf,
        /// Print the id of the existing key instead of making one.
        #[arg(long)]
        print: bool,
    },
    /// Standby: listen for primaries and receive the configured volumes.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7431")]
        listen: String,
        /// A primary allowed to push (its id from `hearth volume keygen`). Repeatable.
        #[arg(long = "allow", value_name = "ID", required = true)]
        allow: Vec<String>,
        /// A volume this standby receives: NAME=PATH. Repeatable. Primaries name volumes, never paths.
        #[arg(long = "volume", value_name = "NAME=PATH", required = true)]
        volumes: Vec<String>,
        /// Replaced trees kept per volume. After a change applied in place, the replaced tree
        /// holds only the entries that change replaced or removed.
        #[arg(long, default_value_t = 2)]
        keep: usize,
        /// files backend: always build the whole new tree beside the live one and swap, so every
        /// replaced tree is a whole copy, instead of applying small changes in place. Costs work
        /// in proportion to the volume's size on every sync.
        #[arg(long)]
        no_in_place: bool,
        /// btrfs backend: do not keep a copy of streams as they arrive. A cut stream then starts
        /// over instead of resuming, but each byte is written once instead of twice. (A first copy
        /// by the files backend resumes either way.)
        #[arg(long)]
        no_resume_copy: bool,
        /// Serve Prometheus metrics on this address.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
    },
    /// Primary: sync a volume to its standbys, once or repeatedly.
    Push(PushArgs),
    /// Show each volume's replication state on this node.
    Status {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE, env = "HEARTH_VOLUME_STATE")]
        state: PathBuf,
        /// Only this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare a standby's copy (read afresh on the standby) with the snapshot last pushed to it.
    Verify {
        #[command(flatten)]
        common: Common,
        /// The volume: NAME=PATH as given to `push`.
        #[arg(long, value_name = "NAME=PATH")]
        volume: String,
        /// The standby: ADDR=ID. Repeatable.
        #[arg(long = "to", value_name = "ADDR=ID", required = true)]
        to: Vec<String>,
        /// The epoch to present (default: the one of the last push recorded in --state).
        #[arg(long)]
        epoch: Option<u64>,
    },
}

#[derive(Args)]
struct PushArgs {
    #[command(flatten)]
    common: Common,
    /// The volume: NAME=PATH (NAME as the standbys know it).
    #[arg(long, value_name = "NAME=PATH")]
    volume: String,
    /// A standby: ADDR=ID (host:port and its id). Repeatable.
    #[arg(long = "to", value_name = "ADDR=ID", required = true)]
    to: Vec<String>,
    /// This primary's epoch; standbys refuse epochs lower than one they have seen.
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// Backend: `auto` (btrfs when the volume is a btrfs subvolume), `files` or `btrfs`.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendArg,
    /// Repeat: push at least this often (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    every: Option<Duration>,
    /// Watch the volume and push after changes, once it has been quiet for `--quiet`.
    #[arg(long)]
    continuous: bool,
    /// Quiet period for `--continuous`.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    quiet: Duration,
    /// With `--every` or `--continuous`, files backend: walk the whole volume at least this often.
    /// Between walks, a watch on its folders tells each pass what changed, and only that is
    /// looked at (docs/volume.md, "Watching instead of walking"). `0` walks on every pass.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    walk_every: Duration,
    /// Snapshots kept in the history (each standby's last common one is kept besides).
    #[arg(long, default_value_t = 10)]
    keep: usize,
    /// Copy files that never stop changing (busy logs) as last read instead of failing the push.
    #[arg(long)]
    include_unstable: bool,
    /// btrfs backend: make the first copy for an empty standby with a full `btrfs send` stream,
    /// as `btrfs receive` would, instead of by the files backend (which resumes a cut transfer
    /// where it stopped and writes each byte once on the standby).
    #[arg(long)]
    btrfs_full_stream: bool,
    /// Seconds allowed to connect and for each answer.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Serve Prometheus metrics on this address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Auto,
    Files,
    Btrfs,
}

pub fn main(args: VolumeArgs) -> ExitCode {
    crate::init_logging(None);
    let result = crate::block_on("error", async {
        match args.command {
            VolumeCommand::Keygen { identity, print } => keygen(&identity, print),
            VolumeCommand::Serve {
                common,
                listen,
                allow,
                volumes,
                keep,
                no_resume_copy,
                no_in_place,
                metrics,
            } => {
                let opts = ServeOpts {
                    keep,
                    resume_copies: !no_resume_copy,
                    in_place: !no_in_place,
                };
                serve_cmd(common, &listen, &allow, &volumes, opts, metrics.as_deref()).await
            }
            VolumeCommand::Push(p) => push_cmd(p).await,
            VolumeCommand::Status {
                state,
                volume,
                json,
            } => status_cmd(&state, volume.as_deref(), json),
            VolumeCommand::Verify {
                common,
                volume,
                to,
                epoch,
            } => verify_cmd(common, &volume, &to, epoch).await,
        }
    });
    result.map_or(ExitCode::FAILURE, exit)
}

fn usage(e: anyhow::Error) -> Failure {
    Failure::Usage(e)
}

fn keygen(dir: &Path, print: bool) -> Result<ExitCode, Failure> {
    let id = if print {
        Identity::load(dir)
            .with_context(|| {
                format!(
                    "read the key in {} (make one with `hearth volume keygen`)",
                    dir.display()
                )
            })?
            .id()
    } else {
        let identity = Identity::create(dir).context("make a key")?;
        eprintln!("wrote {}/volume.key and volume.crt", dir.display());
        identity.id()
    };
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}

fn load_identity(dir: &Path) -> Result<Identity, Failure> {
    Identity::load(dir)
        .with_context(|| {
            format!(
                "read this node's key from {} (make one with `hearth volume keygen --identity {}`)",
                dir.display(),
                dir.display()
            )
        })
        .map_err(usage)
}

fn parse_volume(spec: &str) -> Result<(String, PathBuf), Failure> {
    let (name, path) = spec.split_once('=').ok_or_else(|| {
        usage(anyhow!(
            "`--volume {spec}`: expected NAME=PATH, e.g. gitea=/data/services/gitea"
        ))
    })?;
    if !state::valid_volume_name(name) {
        return Err(usage(anyhow!(
            "`{name}` is not a usable volume name: letters, digits, `-`, `_`, `.`, at most 64, not starting with `.`"
        )));
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(usage(anyhow!(
            "`--volume {spec}`: the path must be absolute"
        )));
    }
    Ok((name.to_owned(), path))
}

fn parse_targets(specs: &[String]) -> Result<Vec<Target>, Failure> {
    specs
        .iter()
        .map(|spec| {
            let (addr, id) = spec.rsplit_once('=').ok_or_else(|| {
                usage(anyhow!(
                    "`--to {spec}`: expected ADDR=ID, e.g. standby1:7431=hv1-…"
                ))
            })?;
            let id: PeerId = id
                .parse()
                .map_err(|e| usage(anyhow!("`--to {spec}`: {e}")))?;
            if !addr.contains(':') {
                return Err(usage(anyhow!(
                    "`--to {spec}`: the address needs a port, e.g. standby1:7431"
                )));
            }
            Ok(Target {
                addr: addr.to_owned(),
                id,
            })
        })
        .collect()
}

async fn start_metrics(
    addr: Option<&str>,
) -> Result<(Metrics, Option<crate::metrics::MetricsServer>), Failure> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let server = match addr {
        Some(a) => Some(crate::metrics::serve(a, registry).await.map_err(usage)?),
        None => None,
    };
    Ok((metrics, server))
}

/// `serve`'s settings that go straight into [`ServeConfig`].
struct ServeOpts {
    keep: usize,
    resume_copies: bool,
    in_place: bool,
}

async fn serve_cmd(
    common: Common,
    listen: &str,
    allow: &[String],
    volumes: &[String],
    opts: ServeOpts,
    metrics_addr: Option<&str>,
) -> Result<ExitCode, Failure> {
    let identity = load_identity(&common.identity)?;
    let allowed = allow
        .iter()
        .map(|a| {
            a.parse::<PeerId>()
                .map_err(|e| usage(anyhow!("`--allow {a}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut vols = BTreeMap::new();
    for spec in volumes {
        let (name, path) = parse_volume(spec)?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            return Err(usage(anyhow!(
                "volume `{name}`: {} does not exist; create the parent directory of {}",
                parent.display(),
                path.display()
            )));
        }
        if vols.insert(name.clone(), path).is_some() {
            return Err(usage(anyhow!("volume `{name}` is given twice")));
        }
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))
        .map_err(usage)?;
    let (metrics, _metrics_server) = start_metrics(metrics_addr).await?;
    eprintln!(
        "hearth volume serve: listening on {listen} as {} for {}",
        identity.id(),
        vols.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    let config = ServeConfig {
        identity,
        allowed,
        volumes: vols,
        state_dir: common.state,
        keep: opts.keep,
        resume_copies: opts.resume_copies,
        in_place: opts.in_place,
        timeout: Duration::from_secs(60),
        hold_chunks_max: hearth_volume::standby::DEFAULT_HOLD_CHUNKS_MAX,
    };
    // Shutdown order: a signal stops accepting; running exchanges get 5 s (an apply in progress
    // is atomic, so cutting it off costs only the work done); then the process exits.
    serve(
        listener,
        config,
        metrics,
        shutdown_signal(),
        Duration::from_secs(5),
    )
    .await
    .context("serve")?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without handlers the default action (exit) applies; never resolve.
            std::future::pending::<()>().await;
        }
    }
}

fn push_config(p: &PushArgs) -> Result<PushConfig, Failure> {
    let (volume, source) = parse_volume(&p.volume)?;
    if !source.is_dir() {
        return Err(usage(anyhow!(
            "volume `{volume}`: {} is not a directory",
            source.display()
        )));
    }
    let identity = load_identity(&p.common.identity)?;
    let targets = parse_targets(&p.to)?;
    let sender = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    Ok(PushConfig {
        backend: match p.backend {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Files => Backend::Files,
            BackendArg::Btrfs => Backend::Btrfs,
        },
        identity,
        volume,
        source,
        state_dir: p.common.state.clone(),
        epoch: p.epoch,
        keep: p.keep,
        targets,
        timeout: Duration::from_secs(p.timeout.max(1)),
        capture: CaptureOptions {
            unstable: if p.include_unstable {
                UnstablePolicy::Include
            } else {
                UnstablePolicy::Fail
            },
            ..CaptureOptions::default()
        },
        sender,
        btrfs_first_by_files: !p.btrfs_full_stream,
        btrfs_first: None,
        watch: None,
    })
}

/// Prints one line per standby and says whether all succeeded.
fn print_report(r: &PushReport) -> bool {
    for (addr, res) in &r.results {
        match res {
            Ok(o) => println!(
                "{addr}: {} {} ({} chunks, {} bytes sent{}, {:.2} s){}",
                o.kind.as_str(),
                &r.snapshot.tree_hash[..16],
                o.chunks_sent,
                o.bytes_sent,
                match (o.manifest_bytes, o.delta) {
                    (0, _) => String::new(),
                    (n, true) => format!(", manifest delta {n} bytes"),
                    (n, false) => format!(", manifest {n} bytes"),
                },
                o.duration.as_secs_f64(),
                o.applied
                    .as_ref()
                    .filter(|a| !a.kept_aside.is_empty())
                    .map(|a| format!(
                        "; the standby kept its old tree aside at {}",
                        a.kept_aside.join(", ")
                    ))
                    .unwrap_or_default()
            ),
            Err(e) => eprintln!("{addr}: failed: {e}"),
        }
    }
    r.all_ok()
}

async fn push_cmd(p: PushArgs) -> Result<ExitCode, Failure> {
    let mut cfg = push_config(&p)?;
    let (metrics, _metrics_server) = start_metrics(p.metrics.as_deref()).await?;
    let schedule = Schedule {
        every: if p.continuous {
            Some(p.every.unwrap_or(Duration::from_secs(300)))
        } else {
            p.every
        },
        quiet: p.continuous.then_some(p.quiet),
        retry: Duration::from_secs(10),
    };
    if schedule.every.is_none() {
        let report = push_once(&cfg, &metrics).await.context("push")?;
        return Ok(if print_report(&report) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if !p.walk_every.is_zero() {
        cfg.watch = Some(Arc::new(Mutex::new(SourceWatch::new(
            &cfg.source,
            p.walk_every,
        ))));
    }
    // `kill -USR1` starts a pass at once (zrepl's `signal wakeup`): before maintenance, or to
    // measure one pass of a long-running push.
    let mut wakeup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("listen for SIGUSR1")?;
    // `--continuous` hears of changes from the source watch, polled, once it watches; else
    // (before the first pass, a filesystem it does not watch, `--walk-every 0`, the btrfs
    // backend) from a recursive watcher of its own, started now so that a change made during
    // the first pass is heard of. Not both for long: each costs one inotify watch per folder.
    let mut watcher = if p.continuous {
        Some(
            ChangeWatcher::new(&cfg.source)
                .with_context(|| format!("watch {}", cfg.source.display()))?,
        )
    } else {
        None
    };
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut st = LoopState {
        last_push: Instant::now(),
        last_failed: false,
        last_change: None,
    };
    // The first push happens at once.
    let mut due_now = true;
    loop {
        if due_now {
            st.last_change = None;
            // A signal during a push cancels it: the standby keeps the chunks it got and its
            // live tree stays whole, so the next run continues from there.
            let result = tokio::select! {
                r = push_once(&cfg, &metrics) => r,
                () = &mut shutdown => return Ok(ExitCode::SUCCESS),
            };
            st.last_push = Instant::now();
            st.last_failed = match result {
                Ok(report) => !print_report(&report),
                Err(e) => {
                    tracing::error!(volume = %cfg.volume, error = %e, "push failed");
                    true
                }
            };
        }
        due_now = false;
        match next(&schedule, &st, Instant::now()) {
            Next::Push => due_now = true,
            Next::Stop => return Ok(ExitCode::SUCCESS),
            Next::WaitUntil(t) => {
                let polling = p.continuous
                    && cfg
                        .watch
                        .as_ref()
                        .is_some_and(|w| w.lock().is_ok_and(|w| w.watching()));
                if polling {
                    // Whatever it heard during the first pass, the source watch heard too.
                    watcher = None;
                } else if p.continuous && watcher.is_none() {
                    // The source watch stopped (a later walk could not start it again).
                    watcher = Some(
                        ChangeWatcher::new(&cfg.source)
                            .with_context(|| format!("watch {}", cfg.source.display()))?,
                    );
                }
                let sleep = tokio::time::sleep_until(t.into());
                tokio::select! {
                    _ = poll.tick(), if polling => {
                        let changed = cfg
                            .watch
                            .as_ref()
                            .is_some_and(|w| w.lock().is_ok_and(|mut w| w.poll_changed()));
                        if changed {
                            st.last_change = Some(Instant::now());
                        }
                    }
                    () = sleep => {}
                    () = &mut shutdown => return Ok(ExitCode::SUCCESS),
                    _ = wakeup.recv() => {
                        tracing::info!(volume = %cfg.volume, "woken up by SIGUSR1: pushing now");
                        due_now = true;
                    }
                    () = async {
                        match watcher.as_mut() {
                            Some(w) => w.changed().await,
                            None => std::future::pending().await,
                        }
                    } => st.last_change = Some(Instant::now()),
                }
            }
        }
    }
}

async fn verify_cmd(
    common: Common,
    volume: &str,
    to: &[String],
    epoch: Option<u64>,
) -> Result<ExitCode, Failure> {
    let (name, source) = parse_volume(volume)?;
    // Verify reads only; it presents the epoch the pushes used, so it is neither refused as an
    // older primary nor raises the standby's epoch.
    let epoch = match epoch {
        Some(e) => e,
        None => state::load::<PrimaryState>(&VolumeDirs::new(&common.state, &name).primary())
            .context("read primary state")?
            .epoch
            .max(1),
    };
    let cfg = PushConfig {
        backend: Backend::Files,
        identity: load_identity(&common.identity)?,
        volume: name,
        source,
        state_dir: common.state,
        epoch,
        keep: 10,
        targets: parse_targets(to)?,
        timeout: Duration::from_secs(60),
        capture: CaptureOptions::default(),
        sender: "verify".into(),
        btrfs_first_by_files: true,
        btrfs_first: None,
        watch: None,
    };
    let mut all_equal = true;
    for t in &cfg.targets {
        let r = verify(&cfg, t)
            .await
            .with_context(|| format!("verify {} on {}", cfg.volume, t.addr))?;
        if r.equal() {
            println!(
                "{}: equal to snapshot {} (captured {})",
                t.addr,
                &r.expected.tree_hash[..16],
                fmt_time(r.expected.captured_at_ms)
            );
        } else {
            all_equal = false;
            println!(
                "{}: DIFFERS from snapshot {}: the standby's tree hashes to {}",
                t.addr,
                &r.expected.tree_hash[..16],
                r.actual
                    .map(|h| h.to_string()[..16].to_owned())
                    .unwrap_or_else(|| "nothing".into())
            );
            for d in &r.differences {
                println!("  {d}");
            }
        }
    }
    Ok(if all_equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One volume's status on this node, as printed by `status --json`.
#[derive(Serialize)]
struct VolumeStatus {
    volume: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    primary: Option<PrimaryStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    standby: Option<StandbyStatus>,
}

#[derive(Serialize)]
struct PrimaryStatus {
    snapshots: usize,
    newest_snapshot: Option<state::Snapshot>,
    /// files backend: bytes of kept manifests (it pins descriptions, not data); btrfs: bytes only
    /// the pinned snapshots hold.
    pinned_bytes: u64,
    standbys: Vec<StandbyView>,
}

#[derive(Serialize)]
struct StandbyView {
    addr: String,
    #[serde(flatten)]
    record: state::StandbyRecord,
    /// Now minus the capture time of the standby's newest tree.
    lag_seconds: Option<f64>,
}

#[derive(Serialize)]
struct StandbyStatus {
    #[serde(flatten)]
    state: StandbyState,
    lag_seconds: Option<f64>,
}

fn status_cmd(state_dir: &Path, only: Option<&str>, json: bool) -> Result<ExitCode, Failure> {
    let listing = match std::fs::read_dir(state_dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(usage(anyhow!(
                "no volume state in {} (nothing pushed or served with this --state yet)",
                state_dir.display()
            )));
        }
        Err(e) => {
            return Err(Failure::Runtime(
                anyhow!(e).context(format!("list {}", state_dir.display())),
            ));
        }
    };
    let mut names: Vec<String> = listing
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| only.is_none_or(|o| o == n))
        .collect();
    names.sort();
    if let Some(o) = only
        && names.is_empty()
    {
        return Err(usage(anyhow!(
            "no state for volume `{o}` in {}",
            state_dir.display()
        )));
    }
    let now = now_ms();
    let lag = |captured: u64| (captured > 0).then(|| now.saturating_sub(captured) as f64 / 1000.0);
    let mut out = Vec::new();
    for name in names {
        let dirs = VolumeDirs::new(state_dir, &name);
        let primary = if dirs.primary().exists() {
            let st: PrimaryState = state::load(&dirs.primary()).context("read primary state")?;
            // btrfs: the data only the pinned snapshots hold (`btrfs filesystem du`, measured now:
            // it reads every file's extent map, so only here, not on every push); files: the
            // kept manifests.
            let snapshot_paths: Vec<PathBuf> = st
                .standbys
                .values()
                .filter_map(|r| {
                    r.last_common
                        .as_ref()?
                        .snapshot_path
                        .as_ref()
                        .map(PathBuf::from)
                })
                .filter(|p| p.exists())
                .collect();
            let pinned_bytes = if snapshot_paths.is_empty() {
                std::fs::read_dir(dirs.trees())
                    .map(|it| {
                        it.filter_map(|e| e.ok()?.metadata().ok())
                            .map(|m| m.len())
                            .sum()
                    })
                    .unwrap_or(0)
            } else {
                hearth_volume::btrfs::exclusive_bytes(&snapshot_paths)
                    .map(|v| v.iter().map(|u| u.exclusive).sum())
                    .unwrap_or(0)
            };
            Some(PrimaryStatus {
                snapshots: st.history.len(),
                newest_snapshot: st.history.last().cloned(),
                pinned_bytes,
                standbys: st
                    .standbys
                    .iter()
                    .map(|(addr, r)| StandbyView {
                        addr: addr.clone(),
                        lag_seconds: r.last_common.as_ref().and_then(|s| lag(s.captured_at_ms)),
                        record: r.clone(),
                    })
                    .collect(),
            })
        } else {
            None
        };
        let standby = if dirs.standby().exists() {
            let st: StandbyState = state::load(&dirs.standby()).context("read standby state")?;
            Some(StandbyStatus {
                lag_seconds: st.live.as_ref().and_then(|l| lag(l.captured_at_ms)),
                state: st,
            })
        } else {
            None
        };
        out.push(VolumeStatus {
            volume: name,
            primary,
            standby,
        });
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).context("encode status")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    for v in &out {
        println!("volume {}", v.volume);
        if let Some(p) = &v.primary {
            println!(
                "  primary: {} snapshot(s), newest {}, pinned/kept {} bytes",
                p.snapshots,
                p.newest_snapshot
                    .as_ref()
                    .map(|s| format!("{} ({})", &s.tree_hash[..16], fmt_time(s.captured_at_ms)))
                    .unwrap_or_else(|| "none".into()),
                p.pinned_bytes
            );
            for s in &p.standbys {
                let r = &s.record;
                println!(
                    "  standby {}: last common {}, lag {}, last success {}, sent {} bytes, full {} incremental {} unchanged {}{}",
                    s.addr,
                    r.last_common
                        .as_ref()
                        .map(|c| c.tree_hash[..16].to_owned())
                        .unwrap_or_else(|| "none".into()),
                    s.lag_seconds
                        .map(|l| format!("{l:.1} s"))
                        .unwrap_or_else(|| "-".into()),
                    r.last_success_ms
                        .map(fmt_time)
                        .unwrap_or_else(|| "never".into()),
                    r.bytes_sent,
                    r.full_syncs,
                    r.incremental_syncs,
                    r.unchanged_syncs,
                    r.last_error
                        .as_ref()
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default()
                );
            }
        }
        if let Some(s) = &v.standby {
            println!(
                "  standby: epoch {}, live {}, lag {}, applied {} tree(s), received {} bytes",
                s.state.epoch,
                s.state
                    .live
                    .as_ref()
                    .map(|l| format!(
                        "{} (captured {})",
                        &l.tree_hash[..16],
                        fmt_time(l.captured_at_ms)
                    ))
                    .unwrap_or_else(|| "none".into()),
                s.lag_seconds
                    .map(|l| format!("{l:.1} s"))
                    .unwrap_or_else(|| "-".into()),
                s.state.applies,
                s.state.bytes_received
            );
            for k in &s.state.kept_aside {
                println!(
                    "  kept aside (read-only): {} ({}; epoch {})",
                    k.path, k.reason, k.epoch
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
