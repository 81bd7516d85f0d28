//! The replication loop: for each database, capture on every monitor tick, checkpoint when due, upload to each
//! replica on its sync interval, run compaction and retention, and flush within a budget on shutdown.
//!
//! The decisions live elsewhere (`plan` for the replica, `capture` for the database); this file only
//! sequences them. Every task is owned by `replicate_all`'s `JoinSet`, and shutdown goes one way: the watch
//! channel flips, each database loop does its final capture and upload within the budget, then returns.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::capture::{Capture, CaptureError, Captured, Discontinuity, list_local_files};
use crate::config::{Config, DbConfig};
use crate::metrics::Metrics;
use crate::plan::CompactionPolicy;
use crate::replica::{Replica, ReplicaError};
use crate::seal::{SealError, Sealer};

/// How replication runs, beyond the per-database configuration.
#[derive(Clone, Debug)]
pub struct ReplicateOptions {
    /// Replicate over a non-empty replica that this database has no history with.
    pub force: bool,
    /// How long the final flush on shutdown may take (fits Nomad's default 5 s `kill_timeout`).
    pub shutdown_budget: Duration,
    pub policy: CompactionPolicy,
    /// Where to report; `Metrics::default()` reports to nobody.
    pub metrics: Metrics,
}

impl ReplicateOptions {
    /// Options from a loaded configuration.
    pub fn from_config(config: &Config, force: bool) -> ReplicateOptions {
        ReplicateOptions {
            force,
            shutdown_budget: config.shutdown_sync_timeout,
            policy: CompactionPolicy {
                levels: config.levels.clone(),
                snapshot_interval: config.snapshot_interval,
                snapshot_retention: config.snapshot_retention,
                l0_retention: config.l0_retention,
                retention_enabled: config.retention_enabled,
            },
            metrics: Metrics::default(),
        }
    }
}

/// Why replication of a database stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("replication task for {0} failed: {1}")]
    Task(PathBuf, String),
}

/// What the final flush achieved for one database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushReport {
    pub db: PathBuf,
    /// Highest captured TXID.
    pub captured: u64,
    /// For each replica, its name and the highest TXID it holds from this process.
    pub replicas: Vec<(String, u64)>,
    /// Why full images were written while replicating (continuity lost, first capture).
    pub rebases: Vec<String>,
}

impl FlushReport {
    /// Transactions captured but not on every replica when replication stopped.
    pub fn unflushed(&self) -> u64 {
        self.replicas
            .iter()
            .map(|(_, t)| self.captured.saturating_sub(*t))
            .max()
            .unwrap_or(0)
    }
}

/// Replicates every database of `config` until `shutdown` turns true.
pub async fn replicate_all(
    config: &Config,
    opts: &ReplicateOptions,
    shutdown: watch::Receiver<bool>,
) -> Vec<Result<FlushReport, ReplicateError>> {
    let mut tasks = JoinSet::new();
    for db in &config.dbs {
        let (db, opts, shutdown) = (db.clone(), opts.clone(), shutdown.clone());
        tasks.spawn(async move {
            let path = db.path.clone();
            let result = replicate_db(db, opts, shutdown).await;
            // Said at once, not at shutdown: the other databases go on replicating, and a stopped one must
            // not stay unnoticed until then.
            if let Err(e) = &result {
                tracing::error!(db = %path.display(), error = %e, "replication of this database stopped");
            }
            (path, result)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, r)) => results.push(r),
            Err(e) => results.push(Err(ReplicateError::Task(PathBuf::new(), e.to_string()))),
        }
    }
    results
}

/// Replicates one database until `shutdown` turns true, then flushes within the budget.
pub async fn replicate_db(
    db: DbConfig,
    opts: ReplicateOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<FlushReport, ReplicateError> {
    // Wait for the database to exist and for any restore of it to finish (Nomad runs the restore task and
    // the replicate sidecar at the same time).
    let mut told = false;
    loop {
        let exists = db.path.exists();
        let restoring = restore_in_progress(&db.path);
        if exists && !restoring {
            break;
        }
        if !told {
            let why = if restoring {
                "a restore of it is running"
            } else {
                "it does not exist yet"
            };
            tracing::info!(db = %db.path.display(), "waiting for the database: {why}");
            told = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(db.monitor_interval) => {}
            _ = shutdown.changed() => return Ok(FlushReport { db: db.path.clone(), captured: 0, replicas: Vec::new(), rebases: Vec::new() }),
        }
    }
    let (mut capture, discontinuity) =
        tokio::task::block_in_place(|| Capture::open(&db.path, db.busy_timeout))?;
    tracing::info!(db = %db.path.display(), txid = capture.state().txid, "replicating");
    let mut replicas = Vec::new();
    for r in &db.replicas {
        let sealer = Sealer::new(&r.age_recipients, &r.age_identities).map_err(|source| {
            ReplicaError::Seal {
                replica: r.name.clone(),
                source,
            }
        })?;
        if sealer.encrypts() && r.age_identities.is_empty() {
            // Compaction reads the replica's own files back, so a writer needs the identity too.
            let source = SealError::NoIdentity;
            return Err(ReplicaError::Seal {
                replica: r.name.clone(),
                source,
            }
            .into());
        }
        let policy = opts.policy.clone();
        replicas.push(Replica::open(&r.name, &r.location, capture.meta(), policy, sealer).await?);
    }
    let mut rebase = discontinuity.clone();
    if discontinuity == Some(Discontinuity::NoHistory) {
        for r in &replicas {
            if let Err(e) = r.check_fresh_start(0) {
                if !opts.force {
                    return Err(e.into());
                }
                tracing::warn!(db = %db.path.display(), replica = %r.name, "--force: writing a new image on top of the replica's history");
            }
        }
        // Continue the longest TXID sequence so restores of earlier points keep working.
        if let Some(top) = replicas
            .iter()
            .max_by_key(|r| r.max_txid())
            .filter(|r| r.max_txid() > 0)
        {
            let checksum = last_post_apply(top).await.unwrap_or(0);
            capture.continue_after(top.max_txid(), checksum);
        }
    } else {
        for r in &replicas {
            if r.max_txid() > capture.state().txid {
                return Err(ReplicaError::LeaseHeld {
                    replica: r.name.clone(),
                    holder: format!(
                        "the replica reaches TXID {:#x} but this database's local state only {:#x}: \
                         another replicator wrote to it",
                        r.max_txid(),
                        capture.state().txid
                    ),
                }
                .into());
            }
        }
    }
    for r in &mut replicas {
        r.ensure_lease().await?;
    }
    // A replica added to a database that already has history holds nothing to start a restore from: it gets
    // the next full image as its first snapshot.
    let mut needs_seed: Vec<bool> = replicas
        .iter()
        .map(|r| r.max_txid() == 0 && capture.state().txid > 0)
        .collect();
    if needs_seed.iter().any(|&n| n) && rebase.is_none() {
        rebase = Some(Discontinuity::NewReplica);
    }
    let mut seed_txid: Option<u64> = None;

    let metrics = &opts.metrics;
    let mut rebases = Vec::new();
    let mut store_stats: Vec<_> = replicas.iter().map(|r| r.store().stats()).collect();
    let mut last_upload = vec![Instant::now() - Duration::from_secs(3600); replicas.len()];
    let mut last_checkpoint = Instant::now();
    let mut last_change = Instant::now();
    let mut changed_since_checkpoint = false;
    let mut ticker = tokio::time::interval(db.monitor_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => break,
        }
        let pending = rebase.take();
        let (c, captured) = on_pool(&db.path, capture, move |c| c.sync(pending)).await?;
        capture = c;
        match captured {
            Ok(Some(c)) => {
                log_captured(&db.path, &c);
                if c.rebase.is_some() && seed_txid.is_none() {
                    seed_txid = Some(c.txid);
                }
                if let Some(reason) = &c.rebase {
                    metrics
                        .rebases
                        .get_or_create(&Metrics::reason(&db.path, &reason.to_string()))
                        .inc();
                    rebases.push(reason.to_string());
                }
                last_change = Instant::now();
                changed_since_checkpoint = true;
            }
            Ok(None) => {}
            Err(e) if e.is_retryable() => {
                metrics
                    .errors
                    .get_or_create(&Metrics::reason(&db.path, "capture"))
                    .inc();
                tracing::warn!(db = %db.path.display(), error = %e, "capture failed; retrying");
            }
            Err(e) => return Err(e.into()),
        }
        metrics
            .captured_txid
            .get_or_create(&Metrics::db(&db.path))
            .set(capture.state().txid as i64);
        metrics
            .wal_bytes
            .get_or_create(&Metrics::db(&db.path))
            .set(capture.wal_size() as i64);

        let page_size = u64::from(capture.state().page_size.max(512));
        let wal_pages = capture.wal_size() / (page_size + 24);
        let idle_checkpoint =
            changed_since_checkpoint && last_change.elapsed() >= db.checkpoint_interval;
        if wal_pages >= u64::from(db.min_checkpoint_page_count) || idle_checkpoint {
            let truncate = wal_pages >= u64::from(db.truncate_page_n);
            let (c, checkpointed) =
                on_pool(&db.path, capture, move |c| c.checkpoint(truncate)).await?;
            capture = c;
            match checkpointed {
                Ok((result, files)) => {
                    for c in &files {
                        log_captured(&db.path, c);
                    }
                    tracing::debug!(db = %db.path.display(), ?result, "checkpoint");
                    let outcome = if result.busy { "busy" } else { "ok" };
                    metrics
                        .checkpoints
                        .get_or_create(&Metrics::reason(&db.path, outcome))
                        .inc();
                    changed_since_checkpoint = false;
                    last_checkpoint = Instant::now();
                }
                Err(e) => {
                    metrics
                        .checkpoints
                        .get_or_create(&Metrics::reason(&db.path, "error"))
                        .inc();
                    tracing::warn!(db = %db.path.display(), error = %e, "checkpoint failed; will retry");
                }
            }
        }
        let _ = last_checkpoint;

        let local = list_local_files(capture.meta())?;
        let upto = capture.state().txid;
        for (i, r) in replicas.iter_mut().enumerate() {
            let interval = db
                .replicas
                .get(i)
                .map_or(Duration::from_secs(1), |c| c.sync_interval);
            // Ticks come every monitor interval, so an upload due "in a moment" goes now rather than a whole
            // tick later; otherwise equal monitor and sync intervals would double the lag.
            let due = last_upload[i].elapsed() + db.monitor_interval / 2 >= interval;
            if r.uploaded() >= upto || !due {
                continue;
            }
            last_upload[i] = Instant::now();
            if needs_seed[i] {
                let Some(seed) = seed_txid else { continue };
                match r.seed(&capture.local_file(seed), seed).await {
                    Ok(()) => needs_seed[i] = false,
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(replica = %r.name, error = %e, "seeding failed; retrying");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            match r.upload(&local, upto).await {
                Ok(_) => {}
                Err(e) if e.is_retryable() => {
                    metrics
                        .errors
                        .get_or_create(&Metrics::reason(&db.path, "upload"))
                        .inc();
                    tracing::warn!(replica = %r.name, error = %e, "upload failed; retrying");
                }
                Err(e) => return Err(e.into()),
            }
            match r.maintain(SystemTime::now()).await {
                Ok(done) => {
                    for step in done {
                        tracing::debug!(replica = %r.name, ?step, "maintenance");
                    }
                }
                Err(e) if e.is_retryable() => {
                    metrics
                        .errors
                        .get_or_create(&Metrics::reason(&db.path, "maintenance"))
                        .inc();
                    tracing::warn!(replica = %r.name, error = %e, "maintenance failed; retrying");
                }
                Err(e) => return Err(e.into()),
            }
        }
        report_replicas(metrics, &db.path, &replicas, &local, upto, &mut store_stats);
        if let Some(shipped) = replicas.iter().map(Replica::uploaded).min() {
            capture.release(&local, shipped);
        }
    }

    // Final flush: capture what is committed and upload it, within the budget. Uploads stop a little
    // before the budget runs out, so that a multipart upload still under way is aborted (one request)
    // instead of being dropped with its parts left in the bucket.
    let deadline = Instant::now() + opts.shutdown_budget;
    let uploads_by = deadline - (opts.shutdown_budget / 5).min(Duration::from_secs(1));
    for r in &mut replicas {
        r.set_deadline(Some(uploads_by.into()));
    }
    let flush = async {
        // A rebase still pending (shutdown came before the first tick, as with `--once`) is
        // carried out here, or the first image of the database would never be written.
        if let Ok(Some(c)) = tokio::task::block_in_place(|| capture.sync(rebase.take())) {
            log_captured(&db.path, &c);
            if c.rebase.is_some() && seed_txid.is_none() {
                seed_txid = Some(c.txid);
            }
        }
        let local = list_local_files(capture.meta())?;
        let upto = capture.state().txid;
        for (i, r) in replicas.iter_mut().enumerate() {
            if needs_seed[i]
                && let Some(seed) = seed_txid
            {
                r.seed(&capture.local_file(seed), seed).await?;
            }
            r.upload(&local, upto).await?;
        }
        Ok::<_, ReplicateError>(())
    };
    match tokio::time::timeout_at(deadline.into(), flush).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(db = %db.path.display(), error = %e, "final flush failed"),
        Err(_) => {
            tracing::error!(db = %db.path.display(), budget = ?opts.shutdown_budget, "final flush did not finish within the shutdown budget")
        }
    }
    for r in &mut replicas {
        r.release_lease().await;
    }
    let report = FlushReport {
        db: db.path.clone(),
        captured: capture.state().txid,
        replicas: replicas
            .iter()
            .map(|r| (r.name.clone(), r.uploaded()))
            .collect(),
        rebases,
    };
    if report.unflushed() > 0 {
        tracing::error!(db = %db.path.display(), unflushed = report.unflushed(), "transactions captured but not uploaded to every replica");
    }
    Ok(report)
}

/// Runs `work` on the capture in tokio's blocking pool and hands the capture back.
///
/// Not `block_in_place`, which moves the calling worker's other tasks to another thread on every
/// call: with a hundred databases ticking every second, `perf` put most of the replicator's system
/// time in those hand-overs (context switches, thread starts) and it ran about a hundred threads.
async fn on_pool<T, F>(db: &Path, capture: Capture, work: F) -> Result<(Capture, T), ReplicateError>
where
    T: Send + 'static,
    F: FnOnce(&mut Capture) -> T + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let mut capture = capture;
        let out = work(&mut capture);
        (capture, out)
    })
    .await
    .map_err(|e| ReplicateError::Task(db.to_owned(), e.to_string()))
}

/// The post-apply checksum that the newest file on a replica declares (hearth-written files only), from
/// its header alone: the newest file may be a snapshot as large as the database.
async fn last_post_apply(replica: &Replica) -> Option<u64> {
    let newest = replica
        .files()
        .iter()
        .max_by_key(|f| (f.max_txid, f.level))?;
    let header = replica.read_header(newest).await.ok()?;
    header.hearth.map(|h| h.post_apply.0)
}

/// Updates the per-replica metrics: uploaded TXID, last upload, lag and store requests.
fn report_replicas(
    metrics: &Metrics,
    db: &Path,
    replicas: &[Replica],
    local: &[(u64, PathBuf)],
    captured: u64,
    store_stats: &mut [hearth_store::StoreStats],
) {
    let now = SystemTime::now();
    for (r, before) in replicas.iter().zip(store_stats.iter_mut()) {
        let labels = Metrics::replica(db, &r.name);
        metrics
            .uploaded_txid
            .get_or_create(&labels)
            .set(r.uploaded() as i64);
        if let Some(t) = r.last_upload {
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            metrics
                .last_upload_timestamp_seconds
                .get_or_create(&labels)
                .set(secs);
        }
        let waiting_since = (r.uploaded() < captured)
            .then(|| local.iter().find(|(t, _)| *t > r.uploaded()))
            .flatten()
            .and_then(|(_, p)| std::fs::metadata(p).ok()?.modified().ok());
        let lag = waiting_since.map_or(0.0, |t| {
            now.duration_since(t).unwrap_or_default().as_secs_f64()
        });
        metrics.lag_seconds.get_or_create(&labels).set(lag);
        let stats = r.store().stats();
        metrics.add_store_stats(db, &r.name, before, &stats);
        *before = stats;
    }
}

fn log_captured(db: &Path, c: &Captured) {
    match &c.rebase {
        Some(reason) => {
            tracing::info!(db = %db.display(), txid = c.txid, pages = c.pages, %reason, "captured a full image")
        }
        None => {
            tracing::debug!(db = %db.display(), txid = c.txid, pages = c.pages, transactions = c.transactions, "captured")
        }
    }
}

/// The marker a running restore holds (an exclusive lock on `<db>.hearth-restore.lock`).
pub fn restore_lock_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".hearth-restore.lock");
    PathBuf::from(p)
}

/// Whether a restore of `db` is running right now: its lock file exists and is locked.
pub fn restore_in_progress(db: &Path) -> bool {
    let Ok(file) = std::fs::File::open(restore_lock_path(db)) else {
        return false;
    };
    // A lock we can take means the restore that made the file is gone (it crashed or finished).
    match file.try_lock_shared() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(_)) => false,
    }
}
