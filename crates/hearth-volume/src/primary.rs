//! The primary side of the link (`hearth volume push`): capture the volume, remember the snapshot,
//! and bring each standby to it over TLS, sending only the chunks the standby lacks. Also the
//! loops for `--every` and `--continuous`.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::capture::{
    CaptureCache, CaptureOptions, CaptureReport, Sink, Streamed, capture, capture_streaming,
};
use crate::diff::{ChunkWant, read_chunk};
use crate::durable::{Existing, write_atomic};
use crate::error::VolumeError;
use crate::manifest::{ChunkId, Manifest, TreeHash};
use crate::metrics::{Metrics, ReasonLabels, StandbyLabels, SyncLabels, VolumeLabels};
use crate::net::NetError;
use crate::net::identity::{Identity, PeerId, server_name};
use crate::net::wire::{
    self, Applied, BtrfsFirst, Hello, MANIFEST_PART, Offer, PROTOCOL_VERSION, Request, Response,
    Welcome,
};
use crate::source_watch::{Pass, SourceWatch};
use crate::standby::blocking;
use crate::state::{self, PrimaryState, STATE_VERSION, Snapshot, VolumeDirs, VolumeLock, now_ms};

/// Chunk bytes after which the primary asks the standby to make what it received durable, so an
/// interrupted first sync resumes from there.
const FLUSH_EVERY_BYTES: u64 = 256 << 20;

/// How often one sync may ask for chunks again after the standby found some missing at apply.
const MAX_WANT_ROUNDS: u32 = 3;

/// How often a push captures again when files changed between capture and send.
const MAX_CAPTURE_ATTEMPTS: u32 = 3;

/// One standby to push to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `host:port`.
    pub addr: String,
    /// The standby's pinned id.
    pub id: PeerId,
}

/// Which backend replicates a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `btrfs` when the volume is a btrfs subvolume, else `files`.
    Auto,
    /// Content-defined chunks; any filesystem.
    Files,
    /// Snapshots and `btrfs send`/`receive`; the volume must be a subvolume and the standby's
    /// folder on btrfs.
    Btrfs,
}

/// How to push one volume.
#[derive(Clone, Debug)]
pub struct PushConfig {
    /// Which backend.
    pub backend: Backend,
    /// This node's key.
    pub identity: Identity,
    /// The volume's name (as the standbys know it).
    pub volume: String,
    /// The volume's directory on this node.
    pub source: PathBuf,
    /// Where this node keeps state.
    pub state_dir: PathBuf,
    /// This primary's epoch.
    pub epoch: u64,
    /// Snapshots (manifests) kept in the history, besides each standby's pinned one.
    pub keep: usize,
    /// The standbys.
    pub targets: Vec<Target>,
    /// Time allowed to connect and for each answer (an apply may take longer; see below).
    pub timeout: Duration,
    /// How to capture.
    pub capture: CaptureOptions,
    /// This host's name, for the standby's logs.
    pub sender: String,
    /// btrfs backend: a standby that holds nothing of the volume gets its first copy by the files
    /// backend (which resumes where a cut transfer stopped and writes each byte once), adopted
    /// on the standby as the snapshot's received copy, so later sends are incremental. `false`
    /// sends a full `btrfs send` stream instead (`push --btrfs-full-stream`).
    pub btrfs_first_by_files: bool,
    /// Set by the btrfs backend on the configuration of a first copy by the files backend (see
    /// above); `None` from every other caller.
    pub btrfs_first: Option<BtrfsFirst>,
    /// files backend, long-running pushes: the watch on `source` that remembers the last capture
    /// and which directories changed since, so a pass looks only at those
    /// ([`crate::source_watch`]). `None` walks the whole tree on every pass.
    pub watch: Option<SharedSourceWatch>,
}

/// A [`SourceWatch`] shared by the passes of one long-running push.
pub type SharedSourceWatch = Arc<std::sync::Mutex<SourceWatch>>;

/// What kind of sync happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// The standby had no tree from this primary's history: every chunk it lacked was sent.
    Full,
    /// From a tree both sides hold.
    Incremental,
    /// The standby already held the tree.
    Unchanged,
}

impl SyncKind {
    /// The label used in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Incremental => "incremental",
            SyncKind::Unchanged => "unchanged",
        }
    }
}

/// One standby's sync.
#[derive(Clone, Debug)]
pub struct SyncOutcome {
    /// Its kind.
    pub kind: SyncKind,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Chunk bytes sent.
    pub bytes_sent: u64,
    /// Bytes of the manifest offered, or of the manifest delta when `delta` (0 when nothing was
    /// offered, or for a btrfs stream).
    pub manifest_bytes: u64,
    /// Whether the tree was offered as a delta against the standby's live tree.
    pub delta: bool,
    /// What the standby reported, when it applied.
    pub applied: Option<Applied>,
    /// How long it took.
    pub duration: Duration,
}

/// What one push did.
#[derive(Debug)]
pub struct PushReport {
    /// The snapshot pushed.
    pub snapshot: Snapshot,
    /// What capture did.
    pub capture: CaptureReport,
    /// Per standby, by address.
    pub results: Vec<(String, Result<SyncOutcome, NetError>)>,
}

impl PushReport {
    /// Whether every standby now holds the snapshot.
    pub fn all_ok(&self) -> bool {
        self.results.iter().all(|(_, r)| r.is_ok())
    }
}

/// Captures the volume once and syncs every standby to it.
pub async fn push_once(cfg: &PushConfig, metrics: &Metrics) -> Result<PushReport, NetError> {
    if !state::valid_volume_name(&cfg.volume) {
        return Err(VolumeError::BadTarget {
            path: cfg.source.clone(),
            reason: format!(
                "`{}` is not a usable volume name (letters, digits, `-`, `_`, `.`; at most 64)",
                cfg.volume
            ),
        }
        .into());
    }
    let btrfs = match cfg.backend {
        Backend::Files => false,
        Backend::Btrfs => true,
        Backend::Auto => {
            let source = cfg.source.clone();
            blocking(move || Ok(crate::btrfs::is_subvolume(&source).unwrap_or(false))).await?
        }
    };
    if btrfs {
        return crate::link_btrfs::push_btrfs(cfg, metrics).await;
    }
    let dirs = VolumeDirs::new(&cfg.state_dir, &cfg.volume);
    let _lock = lock_for_push(&dirs)?;
    // A consistent view where the filesystem gives one: on a btrfs subvolume (pushed with the
    // files backend, say to a standby on ext4), the tree is captured and read from a read-only
    // snapshot, so no file can change while it is read. Elsewhere the capture checks for changes.
    let view = {
        let (source, volume) = (cfg.source.clone(), cfg.volume.clone());
        blocking(move || crate::link_btrfs::CaptureView::take(&source, &volume)).await?
    };
    let result = match &view {
        Some(v) => {
            let mut from_view = cfg.clone();
            from_view.source = v.path().to_owned();
            // Each pass reads a new snapshot, which nothing changes while it is read.
            from_view.watch = None;
            // Every snapshot is a new device to `stat`, with the same inode numbers.
            from_view.capture.ignore_device = true;
            push_files(&from_view, metrics, &dirs).await
        }
        None => push_files(cfg, metrics, &dirs).await,
    };
    if let Some(v) = view {
        blocking(move || v.remove()).await?;
    }
    result
}

/// The files backend's push (see [`push_once`]), from `cfg.source` as given.
pub(crate) async fn push_files(
    cfg: &PushConfig,
    metrics: &Metrics,
    dirs: &VolumeDirs,
) -> Result<PushReport, NetError> {
    let started = Instant::now();
    let mut pending: Vec<Target> = cfg.targets.clone();
    let mut results: Vec<(String, Result<SyncOutcome, NetError>)> = Vec::new();
    let mut attempt = 0;
    loop {
        attempt += 1;
        // The standbys are greeted before the capture (one connection per sync). One that holds nothing of the volume
        // (the first sync) is sent file data as the capture reads it, so the tree is read once
        // and the transfer overlaps the walk; the others are offered the finished tree, so that
        // what they hold is not sent again.
        let mut streams = Vec::new();
        if attempt == 1 {
            let opened = futures::future::join_all(pending.iter().map(|t| open_link(cfg, t))).await;
            for (t, opened) in pending.iter().zip(opened) {
                // A failure is said again, with the same cause, when the sync connects after
                // the capture.
                if let Ok((link, welcome)) = opened {
                    streams.push(Stream {
                        target: t.clone(),
                        fresh: welcome.fresh,
                        link: Some((link, welcome)),
                        error: None,
                        chunks: 0,
                        bytes: 0,
                    });
                }
            }
        }
        let captured_tree = capture_and_record(cfg, dirs, &mut streams, metrics).await?;
        let (snapshot, captured, manifest, encoded, tree_hash) = captured_tree;
        let encoded = Arc::new(encoded);
        let manifest = Arc::new(manifest);
        // The parent of the next pass's offers to the standbys this pass brings up to date.
        remember_last_tree(dirs, tree_hash, manifest.clone());
        if let Some(watch) = &cfg.watch
            && let Ok(mut watch) = watch.lock()
        {
            watch.share_last_tree(&manifest);
        }
        let plan = Arc::new(ChunkIndex::new(manifest));
        let st: PrimaryState = state::load(&dirs.primary())?;
        let st = Arc::new(st);
        let mut tasks = Vec::new();
        for t in &pending {
            let ctx = SyncCtx {
                cfg: cfg.clone(),
                target: t.clone(),
                tree_hash,
                captured_at_ms: snapshot.captured_at_ms,
                encoded: encoded.clone(),
                plan: plan.clone(),
                state: st.clone(),
            };
            let streamed = streams
                .iter_mut()
                .find(|s| s.target == *t)
                .map(|s| (s.link.take(), s.error.take(), (s.chunks, s.bytes)));
            tasks.push(async move {
                let outcome = match streamed {
                    Some((_, Some(e), _)) => Err(e),
                    Some((Some((link, welcome)), None, sent)) => {
                        sync_on(&ctx, link, welcome, sent).await
                    }
                    _ => sync_one(&ctx).await,
                };
                (ctx.target.clone(), outcome)
            });
        }
        let outcomes = futures::future::join_all(tasks).await;
        let mut st: PrimaryState = state::load(&dirs.primary())?;
        st.version = STATE_VERSION;
        st.epoch = cfg.epoch;
        let mut retry = Vec::new();
        for (target, outcome) in outcomes {
            record(&mut st, cfg, &target, &snapshot, &outcome, metrics);
            match outcome {
                Err(NetError::Volume(VolumeError::SourceChanged { path }))
                    if attempt < MAX_CAPTURE_ATTEMPTS =>
                {
                    tracing::info!(volume = %cfg.volume, standby = %target.addr, path = %path.display(), "a file changed after capture; capturing again");
                    retry.push(target);
                }
                other => results.push((target.addr.clone(), other)),
            }
        }
        state::save(&dirs.primary(), &st)?;
        forget_unneeded_trees(dirs, &st)?;
        forget_last_trees(dirs, &st);
        if retry.is_empty() {
            metrics
                .sync_seconds
                .get_or_create(&VolumeLabels {
                    volume: cfg.volume.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            return Ok(PushReport {
                snapshot,
                capture: captured,
                results,
            });
        }
        pending = retry;
    }
}

/// Takes the volume's lock for a push, or says that another push holds it.
pub(crate) fn lock_for_push(dirs: &VolumeDirs) -> Result<VolumeLock, NetError> {
    VolumeLock::try_acquire(dirs)?.ok_or_else(|| {
        VolumeError::BadTarget {
            path: dirs.lock(),
            reason: "another hearth process is pushing this volume (its lock is held)".into(),
        }
        .into()
    })
}

/// A standby streamed to during the capture.
struct Stream {
    target: Target,
    /// Whether it is sent file data during the capture (else only pings).
    fresh: bool,
    /// Its link and greeting, until the sync takes them.
    link: Option<(Link, Welcome)>,
    /// The error that ended the stream.
    error: Option<NetError>,
    /// Chunks and bytes of file data sent.
    chunks: u64,
    bytes: u64,
}

/// Connects to a standby for a push and checks its answer.
async fn open_link(cfg: &PushConfig, target: &Target) -> Result<(Link, Welcome), NetError> {
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        volume: cfg.volume.clone(),
        epoch: cfg.epoch,
        sender: cfg.sender.clone(),
        btrfs_first: cfg.btrfs_first.clone(),
    };
    let (link, welcome) = connect(&cfg.identity, target, hello, cfg.timeout).await?;
    if welcome.epoch > cfg.epoch {
        // The standby stored a higher epoch than ours, which it would have refused; a standby
        // that says so anyway is broken.
        return Err(NetError::Protocol(format!(
            "the standby reports epoch {} above ours ({}) but did not refuse",
            welcome.epoch, cfg.epoch
        )));
    }
    Ok((link, welcome))
}

/// Hands what the capture reads to every live stream, one message at a time; a stream whose
/// link fails is ended with that error and the others go on. While the capture walks without
/// reading, a [`Request::Ping`] now and then keeps the standbys from taking the silence for a
/// dead link.
async fn forward(
    streams: &mut [Stream],
    mut rx: tokio::sync::mpsc::Receiver<Request>,
    quiet: Duration,
) {
    let mut sent_since_flush = 0u64;
    loop {
        let req = match tokio::time::timeout(quiet, rx.recv()).await {
            Ok(Some(req)) => req,
            Ok(None) => break,
            Err(_) => Request::Ping,
        };
        // Flushed now and then rather than per message: small files come by the thousand.
        let data = match &req {
            Request::FileChunk { data, .. } => data.len() as u64,
            _ => 0,
        };
        sent_since_flush += data;
        let flush = req == Request::Ping || sent_since_flush >= FLUSH_EVERY_BYTES / 16;
        if flush {
            sent_since_flush = 0;
        }
        let mut live = 0;
        for s in streams.iter_mut() {
            let Some((l, _)) = &mut s.link else { continue };
            if req != Request::Ping && !s.fresh {
                live += 1;
                continue;
            }
            let r = if flush {
                l.send(&req).await
            } else {
                l.queue(&req).await
            };
            match r {
                Ok(()) => {
                    live += 1;
                    s.bytes += data;
                    s.chunks += u64::from(data > 0);
                }
                Err(e) => {
                    s.link = None;
                    s.error = Some(e);
                }
            }
        }
        if live == 0 {
            // Every stream failed: stop taking messages, so the capture stops making them.
            break;
        }
    }
}

async fn capture_and_record(
    cfg: &PushConfig,
    dirs: &VolumeDirs,
    streams: &mut [Stream],
    metrics: &Metrics,
) -> Result<(Snapshot, CaptureReport, Manifest, Vec<u8>, TreeHash), NetError> {
    let source = cfg.source.clone();
    let opts = cfg.capture.clone();
    let cache_path = dirs.capture_cache();
    let captured_at_ms = now_ms();
    // The sender lives as long as the capture, which is how `forward` knows when to stop.
    let (tx, rx) = tokio::sync::mpsc::channel::<Request>(64);
    let stream_data = streams.iter().any(|s| s.fresh);
    // A watch is for the tree it watches (the btrfs backend's first copy reads a snapshot).
    let watch = cfg.watch.clone().filter(|w| {
        w.lock()
            .map(|w| w.root() == cfg.source.as_path())
            .unwrap_or(false)
    });
    let volume = cfg.volume.clone();
    let captures = metrics.captures.clone();
    let capturing = blocking(move || {
        let count = |how: &str| {
            captures
                .get_or_create(&ReasonLabels {
                    volume: volume.clone(),
                    reason: how.to_owned(),
                })
                .inc();
        };
        let load = || {
            std::fs::read(&cache_path)
                .ok()
                .and_then(|b| CaptureCache::decode(&b))
        };
        let mut open = true;
        let tx_for_data = tx.clone();
        let mut send = |ev: Streamed<'_>| {
            if !open {
                return;
            }
            let tx = &tx_for_data;
            let req = match ev {
                Streamed::Begin { path } => Request::FileBegin {
                    path: path.to_vec(),
                },
                Streamed::Chunk { offset, id, data } => Request::FileChunk {
                    offset,
                    id,
                    data: data.to_vec(),
                },
            };
            // Closed when every stream failed: the capture goes on for the state and the others.
            open = tx.blocking_send(req).is_ok();
        };
        let sink: Option<Sink<'_>> = if stream_data { Some(&mut send) } else { None };
        // Whether the cache on disk is written again. Not when nothing was read: every file
        // matched the stored cache, which therefore still describes them all (entries of
        // deleted files are never looked up). Not after a pass that looked only at changes:
        // the watch holds the cache, and the one on disk (for a restart) is written by each
        // walk, at least every `--walk-every`; a restart then reads again only what changed
        // since, so a 1 % pass does not rewrite the whole cache.
        let (cap, write_cache) = match &watch {
            Some(watch) => {
                let mut watch = watch.lock().map_err(|_| {
                    VolumeError::io("watching", &source, io::Error::other("a push panicked"))
                })?;
                let mut had_cache = true;
                let mut load_cache = || {
                    let c = load();
                    had_cache = c.is_some();
                    c
                };
                let (cap, pass) = watch.capture(&opts, &mut load_cache, sink)?;
                let write = match &pass {
                    Pass::Walked { reason, watching } => {
                        count(reason.label());
                        tracing::info!(volume = %volume, reason = %reason, watching, "walked the whole volume");
                        !had_cache || cap.report.files_read > 0
                    }
                    Pass::Changes { paths } => {
                        count("watched");
                        tracing::debug!(volume = %volume, paths, "looked only at what changed");
                        false
                    }
                };
                (cap, write)
            }
            None => {
                count("walk");
                let cache = load();
                let cap = capture_streaming(&source, &opts, cache.as_ref(), sink)?;
                let write = cache.is_none() || cap.report.files_read > 0;
                (cap, write)
            }
        };
        drop(tx);
        if !write_cache {
            return Ok(cap);
        }
        // The cache only saves reading; failing to store it costs speed on the next run.
        match cap.cache.encode() {
            Ok(bytes) => {
                if let Err(e) = write_atomic(&cache_path, &bytes, 0o600, Existing::Replace) {
                    tracing::warn!(path = %cache_path.display(), error = %e, "could not save the capture cache");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode the capture cache"),
        }
        Ok(cap)
    });
    // Pings at least every 10 s: the standby's own timeout may be shorter than ours.
    let quiet = (cfg.timeout / 3).min(Duration::from_secs(10));
    let (cap, ()) = tokio::join!(capturing, forward(streams, rx, quiet));
    let cap = cap?;
    let manifest = cap.manifest;
    let (encoded, tree_hash) = manifest.encode_and_hash()?;
    let snapshot = Snapshot {
        tree_hash: tree_hash.to_string(),
        captured_at_ms,
        bytes: manifest.file_bytes(),
        entries: manifest.entries.len() as u64,
        snapshot_path: None,
    };
    let tree_path = dirs.tree(&snapshot.tree_hash);
    if !tree_path.exists() {
        std::fs::create_dir_all(dirs.trees())
            .map_err(|e| NetError::io("creating", dirs.trees(), e))?;
        write_atomic(&tree_path, &encoded, 0o600, Existing::Replace)
            .map_err(|e| NetError::io("writing", &tree_path, e))?;
    }
    let mut st: PrimaryState = state::load(&dirs.primary())?;
    st.version = STATE_VERSION;
    st.record_snapshot(snapshot.clone(), cfg.keep);
    state::save(&dirs.primary(), &st)?;
    tracing::info!(volume = %cfg.volume, tree = %tree_hash, files_read = cap.report.files_read, bytes_read = cap.report.bytes_read, files_reused = cap.report.files_reused, "captured");
    Ok((snapshot, cap.report, manifest, encoded, tree_hash))
}

/// Removes kept manifests that neither the history nor any standby's pin needs any more. These
/// are hearth's own descriptions of past trees, not user data.
fn forget_unneeded_trees(dirs: &VolumeDirs, st: &PrimaryState) -> Result<(), NetError> {
    let needed: std::collections::HashSet<String> = st.needed_trees().into_iter().collect();
    let trees = dirs.trees();
    let Ok(listing) = std::fs::read_dir(&trees) else {
        return Ok(());
    };
    for item in listing {
        let item = item.map_err(|e| NetError::io("listing", &trees, e))?;
        let name = item.file_name();
        let Some(hash) = name.to_str().and_then(|n| n.strip_suffix(".manifest")) else {
            continue;
        };
        if !needed.contains(hash) {
            std::fs::remove_file(item.path())
                .map_err(|e| NetError::io("removing", item.path(), e))?;
        }
    }
    Ok(())
}

pub(crate) fn record(
    st: &mut PrimaryState,
    cfg: &PushConfig,
    target: &Target,
    snapshot: &Snapshot,
    outcome: &Result<SyncOutcome, NetError>,
    metrics: &Metrics,
) {
    let rec = st.standbys.entry(target.addr.clone()).or_default();
    rec.id = target.id.to_string();
    rec.last_attempt_ms = Some(now_ms());
    let labels = StandbyLabels {
        volume: cfg.volume.clone(),
        standby: target.addr.clone(),
    };
    match outcome {
        Ok(o) => {
            rec.last_common = Some(snapshot.clone());
            rec.last_success_ms = Some(now_ms());
            rec.last_error = None;
            rec.bytes_sent += o.bytes_sent;
            rec.chunks_sent += o.chunks_sent;
            rec.last_duration_ms = Some(o.duration.as_millis() as u64);
            match o.kind {
                SyncKind::Full => rec.full_syncs += 1,
                SyncKind::Incremental => rec.incremental_syncs += 1,
                SyncKind::Unchanged => rec.unchanged_syncs += 1,
            }
            metrics
                .bytes_sent
                .get_or_create(&labels)
                .inc_by(o.bytes_sent);
            metrics
                .syncs
                .get_or_create(&SyncLabels {
                    volume: cfg.volume.clone(),
                    standby: target.addr.clone(),
                    kind: o.kind.as_str().into(),
                })
                .inc();
            metrics
                .last_success_timestamp_seconds
                .get_or_create(&labels)
                .set(now_ms() as f64 / 1000.0);
            metrics
                .lag_seconds
                .get_or_create(&labels)
                .set(now_ms().saturating_sub(snapshot.captured_at_ms) as f64 / 1000.0);
        }
        Err(e) => {
            rec.last_error = Some(e.to_string());
            let reason = match e {
                NetError::Refused(r) => {
                    rec.refusals += 1;
                    metrics
                        .refusals
                        .get_or_create(&ReasonLabels {
                            volume: cfg.volume.clone(),
                            reason: format!("{:?}", r.code),
                        })
                        .inc();
                    "refused"
                }
                NetError::Connect { .. } => "connect",
                NetError::Handshake { .. } => "handshake",
                NetError::Link(_) => "link",
                NetError::Volume(_) | NetError::Io { .. } => "local",
                _ => "protocol",
            };
            metrics
                .errors
                .get_or_create(&ReasonLabels {
                    volume: cfg.volume.clone(),
                    reason: reason.into(),
                })
                .inc();
        }
    }
}

/// Where the primary finds the chunks a standby asks for, in the tree it offered.
#[derive(Debug)]
pub(crate) struct ChunkIndex {
    manifest: Arc<Manifest>,
}

impl ChunkIndex {
    fn new(manifest: Arc<Manifest>) -> Self {
        ChunkIndex { manifest }
    }

    /// The first place in the tree that holds each of `ids`, in their order, or the first id the
    /// tree does not contain. One pass over the manifest looking up a set of just these ids:
    /// indexing every chunk of a large tree (160,000 for the benchmark's) to send the 900 of a
    /// small change cost more than sending them.
    fn locate(&self, ids: &[ChunkId]) -> Result<Vec<ChunkWant>, ChunkId> {
        let mut found: HashMap<ChunkId, Option<ChunkWant>> =
            ids.iter().map(|id| (*id, None)).collect();
        let mut left = found.len();
        'entries: for entry in &self.manifest.entries {
            let crate::manifest::EntryKind::File { chunks, .. } = &entry.kind else {
                continue;
            };
            for c in chunks {
                if let Some(slot @ None) = found.get_mut(&c.id) {
                    *slot = Some(ChunkWant {
                        id: c.id,
                        len: c.len,
                        path: entry.path.clone(),
                        offset: c.offset,
                    });
                    left -= 1;
                    if left == 0 {
                        break 'entries;
                    }
                }
            }
        }
        ids.iter()
            .map(|id| found.get(id).cloned().flatten().ok_or(*id))
            .collect()
    }
}

struct SyncCtx {
    cfg: PushConfig,
    target: Target,
    tree_hash: TreeHash,
    captured_at_ms: u64,
    encoded: Arc<Vec<u8>>,
    plan: Arc<ChunkIndex>,
    state: Arc<PrimaryState>,
}

/// Connects to a standby and says hello: the start of every exchange (push and verify).
pub async fn connect(
    identity: &Identity,
    target: &Target,
    hello: Hello,
    timeout: Duration,
) -> Result<(Link, Welcome), NetError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&target.addr))
        .await
        .map_err(|_| NetError::Connect {
            addr: target.addr.clone(),
            source: io::Error::new(io::ErrorKind::TimedOut, "timed out"),
        })?
        .map_err(|e| NetError::Connect {
            addr: target.addr.clone(),
            source: e,
        })?;
    let _ = tcp.set_nodelay(true);
    let connector = TlsConnector::from(identity.client_config(target.id)?);
    let tls = tokio::time::timeout(timeout, connector.connect(server_name(), tcp))
        .await
        .map_err(|_| {
            NetError::Link(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        })?
        .map_err(|e| NetError::Handshake {
            peer: target.addr.clone(),
            source: e,
        })?;
    let (rd, wr) = tokio::io::split(tls);
    let mut link = Link { rd, wr, timeout };
    link.send(&Request::Hello(hello)).await?;
    // In TLS 1.3 the server checks the client's certificate after the client considers the
    // handshake done, so a standby that does not allow this key shows up here, as an alert.
    let first = match wire::read_frame(&mut link.rd).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return Err(NetError::Handshake {
                peer: target.addr.clone(),
                source: io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the standby closed the connection",
                ),
            });
        }
        Err(NetError::Link(e)) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(NetError::Handshake {
                peer: target.addr.clone(),
                source: io::Error::new(
                    e.kind(),
                    format!(
                        "{e}; the standby probably does not allow this node's key {}",
                        identity.id()
                    ),
                ),
            });
        }
        Err(e) => return Err(e),
    };
    match first {
        Response::Welcome(w) => Ok((link, w)),
        Response::Refused(r) => Err(NetError::Refused(r)),
        other => Err(NetError::Protocol(format!(
            "expected Welcome, got {other:?}"
        ))),
    }
}

async fn within<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, NetError>>,
) -> Result<T, NetError> {
    tokio::time::timeout(timeout, f).await.unwrap_or_else(|_| {
        Err(NetError::Link(io::Error::new(
            io::ErrorKind::TimedOut,
            "the standby stopped taking data",
        )))
    })
}

/// Both halves of a TLS connection to a standby.
pub struct Link {
    rd: tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>,
    wr: tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>,
    timeout: Duration,
}

impl Link {
    /// Sends one message and flushes. Like every write here it must finish within the link's
    /// timeout: a peer that vanished without closing the connection (a cut cable, a partition)
    /// would otherwise block the write until TCP gives up, many minutes later.
    pub async fn send(&mut self, req: &Request) -> Result<(), NetError> {
        let timeout = self.timeout;
        within(timeout, async {
            wire::write_frame(&mut self.wr, req).await?;
            wire::flush(&mut self.wr).await
        })
        .await
    }

    /// Queues one message without flushing (see [`Link::send`] for the timeout).
    pub async fn queue(&mut self, req: &Request) -> Result<(), NetError> {
        let timeout = self.timeout;
        within(timeout, wire::write_frame(&mut self.wr, req)).await
    }

    pub async fn recv_within(&mut self, timeout: Duration) -> Result<Response, NetError> {
        match tokio::time::timeout(timeout, wire::expect_frame(&mut self.rd)).await {
            Ok(Ok(Response::Refused(r))) => Err(NetError::Refused(r)),
            Ok(r) => r,
            Err(_) => Err(NetError::Link(io::Error::new(
                io::ErrorKind::TimedOut,
                "the standby did not answer in time",
            ))),
        }
    }

    pub async fn recv(&mut self) -> Result<Response, NetError> {
        self.recv_within(self.timeout).await
    }

    /// Offers a tree: the [`Offer`] (its `manifest_len` taken from `encoded`), then the encoded
    /// manifest in parts.
    pub async fn offer(
        &mut self,
        tree_hash: TreeHash,
        parent: Option<TreeHash>,
        captured_at_ms: u64,
        encoded: &[u8],
    ) -> Result<(), NetError> {
        let offer = Offer {
            tree_hash,
            parent,
            captured_at_ms,
            manifest_len: 0,
            delta: false,
        };
        self.offer_parts(offer, encoded).await
    }

    /// Sends `offer` (its `manifest_len` set to the length of `bytes`) and then `bytes`, the
    /// encoded manifest or delta, in parts.
    pub async fn offer_parts(&mut self, mut offer: Offer, bytes: &[u8]) -> Result<(), NetError> {
        offer.manifest_len = bytes.len() as u64;
        self.queue(&Request::Offer(offer)).await?;
        for part in bytes.chunks(MANIFEST_PART) {
            self.queue(&Request::ManifestPart(part.to_vec())).await?;
        }
        wire::flush(&mut self.wr).await
    }
}

async fn sync_one(ctx: &SyncCtx) -> Result<SyncOutcome, NetError> {
    let (link, welcome) = open_link(&ctx.cfg, &ctx.target).await?;
    sync_on(ctx, link, welcome, (0, 0)).await
}

/// Syncs the captured tree to a standby on an open link; `streamed` is the chunks and bytes of
/// file data sent on it while the tree was captured.
async fn sync_on(
    ctx: &SyncCtx,
    mut link: Link,
    welcome: Welcome,
    streamed: (u64, u64),
) -> Result<SyncOutcome, NetError> {
    let started = Instant::now();
    let cfg = &ctx.cfg;
    // The same tree, unless the standby saw its copy changed by someone else: then the tree is
    // offered again, and the standby keeps its changed copy aside and restores this one.
    // A first copy of a btrfs volume that arrived whole but was not adopted (the link broke
    // in between) is offered again all the same: the apply finds it unchanged, and the adoption
    // follows.
    if cfg.btrfs_first.is_none()
        && welcome
            .live
            .as_ref()
            .is_some_and(|l| l.tree_hash == ctx.tree_hash && !l.changed)
    {
        link.send(&Request::Done).await?;
        return Ok(SyncOutcome {
            kind: SyncKind::Unchanged,
            chunks_sent: 0,
            bytes_sent: 0,
            manifest_bytes: 0,
            delta: false,
            applied: None,
            duration: started.elapsed(),
        });
    }
    let parent = welcome
        .live
        .as_ref()
        .map(|l| l.tree_hash)
        .filter(|h| ctx.state.knows(h));
    let kind = if parent.is_some() {
        SyncKind::Incremental
    } else {
        SyncKind::Full
    };
    if kind == SyncKind::Full && welcome.live.is_some() {
        tracing::warn!(volume = %cfg.volume, standby = %ctx.target.addr, "the standby holds a tree this primary does not know; it will keep it aside");
    }
    // A tree that descends from the standby's goes as a delta against it when that is smaller:
    // for a small change of a large tree, a few kilobytes instead of the whole manifest.
    let delta = match parent {
        Some(p) => delta_against(ctx, p).await,
        None => None,
    };
    let offer = Offer {
        tree_hash: ctx.tree_hash,
        parent,
        captured_at_ms: ctx.captured_at_ms,
        manifest_len: 0,
        delta: delta.is_some(),
    };
    let offered = delta.as_deref().unwrap_or(&ctx.encoded);
    let (manifest_bytes, delta) = (offered.len() as u64, delta.is_some());
    link.offer_parts(offer, offered).await?;
    let (mut chunks_sent, mut bytes_sent) = streamed;
    let mut rounds = 0;
    let mut wanted = read_want(&mut link).await?;
    loop {
        rounds += 1;
        let (c, b, flushes) = send_chunks(ctx, &mut link, wanted).await?;
        chunks_sent += c;
        bytes_sent += b;
        link.queue(&Request::Flush).await?;
        link.send(&Request::Commit).await?;
        for _ in 0..=flushes {
            match link.recv().await? {
                Response::Stored { .. } => {}
                other => {
                    return Err(NetError::Protocol(format!(
                        "expected Stored, got {other:?}"
                    )));
                }
            }
        }
        // Building the tree can take minutes for a large first sync.
        match link.recv_within(cfg.timeout * 60).await? {
            Response::Applied(mut applied) => {
                if let Some(first) = &cfg.btrfs_first {
                    // The copy is whole and checked: the standby makes it the snapshot's
                    // received copy and its live subvolume.
                    link.send(&Request::BtrfsAdopt).await?;
                    match link.recv_within(cfg.timeout * 6).await? {
                        Response::BtrfsApplied { uuid, kept_aside } if uuid == first.uuid => {
                            applied.kept_aside.extend(kept_aside);
                        }
                        other => {
                            return Err(NetError::Protocol(format!(
                                "expected BtrfsApplied for {}, got {other:?}",
                                first.uuid
                            )));
                        }
                    }
                }
                link.send(&Request::Done).await.ok();
                tracing::info!(volume = %cfg.volume, standby = %ctx.target.addr, kind = kind.as_str(), chunks = chunks_sent, bytes = bytes_sent, manifest_bytes, delta, "standby is in sync");
                return Ok(SyncOutcome {
                    kind,
                    chunks_sent,
                    bytes_sent,
                    manifest_bytes,
                    delta,
                    applied: Some(applied),
                    duration: started.elapsed(),
                });
            }
            Response::Want { ids, last } if rounds < MAX_WANT_ROUNDS => {
                wanted = ids;
                if !last {
                    wanted.extend(read_want(&mut link).await?);
                }
            }
            other => {
                return Err(NetError::Protocol(format!(
                    "expected Applied, got {other:?}"
                )));
            }
        }
    }
}

/// The encoded delta from the tree `parent` to the tree on offer, when this primary still holds
/// `parent`'s manifest (in memory from the last pass, or kept on disk) and the delta is smaller
/// than the whole manifest. `None` sends the whole manifest, which is always correct.
async fn delta_against(ctx: &SyncCtx, parent: TreeHash) -> Option<Vec<u8>> {
    let dirs = VolumeDirs::new(&ctx.cfg.state_dir, &ctx.cfg.volume);
    let new = ctx.plan.manifest.clone();
    let whole = ctx.encoded.len();
    let made = blocking(move || {
        let base = match last_tree(&dirs, parent) {
            Some(m) => m,
            None => {
                let path = dirs.tree(&parent.to_string());
                let bytes =
                    std::fs::read(&path).map_err(|e| VolumeError::io("reading", path, e))?;
                let (m, hash) = Manifest::decode_hashed(&bytes)?;
                if hash != parent {
                    return Ok(None);
                }
                // Other standbys on the same tree take it from memory (kept while one holds it).
                let m = Arc::new(m);
                remember_last_tree(&dirs, parent, m.clone());
                m
            }
        };
        let encoded = crate::delta::ManifestDelta::between(&base, &new).encode()?;
        Ok((encoded.len() < whole).then_some(encoded))
    })
    .await;
    match made {
        Ok(d) => d,
        Err(e) => {
            // Handled here: the whole manifest goes instead.
            tracing::debug!(volume = %ctx.cfg.volume, error = %e, "no manifest delta; offering the whole manifest");
            None
        }
    }
}

/// Manifests of trees this process captured that a standby may hold as its live tree, for each
/// volume (by its folder of kept trees), so that a repeating push finds the parent of its next
/// offers in memory instead of reading and decoding it from disk for every standby. A pass adds
/// its tree (the same allocation its chunk index uses, so no copy) and, once its syncs are done,
/// keeps only the trees some standby now holds: usually just that one.
type KnownTrees = HashMap<PathBuf, Vec<(TreeHash, Arc<Manifest>)>>;
static KNOWN_TREES: std::sync::LazyLock<std::sync::Mutex<KnownTrees>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(HashMap::new()));

fn last_tree(dirs: &VolumeDirs, hash: TreeHash) -> Option<Arc<Manifest>> {
    let trees = KNOWN_TREES.lock().ok()?;
    let (_, m) = trees.get(&dirs.trees())?.iter().find(|(h, _)| *h == hash)?;
    Some(m.clone())
}

fn remember_last_tree(dirs: &VolumeDirs, hash: TreeHash, m: Arc<Manifest>) {
    if let Ok(mut trees) = KNOWN_TREES.lock() {
        let known = trees.entry(dirs.trees()).or_default();
        if !known.iter().any(|(h, _)| *h == hash) {
            known.push((hash, m));
        }
    }
}

/// Forgets the manifests in memory that no standby holds any more (by `st`'s record of each
/// standby's last common tree).
fn forget_last_trees(dirs: &VolumeDirs, st: &PrimaryState) {
    let held: std::collections::HashSet<TreeHash> = st
        .standbys
        .values()
        .filter_map(|s| s.last_common.as_ref())
        .filter_map(|c| TreeHash::from_hex(&c.tree_hash))
        .collect();
    if let Ok(mut trees) = KNOWN_TREES.lock()
        && let Some(known) = trees.get_mut(&dirs.trees())
    {
        known.retain(|(h, _)| held.contains(h));
    }
}

async fn read_want(link: &mut Link) -> Result<Vec<ChunkId>, NetError> {
    let mut all = Vec::new();
    loop {
        match link.recv().await? {
            Response::Want { ids, last } => {
                all.extend(ids);
                if last {
                    return Ok(all);
                }
            }
            other => return Err(NetError::Protocol(format!("expected Want, got {other:?}"))),
        }
    }
}

/// Sends the wanted chunks, read by a blocking reader thread and handed over through a bounded
/// channel so disk reads and the network overlap. Returns chunks and bytes sent and how many
/// intermediate flushes were requested.
async fn send_chunks(
    ctx: &SyncCtx,
    link: &mut Link,
    wanted: Vec<ChunkId>,
) -> Result<(u64, u64, u64), NetError> {
    let plan = ctx.plan.clone();
    let locations = blocking(move || Ok(plan.locate(&wanted)))
        .await?
        .map_err(|id| {
            NetError::Protocol(format!(
                "the standby asked for chunk {id}, which this tree does not contain"
            ))
        })?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(ChunkId, Vec<u8>), VolumeError>>(32);
    let root = ctx.cfg.source.clone();
    let reader = tokio::task::spawn_blocking(move || {
        for w in &locations {
            let item = read_chunk(&root, w).map(|d| (w.id, d));
            let failed = item.is_err();
            // The receiver is gone when the link failed; stop reading.
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    let mut chunks = 0;
    let mut bytes = 0;
    let mut since_flush = 0;
    let mut flushes = 0;
    let result: Result<(), NetError> = async {
        while let Some(item) = rx.recv().await {
            let (id, data) = item?;
            bytes += data.len() as u64;
            since_flush += data.len() as u64;
            chunks += 1;
            link.queue(&Request::Chunk { id, data }).await?;
            if since_flush >= FLUSH_EVERY_BYTES {
                link.queue(&Request::Flush).await?;
                flushes += 1;
                since_flush = 0;
            }
        }
        Ok(())
    }
    .await;
    drop(rx);
    // The reader stops at its next send once the channel is closed.
    let _ = reader.await;
    result?;
    Ok((chunks, bytes, flushes))
}

/// The outcome of [`verify`].
#[derive(Clone, Debug)]
pub struct VerifyReport {
    /// The standby's address.
    pub standby: String,
    /// The primary snapshot compared against (the standby's last common one).
    pub expected: Snapshot,
    /// Its tree hash (for btrfs, of the snapshot captured now).
    pub expected_tree: Option<TreeHash>,
    /// The tree hash of the standby's copy as captured now; `None` when it holds no tree.
    pub actual: Option<TreeHash>,
    /// Paths that differ (added, removed or changed), at most [`MAX_DIFFERENCES`].
    pub differences: Vec<String>,
}

impl VerifyReport {
    /// Whether the standby's copy equals the snapshot.
    pub fn equal(&self) -> bool {
        self.actual.is_some_and(|h| Some(h) == self.expected_tree)
    }
}

/// How many differing paths [`verify`] lists.
pub const MAX_DIFFERENCES: usize = 20;

/// Compares the standby's copy, captured afresh on the standby, with the snapshot this primary
/// last brought it to, by tree hash; lists the differing paths when they differ.
pub async fn verify(cfg: &PushConfig, target: &Target) -> Result<VerifyReport, NetError> {
    let dirs = VolumeDirs::new(&cfg.state_dir, &cfg.volume);
    let st: PrimaryState = state::load(&dirs.primary())?;
    let expected = st
        .standbys
        .get(&target.addr)
        .and_then(|r| r.last_common.clone())
        .ok_or_else(|| VolumeError::BadTarget {
            path: dirs.primary(),
            reason: format!(
                "no sync of volume `{}` to {} is recorded here; push first",
                cfg.volume, target.addr
            ),
        })?;
    let ours = match &expected.snapshot_path {
        // btrfs: the snapshot is still on disk (pinned); capture it for the comparison.
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            let opts = CaptureOptions {
                allow_devices: true,
                ..CaptureOptions::default()
            };
            blocking(move || Ok(capture(&path, &opts, None)?.manifest)).await?
        }
        None => {
            let tree_path = dirs.tree(&expected.tree_hash);
            let bytes =
                std::fs::read(&tree_path).map_err(|e| NetError::io("reading", &tree_path, e))?;
            Manifest::decode(&bytes)?
        }
    };
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        volume: cfg.volume.clone(),
        epoch: cfg.epoch,
        sender: cfg.sender.clone(),
        btrfs_first: None,
    };
    let (mut link, _welcome) = connect(&cfg.identity, target, hello, cfg.timeout).await?;
    link.send(&Request::Verify).await?;
    // The standby reads its whole tree; give it time.
    let len = match link.recv_within(cfg.timeout * 60).await? {
        Response::Verifying { manifest_len } => manifest_len,
        other => {
            return Err(NetError::Protocol(format!(
                "expected Verifying, got {other:?}"
            )));
        }
    };
    let Some(len) = len else {
        link.send(&Request::Done).await.ok();
        return Ok(VerifyReport {
            standby: target.addr.clone(),
            expected,
            expected_tree: Some(ours.tree_hash()?),
            actual: None,
            differences: vec!["(the standby holds no tree)".into()],
        });
    };
    let mut encoded = Vec::new();
    while (encoded.len() as u64) < len {
        match link.recv().await? {
            Response::ManifestPart(p) => encoded.extend_from_slice(&p),
            other => {
                return Err(NetError::Protocol(format!(
                    "expected ManifestPart, got {other:?}"
                )));
            }
        }
    }
    link.send(&Request::Done).await.ok();
    let theirs = Manifest::decode(&encoded)?;
    Ok(VerifyReport {
        standby: target.addr.clone(),
        expected,
        expected_tree: Some(ours.tree_hash()?),
        actual: Some(theirs.tree_hash()?),
        differences: differing_paths(&ours, &theirs, MAX_DIFFERENCES),
    })
}

/// The paths whose entries differ between two manifests, sorted, at most `max`.
pub fn differing_paths(a: &Manifest, b: &Manifest, max: usize) -> Vec<String> {
    let index = |m: &Manifest| -> HashMap<Vec<u8>, crate::manifest::Entry> {
        m.entries
            .iter()
            .map(|e| (e.path.clone(), e.clone()))
            .collect()
    };
    let (ia, ib) = (index(a), index(b));
    let mut out: Vec<String> = Vec::new();
    for (p, e) in &ia {
        match ib.get(p) {
            None => out.push(format!(
                "missing on the standby: /{}",
                String::from_utf8_lossy(p)
            )),
            Some(f) if f != e => out.push(format!("differs: /{}", String::from_utf8_lossy(p))),
            Some(_) => {}
        }
    }
    for p in ib.keys() {
        if !ia.contains_key(p) {
            out.push(format!(
                "only on the standby: /{}",
                String::from_utf8_lossy(p)
            ));
        }
    }
    out.sort();
    out.truncate(max);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ChunkParams;

    #[test]
    fn chunks_are_located_at_their_first_place_and_unknown_ones_named() {
        let id = |n: u8| ChunkId([n; 32]);
        let file = |path: &str, ids: &[u8]| {
            let chunks: Vec<(ChunkId, u32)> = ids.iter().map(|n| (id(*n), 10)).collect();
            crate::manifest::test_support::file_of(path, &chunks)
        };
        let index = ChunkIndex::new(Arc::new(Manifest {
            chunking: ChunkParams::default(),
            entries: vec![file("a", &[1, 2]), file("b", &[3, 2, 4])],
        }));
        let found = index.locate(&[4, 2, 1].map(id)).unwrap();
        let at: Vec<(&[u8], u64)> = found
            .iter()
            .map(|w| (w.path.as_slice(), w.offset))
            .collect();
        assert_eq!(at, [(&b"b"[..], 20), (&b"a"[..], 10), (&b"a"[..], 0)]);
        assert_eq!(index.locate(&[1, 9].map(id)).unwrap_err(), id(9));
        assert!(index.locate(&[]).unwrap().is_empty());
    }
}
