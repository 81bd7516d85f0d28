//! Restore: pick the best reachable replica, plan the files, download them in parallel, apply them into a
//! temporary file, prove the end state by its checksum, then fsync and rename into place.

use std::fs::{self, File};
use std::io::{Cursor, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use hearth_store::{RetryPolicy, Store, StoreError, with_retry};

use crate::capture::{LocalState, meta_dir, sync_dir, write_atomic};
use crate::config::ReplicaConfig;
use crate::layout::{FileInfo, Layout};
use crate::ltx::{self, Checksum, Decoder};
use crate::plan::{self, PlanError, Target};
use crate::replica::list_files;
use crate::seal::Sealer;

/// What to restore and how.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub target: Target,
    /// Where the database goes.
    pub output: PathBuf,
    /// Succeed quietly when the output already exists.
    pub if_db_not_exists: bool,
    /// Succeed quietly when every replica is reachable and truly empty.
    pub if_replica_exists: bool,
    /// Downloads in flight at once.
    pub parallelism: usize,
    /// Told after each applied file; the binary draws a progress bar with it on a terminal.
    pub progress: Option<Progress>,
}

/// A progress callback: `(files applied, files in the plan, bytes downloaded)`.
#[derive(Clone)]
pub struct Progress(pub std::sync::Arc<dyn Fn(usize, usize, u64) + Send + Sync>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreOutcome {
    Restored(Restored),
    /// `if_db_not_exists` and the database exists.
    DatabaseExists,
    /// `if_replica_exists` and every replica is reachable and empty.
    NoReplica,
}

/// Details of a finished restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub replica: String,
    pub txid: u64,
    pub files: usize,
    pub bytes: u64,
    /// Whether the end state was proven by a checksum the writer recorded (hearth-written replicas); a
    /// replica written by Litestream carries none, and then `PRAGMA integrity_check` is what is checked.
    pub checksum_verified: bool,
    pub set_aside: Vec<PathBuf>,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no replica is configured for {0}")]
    NoReplicas(String),
    #[error("no replica could be read: {}", .0.join("; "))]
    AllUnreachable(Vec<String>),
    #[error(
        "no backup found: every replica is reachable and empty ({}). If this is a new database, pass \
         -if-replica-exists to allow starting without one; if a backup should be there, check the bucket and path",
        .0.join(", ")
    )]
    Empty(Vec<String>),
    #[error("replica {replica}: cannot restore: {source}")]
    Plan { replica: String, source: PlanError },
    #[error("replica {replica}: download {key}: {source}")]
    Download {
        replica: String,
        key: String,
        source: Box<StoreError>,
    },
    #[error(
        "replica {replica}: LTX file {key} is damaged or does not follow the previous one: {source}"
    )]
    Ltx {
        replica: String,
        key: String,
        source: ltx::LtxError,
    },
    #[error("replica {replica}: object {key}: {source}")]
    Seal {
        replica: String,
        key: String,
        source: crate::seal::SealError,
    },
    #[error("the restored database failed `PRAGMA integrity_check`: {0}")]
    Integrity(String),
    #[error("{what} {path}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// Restores a database from the first usable replica in `replicas` (the best one for `Latest`).
pub async fn restore(
    replicas: &[ReplicaConfig],
    opts: &RestoreOptions,
) -> Result<RestoreOutcome, RestoreError> {
    if opts.if_db_not_exists && opts.output.exists() {
        return Ok(RestoreOutcome::DatabaseExists);
    }
    if replicas.is_empty() {
        return Err(RestoreError::NoReplicas(opts.output.display().to_string()));
    }
    // List every replica; an unreachable one is skipped with its reason, never mistaken for an empty one.
    let mut reachable = Vec::new();
    let mut failures = Vec::new();
    for r in replicas {
        let store = match Store::open(&r.location) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{}: {e}", r.name));
                continue;
            }
        };
        let layout = Layout::for_location(&r.location);
        match with_retry(&RetryPolicy::default(), || list_files(&store, layout)).await {
            Ok(files) => reachable.push((r, store, layout, files)),
            Err(e) => {
                tracing::warn!(replica = %r.name, error = %e, "replica unreachable; trying the next one");
                failures.push(format!("{}: {e}", r.name));
            }
        }
    }
    if reachable.is_empty() {
        return Err(RestoreError::AllUnreachable(failures));
    }
    if reachable.iter().all(|(_, _, _, files)| files.is_empty()) {
        if failures.is_empty() && opts.if_replica_exists {
            return Ok(RestoreOutcome::NoReplica);
        }
        if !failures.is_empty() {
            return Err(RestoreError::AllUnreachable(failures));
        }
        return Err(RestoreError::Empty(
            reachable.iter().map(|(r, ..)| r.name.clone()).collect(),
        ));
    }
    // Prefer the replica that reaches furthest; among equals, the first configured.
    reachable.sort_by_key(|(_, _, _, files)| {
        std::cmp::Reverse(files.iter().map(|f| f.max_txid).max().unwrap_or(0))
    });
    let mut last_err = None;
    for (r, store, layout, files) in &reachable {
        match plan::restore_plan(files, opts.target) {
            Ok(plan) => {
                return apply_plan(r, store, *layout, &plan, opts)
                    .await
                    .map(RestoreOutcome::Restored);
            }
            Err(source) => {
                last_err = Some(RestoreError::Plan {
                    replica: r.name.clone(),
                    source,
                })
            }
        }
    }
    Err(last_err.unwrap_or_else(|| RestoreError::Empty(Vec::new())))
}

async fn apply_plan(
    config: &ReplicaConfig,
    store: &Store,
    layout: Layout,
    plan: &[FileInfo],
    opts: &RestoreOptions,
) -> Result<Restored, RestoreError> {
    let output = &opts.output;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Io { path, what, source }
    };
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io("create the directory of", dir))?;
    }
    // Hold the restore lock so a replicator started beside us (Nomad's prestart + sidecar) waits for the end.
    let lock_path = crate::replicate::restore_lock_path(output);
    let lock = File::create(&lock_path).map_err(io("create the restore lock", &lock_path))?;
    lock.lock().map_err(io("lock", &lock_path))?;
    let result = apply_plan_locked(config, store, layout, plan, opts).await;
    let _ = fs::remove_file(&lock_path);
    drop(lock);
    result
}

async fn apply_plan_locked(
    config: &ReplicaConfig,
    store: &Store,
    layout: Layout,
    plan: &[FileInfo],
    opts: &RestoreOptions,
) -> Result<Restored, RestoreError> {
    let output = &opts.output;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Io { path, what, source }
    };
    let replica = config.name.as_str();
    let sealer = Sealer::new(&config.age_recipients, &config.age_identities).map_err(|source| {
        RestoreError::Seal {
            replica: replica.to_string(),
            key: String::new(),
            source,
        }
    })?;
    let sealer = &sealer;
    let tmp = temp_path(output);
    let mut image = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("create", &tmp))?;

    let keys: Vec<String> = plan
        .iter()
        .map(|f| layout.ltx_key(f.level, f.min_txid, f.max_txid))
        .collect();
    let parallelism = opts.parallelism.max(1);
    let spool = spool_path(output);
    // Downloads run ahead of the apply by at most `parallelism` files; large files are fetched in parts
    // (in parallel, each part retried on its own, so a broken transfer resumes at the part it broke in) and
    // spooled to disk, so memory stays bounded by `parallelism` parts.
    let fetch_ctx = Fetch {
        store,
        replica,
        sealer,
        parallelism,
    };
    let mut downloads = futures::stream::iter(plan.iter().zip(keys.iter()).enumerate())
        .map(|(i, (f, key))| {
            let mut spool = spool.clone().into_os_string();
            spool.push(format!(".{i}"));
            let spool = PathBuf::from(spool);
            let fetch_ctx = &fetch_ctx;
            async move {
                fetch_ctx
                    .fetch(key, f.size, &spool)
                    .await
                    .map(|data| (key.clone(), data))
            }
        })
        .buffered(parallelism);

    let mut current: Option<Checksum> = None;
    let mut verified = true;
    let mut bytes = 0u64;
    let mut txid = 0;
    let mut applied_files = 0usize;
    let result: Result<(), RestoreError> = async {
        while let Some((key, data)) = downloads.try_next().await? {
            bytes += data.len();
            let ltx_err = |source| RestoreError::Ltx {
                replica: replica.to_string(),
                key: key.clone(),
                source,
            };
            let dec = Decoder::new(data.reader().map_err(|source| RestoreError::Io {
                path: spool.clone(),
                what: "read the spooled download",
                source,
            })?)
            .map_err(ltx_err)?;
            let header = *dec.header();
            let declares = header.declared_pre_apply().is_some();
            if !declares {
                verified = false;
            }
            // Carry the checksum through files that declare one; a checksum-free file (Litestream's) breaks it.
            // A file that starts inside what is already applied (a compacted file that straddles the snapshot
            // the plan started from) is still right to apply, since it holds the newest version of every page it
            // touches, but its pre-apply checksum describes an earlier state; its post-apply checksum holds.
            let overlaps = !header.is_snapshot() && header.min_txid <= txid;
            let carry = if declares && !header.is_snapshot() && !overlaps {
                current
            } else {
                None
            };
            let applied = tokio::task::block_in_place(|| ltx::apply(dec, &mut image, carry))
                .map_err(ltx_err)?;
            current = match (declares, overlaps) {
                (false, _) => None,
                (true, false) => applied.checksum,
                (true, true) => applied
                    .summary
                    .header
                    .declared_checksums(&applied.summary.trailer)
                    .map(|(_, post)| post),
            };
            applied_files += 1;
            if let Some(Progress(report)) = &opts.progress {
                report(applied_files, plan.len(), bytes);
            }
            txid = header.max_txid;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        drop(image);
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }

    // Prove the end state: the checksum of the whole file must equal the last recorded post-apply checksum.
    let page_size = page_size_of(&mut image).map_err(io("read", &tmp))?;
    image.seek(SeekFrom::Start(0)).map_err(io("read", &tmp))?;
    let whole =
        ltx::checksum_database(std::io::BufReader::new(&image), page_size).map_err(|source| {
            RestoreError::Ltx {
                replica: replica.to_string(),
                key: "restored image".into(),
                source,
            }
        })?;
    if verified
        && let Some(expected) = current
        && expected != whole
    {
        drop(image);
        let _ = fs::remove_file(&tmp);
        return Err(RestoreError::Ltx {
            replica: replica.to_string(),
            key: keys.last().cloned().unwrap_or_default(),
            source: ltx::LtxError::PostApplyChecksumMismatch {
                stored: expected,
                computed: whole,
            },
        });
    }
    image.sync_all().map_err(io("fsync", &tmp))?;
    drop(image);
    if !verified {
        integrity_check(&tmp)?;
    }

    // Stale -wal/-shm files beside the output belong to another database image; set them aside, never delete.
    let mut set_aside = Vec::new();
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for suffix in ["-wal", "-shm"] {
        let mut p = output.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        if p.exists() {
            let mut aside = p.as_os_str().to_owned();
            aside.push(format!(".stale-{stamp}"));
            let aside = PathBuf::from(aside);
            fs::rename(&p, &aside).map_err(io("set aside", &p))?;
            tracing::warn!(stale = %p.display(), moved_to = %aside.display(), "set aside a WAL file that did not belong to the restored database");
            set_aside.push(aside);
        }
    }
    fs::rename(&tmp, output).map_err(io("rename into place", output))?;
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(dir).map_err(io("fsync", dir))?;
    }
    record_restored_state(output, txid, whole, page_size, replica)
        .map_err(io("record the restored position for", output))?;
    Ok(Restored {
        replica: replica.to_string(),
        txid,
        files: plan.len(),
        bytes,
        checksum_verified: verified,
        set_aside,
    })
}

/// Writes the local state of a restored database so that replication continues the replica's TXID sequence
/// instead of uploading the whole database again (Litestream #781, #393).
fn record_restored_state(
    output: &Path,
    txid: u64,
    checksum: Checksum,
    page_size: u32,
    replica: &str,
) -> std::io::Result<()> {
    let meta = meta_dir(output);
    // An old meta directory describes another history of this path; keep it aside for inspection.
    if meta.exists() {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut aside = meta.as_os_str().to_owned();
        aside.push(format!(".old-{stamp}"));
        fs::rename(&meta, PathBuf::from(aside))?;
    }
    fs::create_dir_all(meta.join("ltx/0"))?;
    fs::create_dir_all(meta.join("replicas"))?;
    let m = fs::metadata(output)?;
    let state = LocalState {
        version: 1,
        txid,
        checksum: checksum.0,
        commit: (m.len() / u64::from(page_size.max(1))) as u32,
        page_size,
        wal: None,
        dev: m.dev(),
        ino: m.ino(),
        timestamp_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    };
    write_atomic(
        &meta.join("state.json"),
        &serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?,
    )?;
    let position = crate::replica::ReplicaPosition {
        txid,
        uploaded_at_ms: None,
    };
    write_atomic(
        &crate::replica::position_path(&meta, replica),
        &serde_json::to_vec(&position).map_err(std::io::Error::other)?,
    )
}

fn page_size_of(file: &mut File) -> std::io::Result<u32> {
    use std::io::Read;
    let mut header = [0u8; 100];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut header)?;
    let raw = u16::from_be_bytes([header[16], header[17]]);
    Ok(if raw == 1 { 65536 } else { u32::from(raw) })
}

fn integrity_check(path: &Path) -> Result<(), RestoreError> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| RestoreError::Integrity(e.to_string()))?;
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| RestoreError::Integrity(e.to_string()))?;
    drop(conn);
    // Opening a WAL-mode image may leave hearth's own -wal/-shm beside the temporary file.
    for suffix in ["-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = fs::remove_file(PathBuf::from(p));
    }
    if result == "ok" {
        Ok(())
    } else {
        Err(RestoreError::Integrity(result))
    }
}

/// Files at least this large are downloaded in parts of this size and spooled to disk.
const PART_SIZE: u64 = 8 << 20;

/// Where large downloads are spooled, beside the output (same filesystem, removed after use).
fn spool_path(output: &Path) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(".hearth-restore.spool");
    PathBuf::from(p)
}

/// A downloaded LTX file: in memory, or spooled to a file that is removed when this is dropped.
enum Fetched {
    Memory(Vec<u8>),
    Spool { path: PathBuf, len: u64 },
}

impl Fetched {
    fn len(&self) -> u64 {
        match self {
            Fetched::Memory(v) => v.len() as u64,
            Fetched::Spool { len, .. } => *len,
        }
    }

    fn reader(&self) -> std::io::Result<Box<dyn std::io::Read + Send + '_>> {
        Ok(match self {
            Fetched::Memory(v) => Box::new(Cursor::new(v.as_slice())),
            Fetched::Spool { path, .. } => Box::new(std::io::BufReader::with_capacity(
                1 << 20,
                File::open(path)?,
            )),
        })
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if let Fetched::Spool { path, .. } = self {
            let _ = fs::remove_file(path);
        }
    }
}

/// What downloading needs: the store, names for errors, the sealer, and the parallelism for parts.
struct Fetch<'a> {
    store: &'a Store,
    replica: &'a str,
    sealer: &'a Sealer,
    parallelism: usize,
}

impl Fetch<'_> {
    async fn fetch(&self, key: &str, size: u64, spool: &Path) -> Result<Fetched, RestoreError> {
        let download_err = |source| RestoreError::Download {
            replica: self.replica.to_string(),
            key: key.to_string(),
            source: Box::new(source),
        };
        let seal_err = |source| RestoreError::Seal {
            replica: self.replica.to_string(),
            key: key.to_string(),
            source,
        };
        if size < 2 * PART_SIZE {
            let data = with_retry(&RetryPolicy::default(), || self.store.get(key))
                .await
                .map_err(download_err)?;
            return Ok(Fetched::Memory(self.sealer.open(&data).map_err(seal_err)?));
        }
        let io = |source| RestoreError::Io {
            path: spool.to_path_buf(),
            what: "spool a download to",
            source,
        };
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(spool)
            .map_err(io)?;
        // From here on the spool file is removed on every exit path.
        let fetched = Fetched::Spool {
            path: spool.to_path_buf(),
            len: size,
        };
        let parts: Vec<std::ops::Range<u64>> = (0..size)
            .step_by(PART_SIZE as usize)
            .map(|start| start..(start + PART_SIZE).min(size))
            .collect();
        let mut stream = futures::stream::iter(parts)
            .map(|range| async move {
                let data = with_retry(&RetryPolicy::default(), || {
                    self.store.get_range(key, range.clone())
                })
                .await;
                data.map(|d| (range.start, d))
            })
            .buffer_unordered(self.parallelism);
        while let Some(part) = stream.next().await {
            let (offset, data) = part.map_err(download_err)?;
            std::os::unix::fs::FileExt::write_all_at(&file, &data, offset).map_err(io)?;
        }
        if self.sealer.encrypts() || fetched.len() != file.metadata().map_err(io)?.len() {
            // An encrypted object is opened whole (age streams cannot be decrypted from the middle).
            let whole = fs::read(spool).map_err(io)?;
            return Ok(Fetched::Memory(self.sealer.open(&whole).map_err(seal_err)?));
        }
        // A plain object may still be an age file when the replica was written encrypted; `open` tells.
        let mut head = [0u8; 32];
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0).map_err(io)?;
        if head[..n].starts_with(b"age-encryption.org/v1") {
            let whole = fs::read(spool).map_err(io)?;
            return Ok(Fetched::Memory(self.sealer.open(&whole).map_err(seal_err)?));
        }
        Ok(fetched)
    }
}

fn temp_path(output: &Path) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(".hearth-restore.tmp");
    PathBuf::from(p)
}
