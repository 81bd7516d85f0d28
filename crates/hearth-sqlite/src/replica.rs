//! One replica of one database: what it holds, uploading level-0 files, compaction, retention and the writer lease.
//!
//! The replica keeps its listing in memory: it lists the store once when it opens and then updates the
//! listing from its own writes and deletions. That is what makes an idle database cost no request at all
//! (Litestream 0.5 lists every 15 s to find level-0 files to delete, #1171).
//!
//! Memory does not grow with the database: every LTX file goes from a local file to the store as a stream
//! (`Store::put_file`, multipart above one part), and seeding and compaction build their output in a
//! temporary file beside the meta directory, merging their inputs page by page from downloaded copies. The
//! temporary files live on the database's disk, not in `/tmp`, which is often a RAM-backed tmpfs.

use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hearth_store::{Location, PutOptions, PutOutcome, Store, StoreError};

use crate::layout::{FileInfo, HEARTH_PREFIX, Layout, SNAPSHOT_LEVEL};
use crate::ltx::{self, CompactOptions, Decoder, HEADER_SIZE};
use crate::plan::{self, CompactionClock, CompactionPolicy, Maintenance};
use crate::seal::{SealError, Sealer};

/// How long a writer's lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// Why a replica operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica {replica}: {source}")]
    Store { replica: String, source: StoreError },
    #[error("replica {replica}: LTX file {key} is damaged: {source}")]
    Ltx {
        replica: String,
        key: String,
        source: ltx::LtxError,
    },
    #[error(
        "replica {replica} is being written by another replicator ({holder}); two writers on one replica path \
         make it unrestorable. Stop the other one, or give this database another replica path"
    )]
    LeaseHeld { replica: String, holder: String },
    #[error(
        "replica {replica} already holds {files} LTX files up to TXID {max_txid:#x}, but this database has no \
         history with it. Replicating would put this database's contents on top of the replica's history. \
         Restore from the replica first (`hearth sqlite restore`), or pass --force to start a new image on top"
    )]
    NotEmpty {
        replica: String,
        files: usize,
        max_txid: u64,
    },
    #[error("replica {replica}: {what}: {source}")]
    Io {
        replica: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("replica {replica}: {source}")]
    Seal { replica: String, source: SealError },
    #[error("replica {replica}: a background task failed: {detail}")]
    Task { replica: String, detail: String },
}

impl ReplicaError {
    /// Whether trying again later can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicaError::Store { source, .. } => source.is_retryable(),
            ReplicaError::Io { .. } => true,
            _ => false,
        }
    }
}

/// The lease object that marks who writes a replica (docs/formats/replica.md).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    pub version: u32,
    /// A random id for one replicator process's hold on this replica.
    pub holder: String,
    pub hostname: String,
    pub pid: u32,
    /// Milliseconds since the epoch after which another writer may take over.
    pub expires_ms: i64,
}

impl Lease {
    /// Whether the holder is a process on this host that no longer runs (it crashed or was killed), so its
    /// lease need not be waited out. A holder on another host is never presumed gone before expiry.
    pub fn holder_is_gone(&self) -> bool {
        self.hostname == hostname() && !Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// A replica as seen by one replicator.
pub struct Replica {
    pub name: String,
    store: Store,
    layout: Layout,
    files: Vec<FileInfo>,
    /// Highest TXID uploaded from this process's local level-0 files.
    uploaded: u64,
    pos_path: PathBuf,
    /// `pos_path`, open for rewriting in place (see `save_position`), and its length; opened on first use.
    pos_file: Option<(std::fs::File, u64)>,
    /// Where temporary files of this replica go: the meta directory's `replicas/`, named
    /// `.tmp.<replica>.<random>`.
    tmp_dir: PathBuf,
    clock: CompactionClock,
    policy: CompactionPolicy,
    holder: String,
    lease_etag: Option<String>,
    lease_expires: SystemTime,
    conditional: Option<bool>,
    sealer: Sealer,
    pub last_upload: Option<SystemTime>,
    /// When uploads must be done by (the final flush's budget); see `PutOptions::deadline`.
    deadline: Option<tokio::time::Instant>,
}

impl Replica {
    /// Opens a replica and lists what it holds (the only listing for its life).
    pub async fn open(
        name: &str,
        location: &Location,
        meta: &Path,
        policy: CompactionPolicy,
        sealer: Sealer,
    ) -> Result<Replica, ReplicaError> {
        let store = Store::open(location).map_err(|source| ReplicaError::Store {
            replica: name.to_string(),
            source,
        })?;
        let layout = Layout::for_location(location);
        let mut replica = Replica {
            name: name.to_string(),
            store,
            layout,
            files: Vec::new(),
            uploaded: 0,
            pos_path: position_path(meta, name),
            pos_file: None,
            tmp_dir: meta.join("replicas"),
            clock: start_clock(&policy_levels(&policy)),
            policy,
            holder: random_id(),
            lease_etag: None,
            lease_expires: UNIX_EPOCH,
            conditional: None,
            sealer,
            last_upload: None,
            deadline: None,
        };
        replica.remove_stale_temporaries();
        replica.files = list_files(&replica.store, layout)
            .await
            .map_err(|e| replica.store_error(e))?;
        replica.uploaded = std::fs::read(&replica.pos_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ReplicaPosition>(&b).ok())
            .map_or(0, |p| p.txid)
            .min(replica.max_txid());
        Ok(replica)
    }

    /// Uploads files larger than `bytes` in parts of `bytes` (the default is
    /// [`hearth_store::DEFAULT_PART_SIZE`]); for tests that need multipart uploads of small databases, and
    /// for tuning.
    pub fn set_part_size(&mut self, bytes: usize) {
        self.store = self.store.clone().with_part_size(bytes);
    }

    /// The key layout of this replica.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The store behind this replica.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What the replica holds, as far as this replicator knows.
    pub fn files(&self) -> &[FileInfo] {
        &self.files
    }

    /// The highest TXID the replica holds.
    pub fn max_txid(&self) -> u64 {
        self.files.iter().map(|f| f.max_txid).max().unwrap_or(0)
    }

    /// The highest TXID uploaded to this replica.
    pub fn uploaded(&self) -> u64 {
        self.uploaded
    }

    /// Makes every later upload stop by `deadline`: a multipart upload still sending parts then is aborted
    /// and fails as retryable, rather than being cut off by the caller and left unfinished in the bucket.
    pub fn set_deadline(&mut self, deadline: Option<tokio::time::Instant>) {
        self.deadline = deadline;
    }

    /// Marks everything up to `txid` as already on the replica (after a restore from it).
    pub fn set_uploaded(&mut self, txid: u64) -> Result<(), ReplicaError> {
        self.uploaded = txid;
        self.save_position()
    }

    /// Refuses to write a fresh history over a replica that holds someone's data.
    pub fn check_fresh_start(&self, local_txid: u64) -> Result<(), ReplicaError> {
        let max_txid = self.max_txid();
        if local_txid == 0 && max_txid > 0 {
            return Err(ReplicaError::NotEmpty {
                replica: self.name.clone(),
                files: self.files.len(),
                max_txid,
            });
        }
        Ok(())
    }

    /// Takes or renews the writer lease when it is due; no request while it is fresh.
    pub async fn ensure_lease(&mut self) -> Result<(), ReplicaError> {
        let now = SystemTime::now();
        if self.lease_etag.is_some() && now + LEASE_TTL / 2 < self.lease_expires {
            return Ok(());
        }
        let key = format!("{HEARTH_PREFIX}/lease.json");
        if self.conditional.is_none() {
            self.conditional = Some(self.probe_once().await?);
        }
        let current = match self.store.get(&key).await {
            Ok(bytes) => serde_json::from_slice::<Lease>(&bytes).ok(),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(self.store_error(e)),
        };
        if let Some(lease) = &current
            && lease.holder != self.holder
            && lease.expires_ms > ms(now)
            && !lease.holder_is_gone()
        {
            return Err(ReplicaError::LeaseHeld {
                replica: self.name.clone(),
                holder: format!(
                    "{} pid {} until {} ms",
                    lease.hostname, lease.pid, lease.expires_ms
                ),
            });
        }
        let expires = now + LEASE_TTL;
        let lease = Lease {
            version: 1,
            holder: self.holder.clone(),
            hostname: hostname(),
            pid: std::process::id(),
            expires_ms: ms(expires),
        };
        let body = Bytes::from(serde_json::to_vec(&lease).unwrap_or_default());
        let conditional = self.conditional == Some(true);
        let head = if conditional && current.is_some() {
            Some(
                self.store
                    .head(&key)
                    .await
                    .map_err(|e| self.store_error(e))?,
            )
        } else {
            None
        };
        let outcome = match (conditional, head.as_ref().and_then(|h| h.etag.clone())) {
            (true, Some(etag)) => {
                self.store
                    .put_if_match(&key, &etag, body, PutOptions::default())
                    .await
            }
            (true, None) => {
                self.store
                    .put_if_absent(&key, body, PutOptions::default())
                    .await
            }
            (false, _) => self.store.put(&key, body, PutOptions::default()).await,
        }
        .map_err(|e| self.store_error(e))?;
        match outcome {
            PutOutcome::Written { etag } => {
                self.lease_etag = Some(etag.unwrap_or_default());
                self.lease_expires = expires;
            }
            PutOutcome::PreconditionFailed => {
                return Err(ReplicaError::LeaseHeld {
                    replica: self.name.clone(),
                    holder: "a writer that changed the lease at the same moment".into(),
                });
            }
        }
        if !conditional {
            // Without conditional writes, read the lease back: a second writer that wrote after us shows here.
            let back = self
                .store
                .get(&key)
                .await
                .map_err(|e| self.store_error(e))?;
            let back: Option<Lease> = serde_json::from_slice(&back).ok();
            if let Some(other) = back.filter(|l| l.holder != self.holder) {
                return Err(ReplicaError::LeaseHeld {
                    replica: self.name.clone(),
                    holder: format!("{} pid {}", other.hostname, other.pid),
                });
            }
        }
        Ok(())
    }

    /// Whether the store enforces conditional writes, probed once per bucket and process (the store shares the
    /// answer between every store on one bucket, and callers that arrive during the probe wait for it): a
    /// hundred databases on one bucket cost one probe and one warning, not a hundred.
    async fn probe_once(&self) -> Result<bool, ReplicaError> {
        let probe = self
            .store
            .conditional_writes()
            .await
            .map_err(|e| self.store_error(e))?;
        if probe.probed_now && !probe.supported {
            tracing::warn!(
                store = %self.store.name(),
                "the store ignores conditional writes; hearth detects a second writer by re-reading its lease, \
                 which leaves a short window in which two writers can both proceed"
            );
        }
        Ok(probe.supported)
    }

    /// Gives the lease up so the next writer need not wait for it to expire.
    pub async fn release_lease(&mut self) {
        if self.lease_etag.take().is_some() {
            let key = format!("{HEARTH_PREFIX}/lease.json");
            if let Ok(bytes) = self.store.get(&key).await
                && serde_json::from_slice::<Lease>(&bytes).is_ok_and(|l| l.holder == self.holder)
            {
                let _ = self.store.delete(&key).await;
            }
        }
    }

    /// Uploads local level-0 files after the replica's position, up to `upto`, one object each.
    pub async fn upload(
        &mut self,
        local: &[(u64, PathBuf)],
        upto: u64,
    ) -> Result<usize, ReplicaError> {
        let mut count = 0;
        for (txid, path) in local {
            if *txid <= self.uploaded || *txid > upto {
                continue;
            }
            self.ensure_lease().await?;
            self.put_ltx_file(0, *txid, *txid, path).await?;
            self.uploaded = *txid;
            self.last_upload = Some(SystemTime::now());
            count += 1;
        }
        if count > 0 {
            self.save_position()?;
        }
        Ok(count)
    }

    /// Gives an empty replica its first snapshot: the full image captured as `txid` (a local level-0 file),
    /// re-labelled as the snapshot `1..=txid` so that restores from this replica can start there.
    pub async fn seed(&mut self, full_image: &Path, txid: u64) -> Result<(), ReplicaError> {
        self.ensure_lease().await?;
        let out = self.temp_file()?;
        let (name, source, target) = (
            self.name.clone(),
            full_image.to_path_buf(),
            out.path().to_path_buf(),
        );
        self.blocking(move || relabel_as_snapshot(&name, &source, &target, txid))
            .await?;
        self.put_ltx_file(SNAPSHOT_LEVEL, 1, txid, out.path())
            .await?;
        self.uploaded = txid;
        self.last_upload = Some(SystemTime::now());
        self.save_position()?;
        tracing::info!(replica = %self.name, txid, "seeded an empty replica with a snapshot");
        Ok(())
    }

    /// Runs due compaction and retention, one step at a time, until nothing is due.
    pub async fn maintain(&mut self, now: SystemTime) -> Result<Vec<Maintenance>, ReplicaError> {
        let mut done = Vec::new();
        while let Some(step) = plan::next_maintenance(&self.files, &self.policy, &self.clock, now) {
            self.ensure_lease().await?;
            match &step {
                Maintenance::Compact {
                    level,
                    inputs,
                    min_txid,
                    max_txid,
                } => {
                    self.compact(*level, inputs, *min_txid, *max_txid).await?;
                    self.clock.mark(*level, now);
                }
                Maintenance::Delete { files } => {
                    for f in files {
                        let key = self.layout.ltx_key(f.level, f.min_txid, f.max_txid);
                        match self.store.delete(&key).await {
                            Ok(()) => {}
                            Err(e) if e.is_not_found() => {}
                            Err(e) => return Err(self.store_error(e)),
                        }
                        self.files.retain(|x| x != f);
                    }
                }
            }
            done.push(step);
            if done.len() > 64 {
                break;
            }
        }
        Ok(done)
    }

    async fn compact(
        &mut self,
        level: u8,
        inputs: &[FileInfo],
        min_txid: u64,
        max_txid: u64,
    ) -> Result<(), ReplicaError> {
        // Inputs are downloaded one after another into one temporary file and merged page by page (every
        // file's pages are sorted by page number), so memory holds one page per input whatever the files'
        // sizes; a snapshot of the whole database is compacted like a few minutes of changes. One file for
        // all inputs, not one each: creating and deleting a file per input cost more than the merge.
        let inputs_file = self.temp_file()?;
        let mut sources = Vec::with_capacity(inputs.len());
        let mut offset = 0;
        for f in inputs {
            let key = self.layout.ltx_key(f.level, f.min_txid, f.max_txid);
            let len = self
                .store
                .download_to(&key, inputs_file.as_file())
                .await
                .map_err(|e| self.store_error(e))?;
            sources.push(MergeInput { key, offset, len });
            offset += len;
        }
        let out = self.temp_file()?;
        let out_key = self.layout.ltx_key(level, min_txid, max_txid);
        let name = self.name.clone();
        let sealer = self.sealer.clone();
        let inputs_path = inputs_file.path().to_path_buf();
        let target = out.path().to_path_buf();
        self.blocking(move || {
            merge_files(&name, &sealer, &inputs_path, &sources, &out_key, &target)
        })
        .await?;
        drop(inputs_file);
        self.put_ltx_file(level, min_txid, max_txid, out.path())
            .await
    }

    /// Stores the LTX file at `plain` as the replica's file at `level` (sealed when the replica is encrypted),
    /// with its header's timestamp as the object's timestamp, and records it in the listing. Every write of
    /// an LTX file goes through here; the file is streamed, never read whole.
    async fn put_ltx_file(
        &mut self,
        level: u8,
        min_txid: u64,
        max_txid: u64,
        plain: &Path,
    ) -> Result<(), ReplicaError> {
        let key = self.layout.ltx_key(level, min_txid, max_txid);
        let io = |source| ReplicaError::Io {
            replica: self.name.clone(),
            what: "read an LTX file to upload",
            source,
        };
        let mut prefix = [0u8; HEADER_SIZE];
        std::fs::File::open(plain)
            .and_then(|mut file| file.read_exact(&mut prefix))
            .map_err(io)?;
        let header = ltx::peek_header(&prefix).map_err(|source| ReplicaError::Ltx {
            replica: self.name.clone(),
            key: key.clone(),
            source,
        })?;
        let timestamp = UNIX_EPOCH + Duration::from_millis(header.timestamp_ms.max(0) as u64);
        // A sealed copy is written beside the meta directory and streamed from there.
        let sealed = if self.sealer.encrypts() {
            let out = self.temp_file()?;
            let (name, sealer, source, target) = (
                self.name.clone(),
                self.sealer.clone(),
                plain.to_path_buf(),
                out.path().to_path_buf(),
            );
            self.blocking(move || seal_file(&name, &sealer, &source, &target))
                .await?;
            Some(out)
        } else {
            None
        };
        let upload = sealed.as_ref().map_or(plain, |t| t.path());
        let size = std::fs::metadata(upload).map_err(io)?.len();
        self.store
            .put_file(
                &key,
                upload,
                PutOptions {
                    timestamp: Some(timestamp),
                    deadline: self.deadline,
                },
            )
            .await
            .map_err(|e| self.store_error(e))?;
        self.files.push(FileInfo {
            level,
            min_txid,
            max_txid,
            size,
            timestamp,
        });
        Ok(())
    }

    /// The header of one LTX file of the replica, read with a ranged GET of its start (decrypted when it is
    /// sealed) rather than the whole object, which for a snapshot is the whole database.
    pub async fn read_header(&self, f: &FileInfo) -> Result<ltx::Header, ReplicaError> {
        let key = self.layout.ltx_key(f.level, f.min_txid, f.max_txid);
        let ltx_err = |source| ReplicaError::Ltx {
            replica: self.name.clone(),
            key: key.clone(),
            source,
        };
        let start = self
            .store
            .get_range(&key, 0..HEADER_SIZE as u64)
            .await
            .map_err(|e| self.store_error(e))?;
        if !start.starts_with(SEALED_MAGIC) {
            return ltx::peek_header(&start).map_err(ltx_err);
        }
        // The header is in the first zstd block (at most 128 KiB compressed), which is in the first few age
        // chunks (64 KiB each) after the age header.
        let start = self
            .store
            .get_range(&key, 0..SEALED_HEADER_RANGE)
            .await
            .map_err(|e| self.store_error(e))?;
        let mut reader = self
            .sealer
            .open_reader(&start[..])
            .map_err(|source| self.seal_error(source))?;
        let mut prefix = [0u8; HEADER_SIZE];
        reader
            .read_exact(&mut prefix)
            .map_err(|e| ltx_err(ltx::LtxError::Io(e)))?;
        ltx::peek_header(&prefix).map_err(ltx_err)
    }

    /// A new temporary file of this replica beside the meta directory, removed when dropped.
    fn temp_file(&self) -> Result<tempfile::NamedTempFile, ReplicaError> {
        let io = |source| ReplicaError::Io {
            replica: self.name.clone(),
            what: "create a temporary file in the meta directory",
            source,
        };
        std::fs::create_dir_all(&self.tmp_dir).map_err(io)?;
        tempfile::Builder::new()
            .prefix(&temp_prefix(&self.name))
            .tempfile_in(&self.tmp_dir)
            .map_err(io)
    }

    /// Removes temporary files a killed replicator left (they are removed on drop otherwise). Only this
    /// replica's: the prefix holds its name.
    fn remove_stale_temporaries(&self) {
        let prefix = temp_prefix(&self.name);
        let Ok(entries) = std::fs::read_dir(&self.tmp_dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix)
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a stale temporary file");
            }
        }
    }

    /// Runs blocking file work (encoding, merging, sealing) on tokio's blocking pool and waits for it.
    async fn blocking<F>(&self, work: F) -> Result<(), ReplicaError>
    where
        F: FnOnce() -> Result<(), ReplicaError> + Send + 'static,
    {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| ReplicaError::Task {
                replica: self.name.clone(),
                detail: e.to_string(),
            })?
    }

    /// Reads one LTX file of the replica, decrypted when the replica is encrypted.
    pub async fn read_file(&self, f: &FileInfo) -> Result<Vec<u8>, ReplicaError> {
        let key = self.layout.ltx_key(f.level, f.min_txid, f.max_txid);
        let stored = self
            .store
            .get(&key)
            .await
            .map_err(|e| self.store_error(e))?;
        self.sealer
            .open(&stored)
            .map_err(|source| self.seal_error(source))
    }

    fn seal_error(&self, source: SealError) -> ReplicaError {
        ReplicaError::Seal {
            replica: self.name.clone(),
            source,
        }
    }

    fn save_position(&mut self) -> Result<(), ReplicaError> {
        let io = |source| ReplicaError::Io {
            replica: self.name.clone(),
            what: "save the replica position",
            source,
        };
        let position = ReplicaPosition {
            txid: self.uploaded,
            uploaded_at_ms: self.last_upload.map(ms),
        };
        let mut body = serde_json::to_vec(&position).unwrap_or_default();
        // Padded with spaces (which JSON allows after the value) to a fixed size, so the file is rewritten
        // in place, through one descriptor kept open: no new file, rename or freed blocks per upload, which
        // with a hundred databases each uploading every second cost about a twentieth of the replicator's
        // time. Not fsynced: this file only saves work. If a crash loses or tears it, the position falls
        // back to an older one (never past what the replica holds, see `open`; a torn file reads as none)
        // and the same immutable level-0 files are uploaded again.
        body.resize(body.len().max(POSITION_FILE_SIZE), b' ');
        if self.pos_file.is_none() {
            if let Some(dir) = self.pos_path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.pos_path)
                .map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            self.pos_file = Some((file, len));
        }
        let Some((file, len)) = &mut self.pos_file else {
            return Ok(());
        };
        std::os::unix::fs::FileExt::write_all_at(&*file, &body, 0).map_err(io)?;
        // A file of another length (written unpadded by a restore, or holding a longer body) is set to this
        // body's; the padding keeps the length the same otherwise.
        if *len != body.len() as u64 {
            file.set_len(body.len() as u64).map_err(io)?;
            *len = body.len() as u64;
        }
        Ok(())
    }

    fn store_error(&self, source: StoreError) -> ReplicaError {
        ReplicaError::Store {
            replica: self.name.clone(),
            source,
        }
    }
}

/// The first bytes of a sealed (age) object.
const SEALED_MAGIC: &[u8] = b"age-encryption.org/v1";

/// How much of a sealed object `read_header` fetches: the age header, and enough age chunks to hold the first
/// zstd block (128 KiB at most), which holds the LTX header.
const SEALED_HEADER_RANGE: u64 = 512 * 1024;

/// The name prefix of replica `name`'s temporary files. Dots cannot occur in a sanitized name, so no replica's
/// prefix is the start of another's.
/// Makes an I/O error of replica `replica` while doing `what`, for `map_err`.
fn io_error<'a>(
    replica: &'a str,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> ReplicaError + 'a {
    move |source| ReplicaError::Io {
        replica: replica.to_string(),
        what,
        source,
    }
}

fn temp_prefix(name: &str) -> String {
    format!(".tmp.{}.", sanitize(name))
}

/// Writes the full image at `source` (a level-0 file with `min = max = txid`) to `target` as the snapshot
/// `1..=txid`: same pages, header re-labelled, hearth's post-apply checksum kept. Streams page by page.
fn relabel_as_snapshot(
    replica: &str,
    source: &Path,
    target: &Path,
    txid: u64,
) -> Result<(), ReplicaError> {
    let io = |what: &'static str| io_error(replica, what);
    let ltx_err = |e| ReplicaError::Ltx {
        replica: replica.to_string(),
        key: source.display().to_string(),
        source: e,
    };
    let input = std::fs::File::open(source).map_err(io("read the full image"))?;
    let mut dec = Decoder::new(input).map_err(ltx_err)?;
    let h = *dec.header();
    let post_apply = h.hearth.map(|x| x.post_apply).ok_or_else(|| {
        ltx_err(ltx::LtxError::InvalidHeader {
            reason: "a full image must carry hearth's checksums".into(),
        })
    })?;
    let header = ltx::Header {
        min_txid: 1,
        max_txid: txid,
        hearth: Some(ltx::HearthChecksums {
            pre_apply: ltx::Checksum(0),
            post_apply,
        }),
        ..h
    };
    let output = std::fs::File::create(target).map_err(io("write the snapshot"))?;
    let mut enc = ltx::Encoder::new(BufWriter::new(output), header).map_err(ltx_err)?;
    let mut page = vec![0u8; h.page_size as usize];
    while let Some(pgno) = dec.next_page(&mut page).map_err(ltx_err)? {
        enc.write_page(pgno, &page).map_err(ltx_err)?;
    }
    dec.finish().map_err(ltx_err)?;
    let finished = enc.finish(ltx::Checksum(0)).map_err(ltx_err)?;
    let mut writer = finished.writer;
    writer.flush().map_err(io("write the snapshot"))
}

/// Merges the downloaded LTX files `sources` (key and local copy, oldest first; sealed or plain) into the
/// plain LTX file `target`, streaming: one page per input in memory.
/// Where one compaction input lies in the file its inputs were downloaded into.
struct MergeInput {
    key: String,
    offset: u64,
    len: u64,
}

fn merge_files(
    replica: &str,
    sealer: &Sealer,
    inputs_path: &Path,
    sources: &[MergeInput],
    out_key: &str,
    target: &Path,
) -> Result<(), ReplicaError> {
    let io = |what: &'static str| io_error(replica, what);
    let ltx_err = |key: &str, source| ReplicaError::Ltx {
        replica: replica.to_string(),
        key: key.to_string(),
        source,
    };
    let mut decoders = Vec::with_capacity(sources.len());
    for input in sources {
        let mut file =
            std::fs::File::open(inputs_path).map_err(io("read a downloaded LTX file"))?;
        file.seek(std::io::SeekFrom::Start(input.offset))
            .map_err(io("read a downloaded LTX file"))?;
        let key = &input.key;
        let reader = sealer
            .open_reader(BufReader::new(file.take(input.len)))
            .map_err(|source| ReplicaError::Seal {
                replica: replica.to_string(),
                source,
            })?;
        decoders.push(Decoder::new(reader).map_err(|e| ltx_err(key, e))?);
    }
    let output = std::fs::File::create(target).map_err(io("write the compacted file"))?;
    let finished = ltx::compact(decoders, BufWriter::new(output), CompactOptions::default())
        .map_err(|e| ltx_err(out_key, e))?;
    let mut writer = finished.writer;
    writer.flush().map_err(io("write the compacted file"))
}

/// Seals the LTX file at `source` into `target`, streaming.
fn seal_file(
    replica: &str,
    sealer: &Sealer,
    source: &Path,
    target: &Path,
) -> Result<(), ReplicaError> {
    let io = |source| ReplicaError::Io {
        replica: replica.to_string(),
        what: "seal an LTX file",
        source,
    };
    let input = std::fs::File::open(source).map_err(io)?;
    let output = std::fs::File::create(target).map_err(io)?;
    let mut writer = sealer
        .seal_to(BufReader::new(input), BufWriter::new(output))
        .map_err(|source| ReplicaError::Seal {
            replica: replica.to_string(),
            source,
        })?;
    writer.flush().map_err(io)
}

/// The compaction clock of a replicator that just started: levels 1.. count as compacted now, so a restart
/// (every redeploy) does not copy the newest files up through every level at once. Snapshots are left out:
/// their schedule follows the snapshot files' own timestamps, and frequent restarts must not postpone them.
fn start_clock(levels: &[u8]) -> CompactionClock {
    let mut clock = CompactionClock::default();
    let now = SystemTime::now();
    for &level in levels {
        clock.mark(level, now);
    }
    clock
}

fn policy_levels(policy: &CompactionPolicy) -> Vec<u8> {
    (1..=policy.levels.len())
        .filter_map(|l| u8::try_from(l).ok())
        .collect()
}

/// Lists every LTX file a replica holds, at every level.
pub async fn list_files(store: &Store, layout: Layout) -> Result<Vec<FileInfo>, StoreError> {
    let mut files = Vec::new();
    for level in 0..=SNAPSHOT_LEVEL {
        for object in store.list(&layout.level_prefix(level)).await? {
            if let Some((min_txid, max_txid)) = layout.parse_key(level, &object.key) {
                files.push(FileInfo {
                    level,
                    min_txid,
                    max_txid,
                    size: object.size,
                    timestamp: object.timestamp,
                });
            }
        }
    }
    Ok(files)
}

/// What `replicas/<name>.json` in the meta directory holds (docs/formats/local-state.md).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ReplicaPosition {
    pub txid: u64,
    /// When the last upload to this replica succeeded, in milliseconds since the epoch.
    #[serde(default)]
    pub uploaded_at_ms: Option<i64>,
}

/// Where the position of replica `name` is kept in a meta directory.
/// The size `replicas/<name>.json` is padded to, so that it can be rewritten in place.
const POSITION_FILE_SIZE: usize = 96;

pub fn position_path(meta: &Path, name: &str) -> PathBuf {
    meta.join("replicas")
        .join(format!("{}.json", sanitize(name)))
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process; mixing in time and pid makes ids unique across hosts
    // without another dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
