//! Restore: pick the best reachable replica, plan the files, stream them from the store in parallel ranged
//! parts straight into the LTX decoder, apply them into a temporary file, prove the end state by its checksum,
//! then fsync and rename into place.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::future::Future;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use futures::StreamExt;
use hearth_store::{RetryPolicy, Store, StoreError, with_retry};
use tokio::sync::mpsc;

use crate::capture::{LocalState, meta_dir, sync_dir, write_atomic};
use crate::config::ReplicaConfig;
use crate::layout::{FileInfo, Layout};
use crate::ltx::{self, Checksum, DbChecksum, Decoder};
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
    /// Only work out the plan (which replica, which files) and write nothing (Litestream's
    /// `-dry-run`).
    pub dry_run: bool,
    /// Told as downloaded bytes reach the decoder and after each applied file; the binary draws a progress
    /// bar with it on a terminal.
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
    /// `dry_run`: what a restore would fetch; nothing was written.
    Planned {
        /// The replica it would use.
        replica: String,
        /// The files it would apply, in order.
        files: Vec<FileInfo>,
    },
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
            Ok(plan) if opts.dry_run => {
                return Ok(RestoreOutcome::Planned {
                    replica: r.name.clone(),
                    files: plan,
                });
            }
            Ok(plan) => {
                return apply_plan(r, store, *layout, &plan, opts, Tuning::default())
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

async fn apply_plan<S: ObjectSource>(
    config: &ReplicaConfig,
    source: &S,
    layout: Layout,
    plan: &[FileInfo],
    opts: &RestoreOptions,
    tuning: Tuning,
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
    let result = apply_plan_locked(config, source, layout, plan, opts, tuning).await;
    let _ = fs::remove_file(&lock_path);
    drop(lock);
    result
}

async fn apply_plan_locked<S: ObjectSource>(
    config: &ReplicaConfig,
    source: &S,
    layout: Layout,
    plan: &[FileInfo],
    opts: &RestoreOptions,
    tuning: Tuning,
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
    let tmp = temp_path(output);
    let image = File::options()
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
    // The downloads (this task) and the decoding and writing (a blocking thread) run at the same time,
    // joined by a channel of one piece: the store's transfer overlaps the CPU work of decoding, and nothing
    // is staged on disk. Both sides are awaited below; if this future is dropped instead, the sender goes
    // with it and the applier stops at its next read.
    let (tx, rx) = mpsc::channel(1);
    let applier = {
        let keys = keys.clone();
        let replica = replica.to_string();
        let progress = opts.progress.clone();
        let total = plan.len();
        tokio::task::spawn_blocking(move || {
            let mut image = image;
            let result = apply_stream(rx, &mut image, &keys, &replica, &sealer, progress, total);
            (image, result)
        })
    };
    let fetch = Fetch {
        source,
        replica,
        window: opts.parallelism.max(1),
        tuning,
    };
    let produced = fetch.produce(plan, &keys, tx).await;
    let joined = applier.await;
    let fail = |e: RestoreError| {
        let _ = fs::remove_file(&tmp);
        Err(e)
    };
    let (image, applied) = match joined {
        Ok(pair) => pair,
        Err(e) => {
            return fail(RestoreError::Io {
                path: tmp.clone(),
                what: "apply the downloaded files to",
                source: std::io::Error::other(e.to_string()),
            });
        }
    };
    // A failed download also ends the applier (its input stops short); the download error is the cause.
    if let Err(e) = produced {
        drop(image);
        return fail(e);
    }
    let applied = match applied {
        Ok(a) => a,
        Err(e) => {
            drop(image);
            return fail(e);
        }
    };

    // Prove the end state: the checksum of the whole file, read back from the file, must equal the last
    // recorded post-apply checksum. The fsync runs meanwhile, since both only read what was written.
    let page_size = applied.page_size;
    let (whole, synced) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let sync = s.spawn(|| image.sync_all());
            let whole = checksum_image(&image, page_size);
            let synced = sync
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the fsync thread panicked")));
            (whole, synced)
        })
    });
    let whole = match whole {
        Ok(w) => w,
        Err(source) => {
            drop(image);
            return fail(RestoreError::Ltx {
                replica: replica.to_string(),
                key: "restored image".into(),
                source,
            });
        }
    };
    if applied.verified
        && let Some(expected) = applied.current
        && expected != whole
    {
        drop(image);
        return fail(RestoreError::Ltx {
            replica: replica.to_string(),
            key: keys.last().cloned().unwrap_or_default(),
            source: ltx::LtxError::PostApplyChecksumMismatch {
                stored: expected,
                computed: whole,
            },
        });
    }
    if let Err(e) = synced {
        drop(image);
        return fail(RestoreError::Io {
            path: tmp.clone(),
            what: "fsync",
            source: e,
        });
    }
    drop(image);
    if !applied.verified
        && let Err(e) = integrity_check(&tmp)
    {
        return fail(e);
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
    record_restored_state(output, applied.txid, whole, page_size, replica)
        .map_err(io("record the restored position for", output))?;
    Ok(Restored {
        replica: replica.to_string(),
        txid: applied.txid,
        files: plan.len(),
        bytes: applied.bytes,
        checksum_verified: applied.verified,
        set_aside,
    })
}

/// Where restore reads objects from: the store itself, or in tests the real store behind an injected fault.
pub(crate) trait ObjectSource: Sync {
    /// The store's name, for error messages.
    fn name(&self) -> &str;
    /// The whole object at `key`.
    fn get(&self, key: &str) -> impl Future<Output = Result<Bytes, StoreError>> + Send;
    /// Bytes `range` of the object at `key`.
    fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Bytes, StoreError>> + Send;
}

impl ObjectSource for Store {
    fn name(&self) -> &str {
        Store::name(self)
    }

    fn get(&self, key: &str) -> impl Future<Output = Result<Bytes, StoreError>> + Send {
        Store::get(self, key)
    }

    fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Bytes, StoreError>> + Send {
        Store::get_range(self, key, range)
    }
}

/// Download settings that tests shrink; `restore` uses [`Tuning::default`].
#[derive(Clone, Copy, Debug)]
struct Tuning {
    /// Files of at least twice this size are fetched in ranged parts of this size.
    part_size: u64,
    /// Retries of each request (each part on its own).
    retry: RetryPolicy,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            part_size: PART_SIZE,
            retry: RetryPolicy::default(),
        }
    }
}

/// Files of at least twice this size are downloaded in ranged parts of this size. Measured on a 1 GiB
/// snapshot from Garage: 4 MiB parts restore as fast as 8 or 16 MiB ones (2 MiB parts are slower) with
/// about half the memory of 8 MiB parts.
const PART_SIZE: u64 = 4 << 20;

/// Downloaded parts kept ready for the applier beyond the one in the channel, so that the downloads in flight
/// go on while the applier works through the previous part.
const READY_PARTS: usize = 2;

/// What the downloader hands the applier, in plan order: the bytes of a file in order, then its end.
enum Piece {
    Data(Bytes),
    End,
}

/// One request of the download plan: a whole object, or one ranged part of it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Request {
    /// Index of the file in the plan.
    file: usize,
    /// `None`: the whole object in one request.
    range: Option<Range<u64>>,
    /// The file's last request.
    last: bool,
}

/// Splits the plan into requests, in the order the applier needs the bytes.
fn requests(plan: &[FileInfo], part_size: u64) -> Vec<Request> {
    let part_size = part_size.max(1);
    let mut out = Vec::new();
    for (file, f) in plan.iter().enumerate() {
        if f.size < 2 * part_size {
            out.push(Request {
                file,
                range: None,
                last: true,
            });
            continue;
        }
        let mut start = 0;
        while start < f.size {
            let end = (start + part_size).min(f.size);
            out.push(Request {
                file,
                range: Some(start..end),
                last: end == f.size,
            });
            start = end;
        }
    }
    out
}

/// What downloading needs: the source, names for errors, and how many requests run at once.
struct Fetch<'a, S> {
    source: &'a S,
    replica: &'a str,
    window: usize,
    tuning: Tuning,
}

impl<S: ObjectSource> Fetch<'_, S> {
    fn download_err(&self, key: &str, source: StoreError) -> RestoreError {
        RestoreError::Download {
            replica: self.replica.to_string(),
            key: key.to_string(),
            source: Box::new(source),
        }
    }

    /// One request, retried on its own: a broken transfer costs one part, not the file.
    async fn fetch(&self, key: &str, req: &Request) -> Result<Bytes, RestoreError> {
        let policy = &self.tuning.retry;
        let Some(range) = &req.range else {
            return with_retry(policy, || self.source.get(key))
                .await
                .map_err(|e| self.download_err(key, e));
        };
        let data = with_retry(policy, || self.source.get_range(key, range.clone()))
            .await
            .map_err(|e| self.download_err(key, e))?;
        // A short part means the object is shorter than listed (replaced since); its bytes cannot be placed.
        if data.len() as u64 != range.end - range.start {
            return Err(self.download_err(
                key,
                StoreError::Other {
                    store: self.source.name().to_string(),
                    key: key.to_string(),
                    detail: format!(
                        "bytes {}..{} came back as {} bytes; the object is shorter than listed",
                        range.start,
                        range.end,
                        data.len()
                    ),
                },
            ));
        }
        Ok(data)
    }

    /// Downloads every file of the plan, `window` requests at a time, and sends the bytes to the applier in
    /// order, as stored (the applier decrypts). Memory: at most `window` requests in flight plus
    /// `READY_PARTS` finished ones here and one in the channel, each at most one part. Returns `Ok` also when
    /// the applier stopped early: its error is the one to report.
    async fn produce(
        &self,
        plan: &[FileInfo],
        keys: &[String],
        tx: mpsc::Sender<Piece>,
    ) -> Result<(), RestoreError> {
        let mut parts = futures::stream::iter(requests(plan, self.tuning.part_size))
            .map(|req| async move {
                let data = self.fetch(&keys[req.file], &req).await?;
                Ok::<_, RestoreError>((req, data))
            })
            .buffered(self.window);
        let mut ready: VecDeque<Piece> = VecDeque::new();
        let mut exhausted = false;
        loop {
            if exhausted && ready.is_empty() {
                return Ok(());
            }
            // Hand finished parts on while the next ones download: both branches make progress at once.
            tokio::select! {
                permit = tx.reserve(), if !ready.is_empty() => {
                    let Ok(permit) = permit else {
                        return Ok(());
                    };
                    if let Some(piece) = ready.pop_front() {
                        permit.send(piece);
                    }
                }
                next = parts.next(), if !exhausted && ready.len() < READY_PARTS => {
                    let Some(next) = next else {
                        exhausted = true;
                        continue;
                    };
                    let (req, data) = next?;
                    ready.push_back(Piece::Data(data));
                    if req.last {
                        ready.push_back(Piece::End);
                    }
                }
            }
        }
    }
}

/// Where the applier got to.
#[derive(Debug)]
struct Applied {
    /// The database checksum after the last file, when every file carried one.
    current: Option<Checksum>,
    verified: bool,
    txid: u64,
    bytes: u64,
    page_size: u32,
}

/// What the applier has received so far, shared by the readers of successive files.
struct Received {
    bytes: u64,
    /// The current file's end was reached.
    ended: bool,
    files_done: usize,
    files_total: usize,
    progress: Option<Progress>,
}

/// One file's bytes as they arrive from the downloader, read by the LTX decoder.
struct PieceReader<'a> {
    rx: &'a mut mpsc::Receiver<Piece>,
    cur: Bytes,
    received: &'a mut Received,
}

impl std::io::Read for PieceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if !self.cur.is_empty() || buf.is_empty() {
                let n = buf.len().min(self.cur.len());
                buf[..n].copy_from_slice(&self.cur[..n]);
                self.cur.advance(n);
                return Ok(n);
            }
            if self.received.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Piece::Data(data)) => {
                    self.received.bytes += data.len() as u64;
                    if let Some(Progress(report)) = &self.received.progress {
                        report(
                            self.received.files_done,
                            self.received.files_total,
                            self.received.bytes,
                        );
                    }
                    self.cur = data;
                }
                Some(Piece::End) => self.received.ended = true,
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the download stopped before the end of this file",
                    ));
                }
            }
        }
    }
}

/// Decodes and applies the files of the plan in order as their bytes arrive, carrying the database checksum
/// through them. Runs on a blocking thread.
fn apply_stream(
    mut rx: mpsc::Receiver<Piece>,
    image: &mut File,
    keys: &[String],
    replica: &str,
    sealer: &Sealer,
    progress: Option<Progress>,
    files_total: usize,
) -> Result<Applied, RestoreError> {
    let mut received = Received {
        bytes: 0,
        ended: false,
        files_done: 0,
        files_total,
        progress,
    };
    let mut current: Option<Checksum> = None;
    let mut verified = true;
    let mut txid = 0;
    let mut page_size = 0;
    for key in keys {
        let ltx_err = |source| RestoreError::Ltx {
            replica: replica.to_string(),
            key: key.clone(),
            source,
        };
        received.ended = false;
        let stored = PieceReader {
            rx: &mut rx,
            cur: Bytes::new(),
            received: &mut received,
        };
        // An encrypted file is decrypted as its parts arrive. age authenticates each 64 KiB chunk, and only
        // a cut at a chunk boundary shows no sooner than the end; pages decoded before an error only ever
        // reach the temporary file, which is removed when the restore fails.
        let reader = sealer
            .open_reader(stored)
            .map_err(|source| RestoreError::Seal {
                replica: replica.to_string(),
                key: key.clone(),
                source,
            })?;
        let dec = Decoder::new(reader).map_err(ltx_err)?;
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
        let applied = ltx::apply(dec, image, carry).map_err(ltx_err)?;
        // The decoder read to the end of its input to rule out trailing bytes, so the end marker was seen.
        if !received.ended {
            return Err(ltx_err(ltx::LtxError::TrailingData));
        }
        current = match (declares, overlaps) {
            (false, _) => None,
            (true, false) => applied.checksum,
            (true, true) => applied
                .summary
                .header
                .declared_checksums(&applied.summary.trailer)
                .map(|(_, post)| post),
        };
        received.files_done += 1;
        if let Some(Progress(report)) = &received.progress {
            report(received.files_done, files_total, received.bytes);
        }
        txid = header.max_txid;
        page_size = header.page_size;
    }
    Ok(Applied {
        current,
        verified,
        txid,
        bytes: received.bytes,
        page_size,
    })
}

/// The LTX checksum of the whole restored file, read back from the file (not from what was meant to be
/// written) with large positioned reads, split over up to four threads: the same value as
/// [`ltx::checksum_database`], whose single 8 KiB-buffered pass took most of a second per GiB.
fn checksum_image(file: &File, page_size: u32) -> Result<Checksum, ltx::LtxError> {
    if !ltx::is_valid_page_size(page_size) {
        return Err(ltx::LtxError::InvalidHeader {
            reason: format!("page size {page_size} is not a power of two in 512..=65536"),
        });
    }
    let ps = u64::from(page_size);
    let len = file.metadata()?.len();
    if !len.is_multiple_of(ps) {
        return Err(ltx::LtxError::BadDatabaseImage {
            reason: format!("length {len} is not a multiple of the page size {ps}"),
        });
    }
    let pages = len / ps;
    if pages > u64::from(u32::MAX) {
        return Err(ltx::LtxError::BadDatabaseImage {
            reason: "more than 2^32-1 pages".into(),
        });
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4)) as u64;
    let per_thread = pages.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let from = (t * per_thread).min(pages);
                let to = ((t + 1) * per_thread).min(pages);
                s.spawn(move || checksum_pages(file, page_size, from, to))
            })
            .collect();
        let mut sum = DbChecksum::new();
        for h in handles {
            let part = h
                .join()
                .map_err(|_| std::io::Error::other("a checksum thread panicked"))??;
            sum.toggle(part);
        }
        Ok(sum.value())
    })
}

/// The XOR of the page checksums of pages `from + 1 ..= to` (page numbers start at 1), lock page excluded.
fn checksum_pages(
    file: &File,
    page_size: u32,
    from: u64,
    to: u64,
) -> Result<Checksum, ltx::LtxError> {
    let ps = u64::from(page_size);
    let lock = u64::from(ltx::lock_pgno(page_size));
    let chunk_pages = ((1u64 << 20) / ps).max(1);
    let mut buf = vec![0u8; (chunk_pages * ps) as usize];
    let mut sum = DbChecksum::new();
    let mut p = from;
    while p < to {
        let n = chunk_pages.min(to - p);
        let chunk = &mut buf[..(n * ps) as usize];
        file.read_exact_at(chunk, p * ps)?;
        for (i, page) in chunk.chunks_exact(ps as usize).enumerate() {
            let pgno = p + i as u64 + 1;
            if pgno != lock {
                // `checksum_image` checked that every page number fits in 32 bits.
                sum.add_page(pgno as u32, page);
            }
        }
        p += n;
    }
    Ok(sum.value())
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
        version: crate::capture::STATE_VERSION,
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

fn temp_path(output: &Path) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(".hearth-restore.tmp");
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use hearth_testkit::Garage;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::watch;

    use super::*;
    use crate::config::{DbConfig, replica_from_url};
    use crate::plan::CompactionPolicy;
    use crate::replicate::{ReplicateOptions, replicate_db};

    fn info(size: u64) -> FileInfo {
        FileInfo {
            level: 0,
            min_txid: 1,
            max_txid: 1,
            size,
            timestamp: UNIX_EPOCH,
        }
    }

    #[test]
    fn requests_split_large_files_into_ordered_parts() {
        let whole = |file| Request {
            file,
            range: None,
            last: true,
        };
        let part = |file, r: Range<u64>, last| Request {
            file,
            range: Some(r),
            last,
        };
        let cases: Vec<(Vec<u64>, u64, Vec<Request>)> = vec![
            (vec![], 10, vec![]),
            (vec![0], 10, vec![whole(0)]),
            (vec![19], 10, vec![whole(0)]),
            (
                vec![20],
                10,
                vec![part(0, 0..10, false), part(0, 10..20, true)],
            ),
            (
                vec![5, 25, 7],
                10,
                vec![
                    whole(0),
                    part(1, 0..10, false),
                    part(1, 10..20, false),
                    part(1, 20..25, true),
                    whole(2),
                ],
            ),
        ];
        for (sizes, part_size, want) in cases {
            let plan: Vec<FileInfo> = sizes.iter().map(|&s| info(s)).collect();
            assert_eq!(requests(&plan, part_size), want, "sizes {sizes:?}");
        }
    }

    #[test]
    fn checksum_image_equals_the_single_pass_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        // Pages that differ from each other, and more of them than one 1 MiB chunk per thread holds.
        for (page_size, pages) in [(512u32, 1u64), (512, 9_001), (4096, 700), (65_536, 3)] {
            let data: Vec<u8> = (0..pages * u64::from(page_size))
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            fs::write(&path, &data).unwrap();
            let file = File::open(&path).unwrap();
            assert_eq!(
                checksum_image(&file, page_size).unwrap(),
                ltx::checksum_database(&data[..], page_size).unwrap(),
                "page size {page_size}, {pages} pages"
            );
        }
        fs::write(&path, vec![0u8; 700]).unwrap();
        let file = File::open(&path).unwrap();
        assert!(matches!(
            checksum_image(&file, 512),
            Err(ltx::LtxError::BadDatabaseImage { .. })
        ));
    }

    /// The real store, with faults injected into the ranged reads of one object, keyed by the part's offset.
    struct Faulty<'a> {
        store: &'a Store,
        key: String,
        /// Parts whose first attempt fails as an unreachable store would.
        fail_once: Vec<u64>,
        /// A part that fails every time.
        always_fail: Option<u64>,
        /// A part that arrives with one byte flipped.
        corrupt: Option<u64>,
        /// A part that arrives one byte short.
        shorten: Option<u64>,
        attempts: Mutex<HashMap<u64, u32>>,
    }

    impl<'a> Faulty<'a> {
        fn new(store: &'a Store, key: &str) -> Faulty<'a> {
            Faulty {
                store,
                key: key.to_string(),
                fail_once: Vec::new(),
                always_fail: None,
                corrupt: None,
                shorten: None,
                attempts: Mutex::new(HashMap::new()),
            }
        }

        fn attempts(&self, start: u64) -> u32 {
            self.attempts
                .lock()
                .unwrap()
                .get(&start)
                .copied()
                .unwrap_or(0)
        }
    }

    impl ObjectSource for Faulty<'_> {
        fn name(&self) -> &str {
            self.store.name()
        }

        fn get(&self, key: &str) -> impl Future<Output = Result<Bytes, StoreError>> + Send {
            self.store.get(key)
        }

        fn get_range(
            &self,
            key: &str,
            range: Range<u64>,
        ) -> impl Future<Output = Result<Bytes, StoreError>> + Send {
            let targeted = key == self.key;
            let attempt = if targeted {
                let mut attempts = self.attempts.lock().unwrap();
                let n = attempts.entry(range.start).or_default();
                *n += 1;
                *n
            } else {
                0
            };
            let start = range.start;
            async move {
                if targeted
                    && (self.always_fail == Some(start)
                        || (attempt == 1 && self.fail_once.contains(&start)))
                {
                    return Err(StoreError::Unreachable {
                        store: self.store.name().to_string(),
                        key: key.to_string(),
                        detail: format!("injected failure of the part at {start}"),
                    });
                }
                let data = self.store.get_range(key, range).await?;
                if targeted && self.corrupt == Some(start) {
                    let mut v = data.to_vec();
                    let mid = v.len() / 2;
                    v[mid] ^= 0x5a;
                    return Ok(Bytes::from(v));
                }
                if targeted && self.shorten == Some(start) {
                    return Ok(data.slice(..data.len() - 1));
                }
                Ok(data)
            }
        }
    }

    /// A replica config for `url` with the shared Garage's credentials.
    fn garage_replica(url: &str) -> ReplicaConfig {
        let garage = Garage::shared().unwrap();
        let key = garage.key_id.clone();
        let secret = garage.secret.clone();
        replica_from_url(url, &move |name: &str| match name {
            "LITESTREAM_ACCESS_KEY_ID" => Some(key.clone()),
            "LITESTREAM_SECRET_ACCESS_KEY" => Some(secret.clone()),
            _ => None,
        })
        .unwrap()
    }

    /// A TCP proxy in front of `upstream` that cuts the connection it is serving once, after `cut_after`
    /// bytes in total have gone from the store to the client: a network failure in the middle of a part.
    /// Returns its `http://` endpoint, whether it has cut, and its task (aborted by the caller).
    async fn cutting_proxy(
        upstream: String,
        cut_after: u64,
    ) -> (String, Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set and end with the proxy's task.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cut, sent) = (flag.clone(), sent.clone());
                connections.spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = tokio::io::copy(&mut client_read, &mut server_write);
                    let down = async {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            let n = server_read.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            let total = sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                            if total > cut_after && !cut.swap(true, Ordering::SeqCst) {
                                // Forward part of this read, then drop both sides mid-response.
                                client_write.write_all(&buf[..n / 2]).await?;
                                return Ok(());
                            }
                            client_write.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        (endpoint, cut, task)
    }

    /// A replica in a fresh Garage bucket holding a snapshot of a few MB of random rows and a few level-0
    /// files after it.
    struct Fixture {
        /// The replica's URL (on the shared Garage).
        url: String,
        dir: tempfile::TempDir,
        db: PathBuf,
        replica: ReplicaConfig,
        store: Store,
        layout: Layout,
        plan: Vec<FileInfo>,
    }

    impl Fixture {
        async fn new(hint: &str) -> Fixture {
            Fixture::with_encryption(hint, false).await
        }

        /// With `encrypt`, every object is an age file (needing the identity the replica config carries).
        async fn with_encryption(hint: &str, encrypt: bool) -> Fixture {
            let garage = Garage::shared().unwrap();
            let bucket = garage.new_bucket(hint).unwrap();
            let url = garage.s3_url(&bucket, "app.db");
            let mut replica = garage_replica(&url);
            if encrypt {
                let key = age::x25519::Identity::generate();
                replica.age_recipients = vec![key.to_public().to_string()];
                replica.age_identities =
                    vec![age::secrecy::ExposeSecret::expose_secret(&key.to_string()).to_string()];
            }
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("app.db");
            let writer = rusqlite::Connection::open(&db).unwrap();
            writer.pragma_update(None, "journal_mode", "wal").unwrap();
            writer
                .execute_batch(
                    "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB);
                     BEGIN;
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600)
                     INSERT INTO t (v) SELECT randomblob(4000) FROM n;
                     COMMIT;",
                )
                .unwrap();
            let mut cfg = DbConfig::new(db.clone(), vec![replica.clone()]);
            cfg.monitor_interval = Duration::from_millis(50);
            cfg.replicas[0].sync_interval = Duration::from_millis(50);
            let opts = ReplicateOptions {
                force: false,
                shutdown_budget: Duration::from_secs(4),
                policy: CompactionPolicy::default(),
                metrics: Default::default(),
            };
            let (tx, rx) = watch::channel(false);
            let task = tokio::spawn(replicate_db(cfg, opts, rx));
            tokio::time::sleep(Duration::from_millis(600)).await;
            for _ in 0..3 {
                writer
                    .execute("INSERT INTO t (v) VALUES (randomblob(60000))", [])
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            tx.send(true).unwrap();
            let report = task.await.unwrap().unwrap();
            assert_eq!(report.unflushed(), 0, "{report:?}");
            let store = Store::open(&replica.location).unwrap();
            let layout = Layout::for_location(&replica.location);
            let files = list_files(&store, layout).await.unwrap();
            let plan = plan::restore_plan(&files, Target::Latest).unwrap();
            assert!(plan.len() >= 2, "a snapshot and later files: {plan:?}");
            assert!(plan[0].size > 2 << 20, "{plan:?}");
            Fixture {
                url,
                dir,
                db,
                replica,
                store,
                layout,
                plan,
            }
        }

        /// The key of the snapshot, the file the faults are injected into.
        fn snapshot_key(&self) -> String {
            let f = &self.plan[0];
            self.layout.ltx_key(f.level, f.min_txid, f.max_txid)
        }

        fn options(&self, name: &str) -> RestoreOptions {
            RestoreOptions {
                dry_run: false,
                target: Target::Latest,
                output: self.dir.path().join(name),
                if_db_not_exists: false,
                if_replica_exists: false,
                parallelism: 3,
                progress: None,
            }
        }

        async fn restore_from<S: ObjectSource>(
            &self,
            source: &S,
            opts: &RestoreOptions,
        ) -> Result<Restored, RestoreError> {
            apply_plan(
                &self.replica,
                source,
                self.layout,
                &self.plan,
                opts,
                Tuning {
                    part_size: PART,
                    retry: RetryPolicy {
                        max_attempts: 3,
                        initial_backoff: Duration::from_millis(10),
                        max_backoff: Duration::from_millis(20),
                    },
                },
            )
            .await
        }

        /// Nothing of a failed restore is left beside the output.
        fn assert_nothing_left(&self, output: &Path) {
            assert!(!output.exists());
            let left: Vec<String> = fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.contains("hearth-restore"))
                .collect();
            assert!(left.is_empty(), "{left:?}");
        }
    }

    /// Small parts, so that the snapshot of a few MB is dozens of parts and the later files are several.
    const PART: u64 = 64 << 10;

    fn rows(db: &Path) -> Vec<(i64, Vec<u8>)> {
        let conn = rusqlite::Connection::open(db).unwrap();
        let mut stmt = conn.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn parts_stream_in_order_and_a_failed_part_is_retried() {
        let fx = Fixture::new("restore-retry").await;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut opts = fx.options("clean.db");
        let seen = calls.clone();
        opts.progress = Some(Progress(Arc::new(move |done, total, bytes| {
            seen.lock().unwrap().push((done, total, bytes));
        })));
        let clean = fx.restore_from(&fx.store, &opts).await.unwrap();
        assert!(clean.checksum_verified, "{clean:?}");
        assert_eq!(rows(&opts.output), rows(&fx.db));
        let total: u64 = fx.plan.iter().map(|f| f.size).sum();
        assert_eq!(clean.bytes, total);
        // Progress comes per part as well as per file, and ends with every file and every byte.
        let calls = calls.lock().unwrap().clone();
        assert!(calls.len() > fx.plan.len() + 10, "{} calls", calls.len());
        assert!(
            calls
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].2 <= w[1].2)
        );
        assert_eq!(calls.last(), Some(&(fx.plan.len(), fx.plan.len(), total)));

        // The first attempt of two parts fails, one in the middle of the snapshot and its last one.
        let key = fx.snapshot_key();
        let last = (fx.plan[0].size - 1) / PART * PART;
        let mut faulty = Faulty::new(&fx.store, &key);
        faulty.fail_once = vec![5 * PART, last];
        let opts = fx.options("retried.db");
        let retried = fx.restore_from(&faulty, &opts).await.unwrap();
        assert_eq!(faulty.attempts(5 * PART), 2);
        assert_eq!(faulty.attempts(last), 2);
        assert_eq!(
            faulty.attempts(4 * PART),
            1,
            "other parts are not fetched again"
        );
        assert_eq!(retried.txid, clean.txid);
        assert_eq!(
            fs::read(&opts.output).unwrap(),
            fs::read(fx.dir.path().join("clean.db")).unwrap()
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_part_that_keeps_failing_fails_the_restore_by_name_and_leaves_nothing() {
        let fx = Fixture::new("restore-fail").await;
        let key = fx.snapshot_key();
        let mut faulty = Faulty::new(&fx.store, &key);
        faulty.always_fail = Some(7 * PART);
        let opts = fx.options("out.db");
        let err = fx.restore_from(&faulty, &opts).await.unwrap_err();
        assert!(
            matches!(&err, RestoreError::Download { key: k, .. } if *k == key),
            "{err}"
        );
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(faulty.attempts(7 * PART), 3, "every attempt of the policy");
        fx.assert_nothing_left(&opts.output);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_damaged_or_short_part_is_detected_and_named() {
        let fx = Fixture::new("restore-corrupt").await;
        let key = fx.snapshot_key();
        let mut faulty = Faulty::new(&fx.store, &key);
        faulty.corrupt = Some(9 * PART);
        let opts = fx.options("out.db");
        let err = fx.restore_from(&faulty, &opts).await.unwrap_err();
        assert!(
            matches!(&err, RestoreError::Ltx { key: k, .. } if *k == key),
            "{err}"
        );
        fx.assert_nothing_left(&opts.output);

        let mut faulty = Faulty::new(&fx.store, &key);
        faulty.shorten = Some(3 * PART);
        let err = fx.restore_from(&faulty, &opts).await.unwrap_err();
        assert!(
            matches!(&err, RestoreError::Download { key: k, .. } if *k == key),
            "{err}"
        );
        assert!(err.to_string().contains("shorter than listed"), "{err}");
        fx.assert_nothing_left(&opts.output);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_encrypted_file_is_decrypted_part_by_part_as_it_arrives() {
        let fx = Fixture::with_encryption("restore-sealed", true).await;
        let key = fx.snapshot_key();
        let head = fx.store.get_range(&key, 0..64).await.unwrap();
        assert!(head.starts_with(crate::seal::AGE_MAGIC));
        assert!(fx.plan[0].size >= 2 * PART, "{:?}", fx.plan[0]);
        // A failed part of an encrypted file is retried like any other.
        let mut faulty = Faulty::new(&fx.store, &key);
        faulty.fail_once = vec![2 * PART];
        let opts = fx.options("out.db");
        let restored = fx.restore_from(&faulty, &opts).await.unwrap();
        assert!(restored.checksum_verified);
        assert_eq!(faulty.attempts(2 * PART), 2);
        assert_eq!(rows(&opts.output), rows(&fx.db));

        // A byte flipped in the middle fails that chunk's authentication: the restore fails naming the
        // object and leaves nothing behind.
        let mut faulty = Faulty::new(&fx.store, &key);
        faulty.corrupt = Some(PART);
        let opts = fx.options("damaged.db");
        let err = fx.restore_from(&faulty, &opts).await.unwrap_err();
        assert!(
            matches!(&err, RestoreError::Ltx { key: k, .. } if *k == key),
            "{err}"
        );
        assert!(err.to_string().contains("decrypt"), "{err}");
        fx.assert_nothing_left(&opts.output);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_connection_cut_in_the_middle_of_a_transfer_is_retried() {
        let fx = Fixture::new("restore-cut").await;
        let clean = fx.options("clean.db");
        restore(std::slice::from_ref(&fx.replica), &clean)
            .await
            .unwrap();
        let clean = fs::read(&clean.output).unwrap();
        let garage = Garage::shared().unwrap();
        let upstream = garage.endpoint.trim_start_matches("http://").to_string();

        // Through `restore`: the snapshot of a few MB is one GET at the default part size, cut after 1 MiB
        // (past the listing).
        let (endpoint, cut, proxy) = cutting_proxy(upstream.clone(), 1 << 20).await;
        let replica = garage_replica(&fx.url.replace(&garage.endpoint, &endpoint));
        let opts = fx.options("whole.db");
        let outcome = restore(std::slice::from_ref(&replica), &opts).await;
        proxy.abort();
        assert!(
            cut.load(Ordering::SeqCst),
            "the proxy never cut a connection"
        );
        assert!(
            matches!(outcome, Ok(RestoreOutcome::Restored(ref r)) if r.checksum_verified),
            "{outcome:?}"
        );
        assert_eq!(fs::read(&opts.output).unwrap(), clean);

        // In ranged parts: the cut lands inside one of the snapshot's parts.
        let (endpoint, cut, proxy) = cutting_proxy(upstream, 1 << 20).await;
        let replica = garage_replica(&fx.url.replace(&garage.endpoint, &endpoint));
        let store = Store::open(&replica.location).unwrap();
        let opts = fx.options("parts.db");
        let restored = fx.restore_from(&store, &opts).await;
        proxy.abort();
        assert!(
            cut.load(Ordering::SeqCst),
            "the proxy never cut a connection"
        );
        assert!(restored.is_ok(), "{restored:?}");
        assert_eq!(fs::read(&opts.output).unwrap(), clean);
    }
}
