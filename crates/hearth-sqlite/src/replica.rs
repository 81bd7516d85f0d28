//! One replica of one database: what it holds, uploading level-0 files, compaction, retention and the writer lease.
//!
//! The replica keeps its listing in memory: it lists the store once when it opens and then updates the
//! listing from its own writes and deletions. That is what makes an idle database cost no request at all
//! (Litestream 0.5 lists every 15 s to find level-0 files to delete, #1171).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hearth_store::{Location, PutOptions, PutOutcome, Store, StoreError};

use crate::layout::{FileInfo, HEARTH_PREFIX, Layout, SNAPSHOT_LEVEL};
use crate::ltx::{self, CompactOptions, Decoder};
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
    clock: CompactionClock,
    policy: CompactionPolicy,
    holder: String,
    lease_etag: Option<String>,
    lease_expires: SystemTime,
    conditional: Option<bool>,
    /// What conditional-write support depends on: the endpoint and bucket, not the prefix.
    probe_key: String,
    sealer: Sealer,
    pub last_upload: Option<SystemTime>,
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
            clock: start_clock(&policy_levels(&policy)),
            policy,
            holder: random_id(),
            lease_etag: None,
            lease_expires: UNIX_EPOCH,
            conditional: None,
            probe_key: match location {
                Location::File { root } => format!("file://{}", root.display()),
                Location::S3(s3) => format!("s3://{} at {:?}", s3.bucket, s3.endpoint),
            },
            sealer,
            last_upload: None,
        };
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

    /// Whether the store enforces conditional writes, probed once per store and process: a hundred databases
    /// on one bucket cost one probe and one warning, not a hundred.
    async fn probe_once(&self) -> Result<bool, ReplicaError> {
        static PROBED: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<String, bool>>,
        > = std::sync::OnceLock::new();
        let probed = PROBED.get_or_init(Default::default);
        let name = self.probe_key.clone();
        if let Some(known) = probed.lock().ok().and_then(|m| m.get(&name).copied()) {
            return Ok(known);
        }
        let probe = self
            .store
            .probe_conditional_writes()
            .await
            .map_err(|e| self.store_error(e))?;
        if !probe {
            tracing::warn!(
                store = %name,
                "the store ignores conditional writes; hearth detects a second writer by re-reading its lease, \
                 which leaves a short window in which two writers can both proceed"
            );
        }
        if let Ok(mut m) = probed.lock() {
            m.insert(name, probe);
        }
        Ok(probe)
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
            let data = tokio::fs::read(path)
                .await
                .map_err(|source| ReplicaError::Io {
                    replica: self.name.clone(),
                    what: "read a level-0 file",
                    source,
                })?;
            self.put_ltx(0, *txid, *txid, data).await?;
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
        let data = tokio::fs::read(full_image)
            .await
            .map_err(|source| ReplicaError::Io {
                replica: self.name.clone(),
                what: "read the full image",
                source,
            })?;
        let ltx_err = |source| ReplicaError::Ltx {
            replica: self.name.clone(),
            key: full_image.display().to_string(),
            source,
        };
        let mut dec = Decoder::new(Cursor::new(data.as_slice())).map_err(ltx_err)?;
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
        let mut enc = ltx::Encoder::new(Vec::new(), header).map_err(ltx_err)?;
        let mut page = vec![0u8; h.page_size as usize];
        while let Some(pgno) = dec.next_page(&mut page).map_err(ltx_err)? {
            enc.write_page(pgno, &page).map_err(ltx_err)?;
        }
        dec.finish().map_err(ltx_err)?;
        let finished = enc.finish(ltx::Checksum(0)).map_err(ltx_err)?;
        self.put_ltx(SNAPSHOT_LEVEL, 1, txid, finished.writer)
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
        // Inputs are read whole into memory: level 1-3 files hold a few minutes of changes. Snapshots hold the
        // whole database; streaming them is future work (see ARCHITECTURE.md).
        let mut blobs = Vec::with_capacity(inputs.len());
        for f in inputs {
            let key = self.layout.ltx_key(f.level, f.min_txid, f.max_txid);
            blobs.push((key, self.read_file(f).await?));
        }
        let mut decoders = Vec::with_capacity(blobs.len());
        for (key, blob) in &blobs {
            decoders.push(
                Decoder::new(Cursor::new(blob.as_slice())).map_err(|source| ReplicaError::Ltx {
                    replica: self.name.clone(),
                    key: key.clone(),
                    source,
                })?,
            );
        }
        let out_key = self.layout.ltx_key(level, min_txid, max_txid);
        let finished =
            ltx::compact(decoders, Vec::new(), CompactOptions::default()).map_err(|source| {
                ReplicaError::Ltx {
                    replica: self.name.clone(),
                    key: out_key.clone(),
                    source,
                }
            })?;
        self.put_ltx(level, min_txid, max_txid, finished.writer)
            .await
    }

    /// Stores one LTX file at `level` (sealed when the replica is encrypted), with its header's timestamp as the
    /// object's timestamp, and records it in the listing. Every write of an LTX file goes through here.
    async fn put_ltx(
        &mut self,
        level: u8,
        min_txid: u64,
        max_txid: u64,
        plain: Vec<u8>,
    ) -> Result<(), ReplicaError> {
        let key = self.layout.ltx_key(level, min_txid, max_txid);
        let header = ltx::peek_header(&plain).map_err(|source| ReplicaError::Ltx {
            replica: self.name.clone(),
            key: key.clone(),
            source,
        })?;
        let timestamp = UNIX_EPOCH + Duration::from_millis(header.timestamp_ms.max(0) as u64);
        let sealed = self
            .sealer
            .seal(plain)
            .map_err(|source| self.seal_error(source))?;
        let size = sealed.len() as u64;
        self.store
            .put(
                &key,
                Bytes::from(sealed),
                PutOptions {
                    timestamp: Some(timestamp),
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

    fn save_position(&self) -> Result<(), ReplicaError> {
        let io = |source| ReplicaError::Io {
            replica: self.name.clone(),
            what: "save the replica position",
            source,
        };
        if let Some(dir) = self.pos_path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let position = ReplicaPosition {
            txid: self.uploaded,
            uploaded_at_ms: self.last_upload.map(ms),
        };
        let body = serde_json::to_vec(&position).unwrap_or_default();
        // Renamed into place but not fsynced: this file only saves work. If a crash loses it, the position
        // falls back to an older one (never past what the replica holds, see `open`) and the same immutable
        // level-0 files are uploaded again. Two fsyncs per upload per database are what it would cost.
        let tmp = self.pos_path.with_extension("json.tmp");
        std::fs::write(&tmp, &body).map_err(io)?;
        std::fs::rename(&tmp, &self.pos_path).map_err(io)
    }

    fn store_error(&self, source: StoreError) -> ReplicaError {
        ReplicaError::Store {
            replica: self.name.clone(),
            source,
        }
    }
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
