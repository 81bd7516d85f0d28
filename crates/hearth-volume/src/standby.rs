//! The standby side of the link (`hearth volume serve`): accept authenticated primaries, and for
//! each configured volume receive chunks into the volume's chunk store and apply offered trees
//! atomically. A standby serves only the volumes it is configured for and writes only into their
//! directories and its own state directory; the sender names a volume, never a path.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::apply::{SetAside, TreeNames, apply_and_prune, read_live_manifest_hashed};
use crate::capture::{CaptureOptions, UnstablePolicy, capture};
use crate::error::VolumeError;
use crate::incoming::Incoming;
use crate::manifest::{ChunkId, Manifest};
use crate::metrics::{Metrics, ReasonLabels, VolumeLabels};
use crate::net::NetError;
use crate::net::identity::{Identity, PeerId};
use crate::net::wire::{
    self, Applied, BtrfsOffer, Hello, LiveTree, MANIFEST_PART, Offer, PROTOCOL_VERSION, Refusal,
    RefusalCode, Request, Response, WANT_PART, Welcome,
};
use crate::state::{
    self, HelloDecision, KeptAside, LiveAction, LiveContent, LiveRecord, STATE_VERSION,
    StandbyState, VolumeDirs, VolumeLock, decide_hello, decide_live, now_ms,
};
use crate::store::{ChunkStore, Durability, VerifiedChunk};

/// The largest manifest a standby accepts (about ten million files).
const MAX_MANIFEST: u64 = 2 << 30;

/// Received bytes after which the chunk store is made durable without being asked, so that an
/// interrupted first sync keeps what arrived.
const SYNC_EVERY_BYTES: u64 = 256 << 20;

/// Chunks are stored in batches of about this many bytes per blocking task.
const PUT_BATCH_BYTES: usize = 8 << 20;

/// A sync that needs at most this many bytes of chunks holds them in memory instead of writing
/// them to the chunk store ([`ChunkStore::hold`]): the apply makes the tree durable before it
/// commits anyway, and a crash only costs sending these bytes again. On a 1 % change of 100,000
/// files (900 chunks, 5 MB) writing, syncing, reading and deleting each chunk as a file took a
/// tenth of a second or more. The bound is on what arrives, not only on what the offer asked for.
pub const DEFAULT_HOLD_CHUNKS_MAX: u64 = 32 << 20;

/// How long a new exchange waits for a running one on the same volume to end before it is
/// refused as busy.
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// How a standby serves.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// This node's key.
    pub identity: Identity,
    /// Primaries allowed to connect.
    pub allowed: Vec<PeerId>,
    /// Volumes served: name and live directory.
    pub volumes: BTreeMap<String, PathBuf>,
    /// Where state, chunk stores and locks live.
    pub state_dir: PathBuf,
    /// Replaced trees kept per volume (older ones are deleted if unchanged, kept aside if not).
    pub keep: usize,
    /// btrfs backend: keep a copy of each stream as it arrives, so that a cut stream resumes
    /// (costs a second write of the stream on this disk; the first copy of a volume goes by the
    /// files backend and needs none).
    pub resume_copies: bool,
    /// files backend: apply small changes in place ([`crate::patch`]) instead of building the
    /// whole tree beside the live one; replaced trees then keep only what changed.
    pub in_place: bool,
    /// Time allowed for the TLS handshake and for each message to arrive.
    pub timeout: Duration,
    /// files backend: a sync whose wanted chunks add up to at most this many bytes holds them in
    /// memory instead of writing them to the chunk store ([`DEFAULT_HOLD_CHUNKS_MAX`]; 0 never
    /// holds).
    pub hold_chunks_max: u64,
}

/// Serves until `shutdown` resolves: accepts connections on `listener` and handles each in a task
/// owned by this function. On shutdown it stops accepting and gives running exchanges `grace` to
/// end; an exchange cut off is harmless (chunks are content-addressed and an apply is atomic).
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> Result<(), NetError> {
    let acceptor = TlsAcceptor::from(config.identity.server_config(config.allowed.clone())?);
    // Before the first exchange (and before anyone is told what is live): complete in-place
    // applies a crash interrupted, so each live tree is one whole tree again.
    for (name, live) in &config.volumes {
        let dirs = VolumeDirs::new(&config.state_dir, name);
        let (name, live) = (name.clone(), live.clone());
        let done = blocking(move || {
            let Some(_lock) = VolumeLock::try_acquire(&dirs)? else {
                return Ok(false);
            };
            crate::patch::finish_interrupted(&live)
        })
        .await;
        match done {
            Ok(true) => tracing::info!(volume = %name, "completed an apply interrupted by a crash"),
            Ok(false) => {}
            // The exchanges of this volume fail with the same error until it is resolved.
            Err(e) => {
                tracing::error!(volume = %name, error = %e, "cannot complete an interrupted apply")
            }
        }
    }
    let shared = Arc::new(Shared {
        config,
        metrics,
        busy: Mutex::new(HashSet::new()),
        watches: Mutex::new(BTreeMap::new()),
    });
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    let mut look = tokio::time::interval(WATCH_LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = look.tick() => report_standby_changes(&shared),
            accepted = listener.accept() => {
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and similar: wait a little instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                let acceptor = acceptor.clone();
                tasks.spawn(async move {
                    // Refusals were logged where they were decided.
                    if let Err(e) = connection(shared, acceptor, tcp).await
                        && !matches!(e, NetError::Refused(_))
                    {
                        tracing::warn!(peer = %addr, error = %e, "exchange with primary ended with an error");
                    }
                });
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done && e.is_panic() {
                    tracing::error!(error = %e, "a connection handler panicked");
                }
            }
        }
    }
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.shutdown().await;
    Ok(())
}

/// How often `serve` reads its watches between syncs, to report a live tree changed by someone
/// else as soon as it happens rather than at the next sync.
const WATCH_LOOK_EVERY: Duration = Duration::from_secs(5);

/// Logs and counts each live tree whose watch newly saw a change made by someone else. The next
/// apply walks such a tree and keeps it aside; this only makes it visible sooner.
fn report_standby_changes(shared: &Shared) {
    let Ok(mut watches) = shared.watches.lock() else {
        return;
    };
    for (volume, w) in watches.iter_mut() {
        if let Some(why) = w.newly_changed() {
            tracing::warn!(volume = %volume, change = %why, "the standby's copy was changed by someone other than hearth; the next sync keeps it aside and restores the primary's tree (hearth volume verify shows the differences)");
            shared
                .metrics
                .changed_on_standby
                .get_or_create(&VolumeLabels {
                    volume: volume.clone(),
                })
                .inc();
        }
    }
}

struct Shared {
    config: ServeConfig,
    metrics: Metrics,
    /// Volumes with an exchange in progress in this process.
    busy: Mutex<HashSet<String>>,
    /// The watch on each volume's live tree that the last apply left ([`crate::watch`]).
    watches: Mutex<BTreeMap<String, crate::watch::LiveWatch>>,
}

/// Marks a volume busy in this process for as long as it lives.
struct BusyGuard {
    shared: Arc<Shared>,
    volume: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut b) = self.shared.busy.lock() {
            b.remove(&self.volume);
        }
    }
}

async fn connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
) -> Result<(), NetError> {
    let _ = tcp.set_nodelay(true);
    let peer_addr = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let tls = tokio::time::timeout(shared.config.timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| {
            NetError::Link(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        })?
        .map_err(|e| NetError::Handshake {
            peer: peer_addr.clone(),
            source: e,
        })?;
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(PeerId::of_cert)
        .ok_or_else(|| NetError::Protocol("the primary presented no certificate".into()))?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let timeout = shared.config.timeout;
    let hello = match recv(&mut rd, timeout).await? {
        Some(Request::Hello(h)) => h,
        other => {
            let refusal = Refusal::new(RefusalCode::BadRequest, "the first message must be Hello");
            return refuse(&shared, &mut wr, "", refusal, other.is_some()).await;
        }
    };
    tracing::info!(peer = %peer, addr = %peer_addr, volume = %hello.volume, epoch = hello.epoch, sender = %hello.sender, "primary connected");
    let live = shared.config.volumes.get(&hello.volume).cloned();
    let dirs = VolumeDirs::new(&shared.config.state_dir, &hello.volume);
    let mut st: StandbyState = if live.is_some() {
        state::load(&dirs.standby())?
    } else {
        StandbyState::default()
    };
    let raise = match decide_hello(&hello, live.is_some(), st.epoch) {
        HelloDecision::Refuse(r) => {
            if live.is_some() {
                st.refusals += 1;
                st.version = STATE_VERSION;
                state::save(&dirs.standby(), &st)?;
            }
            return refuse(&shared, &mut wr, &hello.volume, r, true).await;
        }
        HelloDecision::Accept { raise_epoch } => raise_epoch,
    };
    let Some(live) = live else {
        return Err(NetError::Protocol("accepted an unknown volume".into()));
    };
    // A primary that died a moment ago may still hold the volume here until its connection's end
    // is noticed (or its last batch is stored); wait a little before calling the volume busy.
    let mut claimed = false;
    let deadline = tokio::time::Instant::now() + BUSY_WAIT;
    loop {
        if shared
            .busy
            .lock()
            .map_err(|_| NetError::Protocol("busy set poisoned".into()))?
            .insert(hello.volume.clone())
        {
            claimed = true;
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !claimed {
        let r = Refusal::new(
            RefusalCode::Busy,
            format!(
                "another primary is pushing volume `{}` right now",
                hello.volume
            ),
        );
        return refuse(&shared, &mut wr, &hello.volume, r, true).await;
    }
    let _busy = BusyGuard {
        shared: shared.clone(),
        volume: hello.volume.clone(),
    };
    let Some(_lock) = VolumeLock::try_acquire(&dirs)? else {
        let r = Refusal::new(
            RefusalCode::Busy,
            format!(
                "another process holds the lock of volume `{}` ({})",
                hello.volume,
                dirs.lock().display()
            ),
        );
        return refuse(&shared, &mut wr, &hello.volume, r, true).await;
    };
    if let Some(epoch) = raise {
        // Durable before the answer: once a sender of this epoch was accepted, no older one
        // may be, even after a crash.
        st.epoch = epoch;
        st.version = STATE_VERSION;
        state::save(&dirs.standby(), &st)?;
        tracing::info!(volume = %hello.volume, epoch, "raised the volume's epoch");
    }
    // A first copy of a btrfs volume by the files backend is built in its own place and adopted
    // as a received snapshot at the end; everything below works on that place.
    let (live, first) = match hello.btrfs_first.clone() {
        None => (live, None),
        Some(first) => {
            let (l, f) = (live.clone(), first.clone());
            match blocking(move || crate::link_btrfs::prepare_first_copy(&l, &f)).await? {
                Ok(tree) => (tree, Some((first, live))),
                Err(reason) => {
                    let r = Refusal::new(
                        RefusalCode::BadRequest,
                        format!("volume `{}`: {reason}", hello.volume),
                    );
                    return refuse(&shared, &mut wr, &hello.volume, r, true).await;
                }
            }
        }
    };
    let changed = first.is_none()
        && shared
            .watches
            .lock()
            .ok()
            .and_then(|mut w| {
                w.get_mut(&hello.volume)
                    .map(crate::watch::LiveWatch::seen_change)
            })
            .unwrap_or(false);
    let live_tree = current_live(&live, &st, changed).await?;
    // A first copy was just found to have no received snapshot to go with it.
    let btrfs_received = match &first {
        Some(_) => Some(Vec::new()),
        None => {
            let l = live.clone();
            blocking(move || crate::link_btrfs::standby_received(&l)).await?
        }
    };
    if first.is_none() && btrfs_received.as_ref().is_some_and(|r| !r.is_empty()) {
        let (l, name) = (live.clone(), aside_name(&live, st.epoch, ""));
        if let Some(from) =
            blocking(move || crate::link_btrfs::restore_missing_live(&l, &name)).await?
        {
            tracing::warn!(volume = %hello.volume, live = %live.display(), from = %from.display(), "nothing was live; made the newest received snapshot live again");
        }
    }
    let incoming_dir = TreeNames::of(&live)?.incoming();
    let fresh = live_tree.is_none() && {
        let (l, i, c) = (live.clone(), incoming_dir.clone(), dirs.chunks());
        blocking(move || {
            Ok(live_content(&l)? == LiveContent::Empty
                && !i.exists()
                && ChunkStore::open_with(&c, Durability::Batch)?
                    .index()?
                    .is_empty())
        })
        .await?
    };
    let btrfs_empty = first.is_none() && btrfs_received.as_ref().is_some_and(Vec::is_empty) && {
        let l = live.clone();
        blocking(move || crate::link_btrfs::live_is_missing(&l)).await?
    };
    send(
        &mut wr,
        &Response::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            epoch: st.epoch,
            live: live_tree,
            btrfs_partial: btrfs_received.as_ref().and(dirs.partial_stream_held()),
            btrfs_received,
            fresh,
            btrfs_empty,
        }),
    )
    .await?;
    let mut session = Session {
        shared: shared.clone(),
        hello,
        peer,
        live,
        dirs,
        st,
        store: None,
        offer: None,
        wanted: HashSet::new(),
        hold: false,
        warming: None,
        batch: Vec::new(),
        batch_bytes: 0,
        incoming: Some(Incoming::new(incoming_dir.clone())),
        incoming_dir,
        first,
        applied: None,
        streamed: Vec::new(),
        streamed_bytes: 0,
        unsynced: 0,
        chunks: 0,
        bytes: 0,
    };
    session.run(&mut rd, &mut wr).await
}

/// The standby's live tree as the primary should know it: the applied manifest's hash, with the
/// capture time recorded when it was applied.
async fn current_live(
    live: &std::path::Path,
    st: &StandbyState,
    changed: bool,
) -> Result<Option<LiveTree>, NetError> {
    let live = live.to_owned();
    // An in-place apply a crash interrupted is completed before the primary is told what is live.
    let manifest = blocking(move || {
        crate::patch::finish_interrupted(&live)?;
        read_live_manifest_hashed(&live)
    })
    .await?;
    let Some((_, tree_hash)) = manifest else {
        return Ok(None);
    };
    let captured_at_ms = st
        .live
        .as_ref()
        .filter(|l| l.tree_hash == tree_hash.to_string())
        .map_or(0, |l| l.captured_at_ms);
    Ok(Some(LiveTree {
        tree_hash,
        captured_at_ms,
        changed,
    }))
}

struct Session {
    shared: Arc<Shared>,
    hello: Hello,
    peer: PeerId,
    live: PathBuf,
    dirs: VolumeDirs,
    st: StandbyState,
    store: Option<Arc<ChunkStore>>,
    offer: Option<(Offer, Arc<Manifest>)>,
    wanted: HashSet<ChunkId>,
    /// Whether the chunks of this offer are held in memory ([`ServeConfig::hold_chunks_max`]).
    hold: bool,
    /// The read-ahead of the live tree for the offered tree's apply (`patch::warm`).
    warming: Option<tokio::task::JoinHandle<()>>,
    batch: Vec<VerifiedChunk>,
    batch_bytes: usize,
    /// Files streamed before the offer; `None` only while a blocking task holds it.
    incoming: Option<Incoming>,
    incoming_dir: PathBuf,
    /// btrfs backend, a first copy by files: the snapshot, and the volume's real live path
    /// (`live` above is where the copy is built).
    first: Option<(crate::net::wire::BtrfsFirst, PathBuf)>,
    /// The tree the last commit of this session made live, and when it was captured.
    applied: Option<(crate::manifest::TreeHash, u64)>,
    /// Streamed file data not yet written.
    streamed: Vec<Streamed>,
    streamed_bytes: usize,
    unsynced: u64,
    chunks: u64,
    bytes: u64,
}

/// A piece of a file streamed before the offer, waiting to be written.
enum Streamed {
    Begin(Vec<u8>),
    Chunk {
        offset: u64,
        id: ChunkId,
        data: Vec<u8>,
    },
}

/// How a request ended the session early.
enum Stop {
    Refuse(Refusal),
    Error(NetError),
}

impl From<NetError> for Stop {
    fn from(e: NetError) -> Self {
        Stop::Error(e)
    }
}

impl From<VolumeError> for Stop {
    fn from(e: VolumeError) -> Self {
        Stop::Error(NetError::Volume(e))
    }
}

impl Session {
    async fn run<R, W>(&mut self, rd: &mut R, wr: &mut W) -> Result<(), NetError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let r = self.serve_requests(rd, wr).await;
        // The read-ahead of an offer that was never committed ends with the session.
        self.warmed().await;
        r
    }

    /// Waits for the read-ahead of the live tree started by the last offer, if any.
    async fn warmed(&mut self) {
        if let Some(task) = self.warming.take() {
            // It only reads; a failure costs the apply its head start.
            let _ = task.await;
        }
    }

    async fn serve_requests<R, W>(&mut self, rd: &mut R, wr: &mut W) -> Result<(), NetError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let timeout = self.shared.config.timeout;
        loop {
            // When the primary goes away, cleanly or not, the verified chunks that arrived are
            // stored, so the next attempt does not send them again (held chunks, at most
            // `hold_chunks_max` bytes, are lost with the connection and sent again).
            let req = match recv(rd, timeout).await {
                Ok(Some(req)) => req,
                Ok(None) => {
                    self.put_batch().await.ok();
                    self.write_streamed().await.ok();
                    return Ok(());
                }
                Err(e) => {
                    self.put_batch().await.ok();
                    self.write_streamed().await.ok();
                    return Err(e);
                }
            };
            if req == Request::Ping {
                continue;
            }
            let streaming = matches!(req, Request::FileBegin { .. } | Request::FileChunk { .. });
            if !streaming && let Err(e) = self.write_streamed().await {
                self.streamed.clear();
                return self.stopped(e, wr).await;
            }
            let outcome = match req {
                Request::FileBegin { path } => self.file_begin(path).await,
                Request::FileChunk { offset, id, data } => self.file_chunk(offset, id, data).await,
                Request::Offer(offer) => self.offer(offer, rd, wr).await,
                Request::Chunk { id, data } => self.chunk(id, data).await,
                Request::Flush => self.flush(wr).await,
                Request::Commit => self.commit(wr).await,
                Request::Verify => self.verify(wr).await,
                Request::Done => return Ok(()),
                Request::BtrfsOffer(offer) => self.btrfs_offer(offer, rd, wr).await,
                Request::BtrfsAdopt => self.btrfs_adopt(wr).await,
                Request::StreamPart(_) | Request::StreamEnd { .. } => Err(Stop::Refuse(
                    Refusal::new(RefusalCode::BadRequest, "a stream without an offer"),
                )),
                Request::Hello(_) | Request::ManifestPart(_) | Request::Ping => Err(Stop::Refuse(
                    Refusal::new(RefusalCode::BadRequest, "unexpected message"),
                )),
            };
            if let Err(stop) = outcome {
                return self.stopped(stop, wr).await;
            }
        }
    }

    /// Ends the session after a refusal or an error, telling the primary why.
    async fn stopped<W: AsyncWrite + Unpin>(
        &mut self,
        stop: Stop,
        wr: &mut W,
    ) -> Result<(), NetError> {
        match stop {
            Stop::Refuse(r) => {
                self.st.refusals += 1;
                state::save(&self.dirs.standby(), &self.st)?;
                refuse(&self.shared, wr, &self.hello.volume, r, true).await
            }
            Stop::Error(e) => {
                // Tell the primary why before hanging up, so its operator sees the cause.
                let r = Refusal::new(RefusalCode::Failed, e.to_string());
                let _ = send(wr, &Response::Refused(r)).await;
                Err(e)
            }
        }
    }

    async fn file_begin(&mut self, path: Vec<u8>) -> Result<(), Stop> {
        if self.offer.is_some() {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::BadRequest,
                "file data after the offer",
            )));
        }
        if !crate::manifest::is_plain_path(&path) {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::InvalidManifest,
                format!(
                    "volume `{}`: streamed path {:?} is not a plain relative path; nothing was written",
                    self.hello.volume,
                    String::from_utf8_lossy(&path)
                ),
            )));
        }
        self.streamed.push(Streamed::Begin(path));
        Ok(())
    }

    async fn file_chunk(&mut self, offset: u64, id: ChunkId, data: Vec<u8>) -> Result<(), Stop> {
        if self.offer.is_some() {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::BadRequest,
                "file data after the offer",
            )));
        }
        self.streamed_bytes += data.len();
        self.streamed.push(Streamed::Chunk { offset, id, data });
        if self.streamed_bytes >= PUT_BATCH_BYTES {
            self.write_streamed().await?;
        }
        Ok(())
    }

    /// Takes the received files out of the session for a blocking task (give them back with
    /// `self.incoming = Some(..)`; lost on a failed task, which only costs the next sync a
    /// re-check of the files on disk).
    fn take_incoming(&mut self) -> Incoming {
        self.incoming
            .take()
            .unwrap_or_else(|| Incoming::new(self.incoming_dir.clone()))
    }

    /// Writes the streamed file data received so far, each chunk checked against its id first.
    async fn write_streamed(&mut self) -> Result<(), Stop> {
        if self.streamed.is_empty() {
            return Ok(());
        }
        let ops = std::mem::take(&mut self.streamed);
        self.streamed_bytes = 0;
        let mut inc = self.take_incoming();
        let (inc, written) = blocking(move || {
            let before = inc.written();
            for op in ops {
                match op {
                    Streamed::Begin(path) => inc.begin(&path)?,
                    Streamed::Chunk { offset, id, data } => inc.write(offset, id, data)?,
                }
            }
            // What the last file gathered is written now, so that it counts with this batch.
            inc.flush()?;
            let written = inc.written() - before;
            Ok((inc, written))
        })
        .await
        .map_err(|e| match e {
            NetError::Volume(
                e @ (VolumeError::ChunkMismatch { .. } | VolumeError::InvalidManifest(_)),
            ) => Stop::Refuse(Refusal::new(
                if matches!(e, VolumeError::ChunkMismatch { .. }) {
                    RefusalCode::ChunkMismatch
                } else {
                    RefusalCode::BadRequest
                },
                format!(
                    "volume `{}`: {e}; that chunk was not written",
                    self.hello.volume
                ),
            )),
            other => Stop::Error(other),
        })?;
        self.incoming = Some(inc);
        self.bytes += written;
        self.shared
            .metrics
            .bytes_received
            .get_or_create(&VolumeLabels {
                volume: self.hello.volume.clone(),
            })
            .inc_by(written);
        Ok(())
    }

    fn store(&mut self) -> Result<Arc<ChunkStore>, VolumeError> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let s = Arc::new(ChunkStore::open_with(
            &self.dirs.chunks(),
            Durability::Batch,
        )?);
        self.store = Some(s.clone());
        Ok(s)
    }

    async fn offer<R, W>(&mut self, offer: Offer, rd: &mut R, wr: &mut W) -> Result<(), Stop>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if offer.manifest_len > MAX_MANIFEST {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::InvalidManifest,
                format!(
                    "manifest of {} bytes is larger than the limit",
                    offer.manifest_len
                ),
            )));
        }
        let mut bytes = Vec::with_capacity(offer.manifest_len as usize);
        while (bytes.len() as u64) < offer.manifest_len {
            match recv(rd, self.shared.config.timeout).await? {
                Some(Request::ManifestPart(part))
                    if bytes.len() as u64 + part.len() as u64 <= offer.manifest_len =>
                {
                    bytes.extend_from_slice(&part)
                }
                _ => {
                    return Err(Stop::Refuse(Refusal::new(
                        RefusalCode::BadRequest,
                        "the manifest parts do not add up to the announced length",
                    )));
                }
            }
        }
        // A delta is rebuilt against the live manifest, which must be the tree it was made from.
        let base = match (offer.delta, offer.parent) {
            (false, _) => None,
            (true, Some(parent)) => Some((self.live.clone(), parent)),
            (true, None) => {
                return Err(Stop::Refuse(Refusal::new(
                    RefusalCode::BadRequest,
                    "a manifest delta without the tree it is against",
                )));
            }
        };
        let rebuilt = blocking(move || match base {
            None => Manifest::decode_hashed(&bytes),
            Some((live, parent)) => {
                let delta = crate::delta::ManifestDelta::decode(&bytes)?;
                let live_hash = read_live_manifest_hashed(&live)?;
                let Some((base, base_hash)) = live_hash.filter(|(_, h)| *h == parent) else {
                    return Err(VolumeError::InvalidManifest(format!(
                        "the delta is against tree {parent}, which is not the live tree here"
                    )));
                };
                let m = delta.apply(&base)?;
                let hash = m.tree_hash()?;
                tracing::debug!(base = %base_hash, changes = delta.changes.len(), "manifest rebuilt from a delta");
                Ok((m, hash))
            }
        });
        let (manifest, hash) = match rebuilt.await {
            Ok(m) => m,
            // What the primary sent is wrong; a failure to read the live manifest is the
            // standby's own and ends the session as `Failed`, below.
            Err(NetError::Volume(e @ VolumeError::InvalidManifest(_))) => {
                return Err(Stop::Refuse(Refusal::new(
                    RefusalCode::InvalidManifest,
                    format!("volume `{}`: {e}; nothing was written", self.hello.volume),
                )));
            }
            Err(e) => return Err(e.into()),
        };
        // A volume is service data; a device node in it would give whoever controls the primary
        // raw access to a disk on the standby.
        if let Some(dev) = manifest.entries.iter().find(|e| {
            matches!(
                e.kind,
                crate::manifest::EntryKind::CharDevice { .. }
                    | crate::manifest::EntryKind::BlockDevice { .. }
            )
        }) {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::InvalidManifest,
                format!(
                    "volume `{}`: the tree holds a device node (/{}); standbys do not accept device nodes; nothing was written",
                    self.hello.volume,
                    String::from_utf8_lossy(&dev.path)
                ),
            )));
        }
        if hash != offer.tree_hash {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::InvalidManifest,
                format!(
                    "the manifest{} does not have the announced tree hash; nothing was written",
                    if offer.delta {
                        " rebuilt from the delta"
                    } else {
                        ""
                    }
                ),
            )));
        }
        let store = self.store()?;
        let manifest = Arc::new(manifest);
        let m = manifest.clone();
        let live = self.live.clone();
        let mut inc = self.take_incoming();
        let (inc, missing, missing_bytes, checked) = blocking(move || {
            // Files left by an interrupted session count only where they hash right.
            let checked = inc.check_against(&m)?;
            let missing = wanted_chunks(&store, &m, &live, Some(&inc))?;
            let missing_bytes = chunk_bytes(&m, &missing);
            Ok((inc, missing, missing_bytes, checked))
        })
        .await?;
        self.incoming = Some(inc);
        self.hold = missing_bytes <= self.shared.config.hold_chunks_max
            && self.shared.config.hold_chunks_max > 0;
        tracing::info!(volume = %self.hello.volume, tree = %offer.tree_hash, missing = missing.len(), missing_bytes, held = self.hold, streamed = self.bytes, checked, "tree offered");
        self.wanted = missing.iter().copied().collect();
        send_want(wr, &missing).await?;
        // While the chunks arrive, what an in-place apply will touch is read into the cache.
        self.warmed().await;
        if self.shared.config.in_place && self.first.is_none() {
            let (live, new) = (self.live.clone(), manifest.clone());
            self.warming = Some(tokio::task::spawn_blocking(move || {
                if let Ok(Some((old, _))) = read_live_manifest_hashed(&live) {
                    crate::patch::warm(&live, &old, &new);
                }
            }));
        }
        self.offer = Some((offer, manifest));
        Ok(())
    }

    async fn chunk(&mut self, id: ChunkId, data: Vec<u8>) -> Result<(), Stop> {
        if !self.wanted.remove(&id) {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::BadRequest,
                format!("chunk {id} was not asked for"),
            )));
        }
        // Checked once, here, so a bad chunk is refused before it is batched; the store takes the
        // checked chunk without hashing it again.
        let chunk = match VerifiedChunk::new(id, data) {
            Ok(c) => c,
            Err(e) => {
                return Err(Stop::Refuse(Refusal::new(
                    RefusalCode::ChunkMismatch,
                    format!("{e}; nothing of it was written"),
                )));
            }
        };
        self.batch_bytes += chunk.len();
        self.batch.push(chunk);
        if self.batch_bytes >= PUT_BATCH_BYTES {
            self.put_batch().await?;
        }
        Ok(())
    }

    async fn put_batch(&mut self) -> Result<(), Stop> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let store = self.store()?;
        let n: u64 = batch.iter().map(|c| c.len() as u64).sum();
        // The offer's estimate can be short: chunks a live file changed on the standby no longer
        // holds are asked for again at apply, and a primary may misstate chunk lengths. Past the
        // bound, everything held so far and everything after goes to the store on disk.
        if self.hold && store.held_bytes() + n > self.shared.config.hold_chunks_max {
            self.hold = false;
            self.unsynced += store.held_bytes();
            let s = store.clone();
            blocking(move || s.spill()).await?;
            tracing::info!(volume = %self.hello.volume, "more chunk data than a small sync holds in memory; writing it to the chunk store");
        }
        let sync = {
            self.chunks += batch.len() as u64;
            self.bytes += n;
            if !self.hold {
                self.unsynced += n;
            }
            self.shared
                .metrics
                .bytes_received
                .get_or_create(&VolumeLabels {
                    volume: self.hello.volume.clone(),
                })
                .inc_by(n);
            self.unsynced >= SYNC_EVERY_BYTES
        };
        if sync {
            self.unsynced = 0;
        }
        if self.hold {
            for chunk in batch {
                store.hold(chunk);
            }
            return Ok(());
        }
        blocking(move || {
            for chunk in &batch {
                store.put_verified(chunk)?;
            }
            if sync {
                store.sync()?;
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Makes what this session wrote to the chunk store durable, unless it wrote nothing there:
    /// held chunks are never durable, by design. Received files are never synced on their own: a
    /// later session checks them by hash before they count, and the apply's `syncfs` of the new
    /// tree, beside which they lie, makes them durable with it. (Syncing them at the flush before
    /// the commit took a second of a 5 GB first sync, which the apply then overlaps with its
    /// build.)
    async fn sync_store(&mut self) -> Result<(), Stop> {
        if self.hold && self.unsynced == 0 {
            return Ok(());
        }
        let store = self.store()?;
        blocking(move || store.sync()).await?;
        self.unsynced = 0;
        Ok(())
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> Result<(), Stop> {
        self.put_batch().await?;
        self.sync_store().await?;
        send(
            wr,
            &Response::Stored {
                chunks: self.chunks,
                bytes: self.bytes,
            },
        )
        .await?;
        Ok(())
    }

    async fn commit<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> Result<(), Stop> {
        self.put_batch().await?;
        self.warmed().await;
        let Some((offer, manifest)) = self.offer.clone() else {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::BadRequest,
                "commit without an offer",
            )));
        };
        self.sync_store().await?;
        let store = self.store()?;
        tracing::info!(volume = %self.hello.volume, chunks = self.chunks, bytes = self.bytes, "chunks received; applying");
        let live = self.live.clone();
        let content = {
            let live = live.clone();
            blocking(move || live_content(&live)).await?
        };
        let mut kept = Vec::new();
        // A tree from another history is kept aside by apply itself, at the switch, so the live
        // path never stands empty (and an apply that fails leaves it as it was).
        let set_aside = match decide_live(&content, &offer.tree_hash, offer.parent.as_ref()) {
            LiveAction::Unchanged | LiveAction::Replace => None,
            LiveAction::KeepAside { reason } => Some(SetAside {
                epoch: self.hello.epoch,
                reason,
            }),
        };
        let aside_reason = set_aside.as_ref().map(|a| a.reason.clone());
        let keep = self.shared.config.keep;
        // A first copy is always built whole (there is nothing to change in place).
        let in_place = self.shared.config.in_place && self.first.is_none();
        let watched = self.first.is_none();
        let applied = {
            let store = store.clone();
            let m = manifest.clone();
            let l = live.clone();
            let mut inc = self.take_incoming();
            let volume = self.hello.volume.clone();
            // A first copy of a btrfs volume is not watched: it becomes a read-only snapshot.
            let mut watch = self
                .shared
                .watches
                .lock()
                .ok()
                .filter(|_| watched)
                .and_then(|mut w| w.remove(&volume));
            let r = blocking(move || {
                let r = apply_and_prune(
                    &store,
                    &m,
                    &l,
                    keep,
                    set_aside,
                    Some(&mut inc),
                    in_place,
                    watched.then_some(&mut watch),
                );
                Ok((inc, r, watch))
            })
            .await?;
            self.incoming = Some(r.0);
            if let (Some(w), true, Ok(mut all)) = (r.2, watched, self.shared.watches.lock()) {
                all.insert(volume, w);
            }
            r.1.map_err(NetError::Volume)
        };
        let (report, pruned) = match applied {
            Ok(r) => r,
            // A chunk lost or torn since it was stored (a crash before the store was synced, or
            // a bad disk): ask for the chunks again instead of failing the whole sync.
            Err(NetError::Volume(
                e @ (VolumeError::MissingChunks { .. } | VolumeError::ChunkMismatch { .. }),
            )) => {
                // Apply names what neither the store nor a live file holds; after a damaged
                // chunk (moved out of the store when found) the list is worked out again.
                let missing = match e {
                    VolumeError::MissingChunks { ids } => ids,
                    _ => {
                        let m = manifest.clone();
                        let s = store.clone();
                        let l = live.clone();
                        let inc = self.take_incoming();
                        let (inc, w) = blocking(move || {
                            let w = wanted_chunks(&s, &m, &l, Some(&inc))?;
                            Ok((inc, w))
                        })
                        .await?;
                        self.incoming = Some(inc);
                        w
                    }
                };
                tracing::warn!(volume = %self.hello.volume, missing = missing.len(), "chunks missing at apply; asking for them again");
                self.wanted = missing.iter().copied().collect();
                send_want(wr, &missing).await?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        // The next sync starts by reading the live manifest: it is this one, already decoded.
        if report.tree_hash == offer.tree_hash {
            crate::apply::remember_live_manifest(&live, manifest.clone(), offer.tree_hash);
        }
        if let Some(aside) = &report.set_aside {
            let reason = aside_reason
                .unwrap_or_else(|| "the replaced tree had changed on the standby".into());
            tracing::warn!(volume = %self.hello.volume, path = %aside.display(), %reason, "kept the standby's tree aside, read-only");
            self.shared
                .metrics
                .kept_aside
                .get_or_create(&VolumeLabels {
                    volume: self.hello.volume.clone(),
                })
                .inc();
            kept.push(aside.display().to_string());
            self.st.kept_aside.push(KeptAside {
                path: aside.display().to_string(),
                reason,
                epoch: self.hello.epoch,
                at_ms: now_ms(),
            });
        }
        for d in &pruned.diverged {
            kept.push(d.display().to_string());
            self.st.kept_aside.push(KeptAside {
                path: d.display().to_string(),
                reason: "a replaced tree had been changed on the standby".into(),
                epoch: self.hello.epoch,
                at_ms: now_ms(),
            });
        }
        self.st.version = STATE_VERSION;
        // A first copy of a btrfs volume counts as an apply once it is adopted.
        self.st.applies += u64::from(self.first.is_none());
        self.st.bytes_received += self.bytes;
        self.st.live = Some(LiveRecord {
            tree_hash: offer.tree_hash.to_string(),
            captured_at_ms: offer.captured_at_ms,
            applied_at_ms: now_ms(),
            sender: self.peer.to_string(),
            epoch: self.hello.epoch,
        });
        state::save(&self.dirs.standby(), &self.st)?;
        self.bytes = 0;
        self.applied = Some((offer.tree_hash, offer.captured_at_ms));
        if self.first.is_none() {
            self.shared
                .metrics
                .applies
                .get_or_create(&VolumeLabels {
                    volume: self.hello.volume.clone(),
                })
                .inc();
        }
        // The live tree now holds every chunk it needs; the store and the received files keep
        // nothing between syncs, so the standby needs room for the volume once (plus replaced
        // trees), not twice.
        let s = store.clone();
        let mut inc = self.take_incoming();
        let inc = blocking(move || {
            s.retain(&HashSet::new())?;
            inc.remove()?;
            Ok(inc)
        })
        .await?;
        self.incoming = Some(inc);
        tracing::info!(volume = %self.hello.volume, tree = %offer.tree_hash, files = report.files, unchanged = report.unchanged, in_place = report.in_place, walked_live = report.walked_live, received_whole = report.received_whole, "tree applied");
        send(
            wr,
            &Response::Applied(Applied {
                tree_hash: report.tree_hash,
                unchanged: report.unchanged,
                files: report.files,
                bytes: report.bytes,
                reused: report.reused,
                kept_aside: kept,
            }),
        )
        .await?;
        self.offer = None;
        // Pruning after the answer, off the primary's clock but still under the volume's lock:
        // kept trees an in-place apply left to prune share no inodes with the live tree, so
        // deleting them now cannot move the stamps just taken.
        if !report.prune_later {
            return Ok(());
        }
        let live = self.live.clone();
        let pruned = blocking(move || crate::apply::prune_previous(&live, keep)).await?;
        if !pruned.diverged.is_empty() {
            for d in &pruned.diverged {
                self.st.kept_aside.push(KeptAside {
                    path: d.display().to_string(),
                    reason: "a replaced tree had been changed on the standby".into(),
                    epoch: self.hello.epoch,
                    at_ms: now_ms(),
                });
            }
            state::save(&self.dirs.standby(), &self.st)?;
        }
        Ok(())
    }

    async fn btrfs_offer<R, W>(
        &mut self,
        offer: BtrfsOffer,
        rd: &mut R,
        wr: &mut W,
    ) -> Result<(), Stop>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        use crate::link_btrfs as lb;
        let live = self.live.clone();
        let parent_dir = live
            .parent()
            .unwrap_or(std::path::Path::new("/"))
            .to_owned();
        if !lb::on_btrfs(&parent_dir) {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::BadRequest,
                format!(
                    "volume `{}`: {} is not on btrfs on this standby; push with --backend files",
                    self.hello.volume,
                    parent_dir.display()
                ),
            )));
        }
        let staging = lb::staging_dir(&live);
        let (received, source) = {
            let (l, st) = (live.clone(), staging.clone());
            blocking(move || {
                std::fs::create_dir_all(&st).map_err(|e| VolumeError::io("creating", &st, e))?;
                let received = crate::btrfs::received_uuids(&st).map_err(VolumeError::Btrfs)?;
                Ok((received, lb::live_source(&l)?))
            })
            .await?
        };
        if let Some(p) = &offer.parent
            && !received.iter().any(|u| u.eq_ignore_ascii_case(p))
        {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::BadRequest,
                format!("the parent snapshot {p} is not on this standby; a full stream is needed"),
            )));
        }
        let action = lb::decide_btrfs_live(
            live.exists(),
            source.as_deref(),
            offer.parent.as_deref(),
            &offer.history,
        );
        // A stream is copied as it arrives, so that a transfer cut at any point resumes where it
        // stopped: `btrfs send` cannot resume, but the same snapshot's stream (from the same
        // parent) can be made again and the part held here skipped. A push after a cut sends the
        // same snapshot again when the volume did not change meanwhile (see `push_btrfs`).
        let spool_path = match &offer.parent {
            _ if !self.shared.config.resume_copies => None,
            None => self.dirs.partial_stream(&offer.uuid),
            Some(p) => self.dirs.partial_incremental_stream(&offer.uuid, p),
        };
        let spool = match &spool_path {
            Some(p) => Some(lb::Spool::open(p.clone()).await?),
            None => None,
        };
        let offset = spool.as_ref().map_or(0, lb::Spool::held);
        send(wr, &Response::BtrfsResume { offset }).await?;
        tracing::info!(volume = %self.hello.volume, snapshot = %offer.uuid, parent = ?offer.parent, resume_at = offset, "receiving a btrfs stream");
        let (tx, rx) = tokio::io::duplex(4 << 20);
        let timeout = self.shared.config.timeout;
        let received =
            lb::receive_checked(&staging, rx, lb::feed_stream(tx, rd, timeout, spool)).await;
        if let Some(p) = &spool_path {
            // Kept only when the link broke; a stream that was wrong, or that `btrfs receive`
            // refused, would fail the same way again.
            let link_cut = matches!(&received, Err(NetError::Link(e)) if e.kind() != io::ErrorKind::BrokenPipe);
            if !link_cut {
                lb::Spool::remove(p).await;
            }
        }
        let (received, len) = received?;
        self.make_received_live(
            received,
            live,
            action,
            (offer.uuid, offer.captured_at_ms),
            len,
            wr,
        )
        .await
    }

    /// A first copy by the files backend is complete ([`Request::BtrfsAdopt`]): it becomes the
    /// received copy of the primary's snapshot, and a writable snapshot of it the live
    /// subvolume, exactly as after a full stream.
    async fn btrfs_adopt<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> Result<(), Stop> {
        let (Some((first, live)), Some((tree_hash, captured_at_ms))) =
            (self.first.clone(), self.applied)
        else {
            return Err(Stop::Refuse(Refusal::new(
                RefusalCode::BadRequest,
                "BtrfsAdopt without a first copy applied on this connection",
            )));
        };
        let received = {
            let (l, f) = (live.clone(), first.clone());
            blocking(move || crate::link_btrfs::adopt_first_copy(&l, &f, tree_hash)).await?
        };
        tracing::info!(volume = %self.hello.volume, snapshot = %first.uuid, path = %received.path.display(), "the first copy is now the snapshot's received copy");
        let action = {
            let l = live.clone();
            let exists = live.exists();
            let source = blocking(move || crate::link_btrfs::live_source(&l)).await?;
            crate::link_btrfs::decide_btrfs_live(exists, source.as_deref(), None, &first.history)
        };
        self.live = live.clone();
        self.first = None;
        self.make_received_live(received, live, action, (first.uuid, captured_at_ms), 0, wr)
            .await
    }

    /// Switches a writable snapshot of `received` in at `live` (keeping the replaced subvolume
    /// aside when `action` says so), prunes received snapshots beyond retention, records the
    /// apply and answers [`Response::BtrfsApplied`]. `len` is the stream's length (0 when the
    /// bytes were counted by the files backend).
    async fn make_received_live<W: AsyncWrite + Unpin>(
        &mut self,
        received: crate::btrfs::SubvolInfo,
        live: PathBuf,
        action: crate::link_btrfs::BtrfsLiveAction,
        (uuid, captured_at_ms): (String, u64),
        len: u64,
        wr: &mut W,
    ) -> Result<(), Stop> {
        use crate::link_btrfs as lb;
        let staging = lb::staging_dir(&live);
        let epoch = self.hello.epoch;
        let mut kept = Vec::new();
        let mut reasons = Vec::new();
        // A subvolume from outside the sender's history is kept aside by the switch itself, so
        // the live path never stands empty.
        let history_reason = match action {
            lb::BtrfsLiveAction::KeepAside { reason } => Some(reason),
            lb::BtrfsLiveAction::Switch => None,
        };
        let keep_replaced = history_reason.is_some();
        let keep = self.shared.config.keep.max(1);
        let report = {
            let (r, l, name, st) = (
                received.clone(),
                live.clone(),
                aside_name(&live, epoch, ""),
                staging.clone(),
            );
            blocking(move || {
                let report = if keep_replaced {
                    crate::btrfs::switch_live_keeping_replaced(&r, &l, &name)
                } else {
                    crate::btrfs::switch_live(&r, &l, &name)
                }
                .map_err(VolumeError::Btrfs)?;
                // Received snapshots: the newest `keep` stay, and always the one just made live
                // (the parent of the next incremental stream).
                let all = crate::btrfs::list_snapshots(&st).map_err(VolumeError::Btrfs)?;
                let pin: Vec<String> = r.received_uuid.iter().cloned().collect();
                for d in crate::btrfs::select_for_prune(&all, keep, &pin) {
                    crate::btrfs::delete_subvolume(&d.path).map_err(VolumeError::Btrfs)?;
                }
                Ok(report)
            })
            .await?
        };
        if let (Some(reason), Some(crate::btrfs::Replaced::KeptAside { path, .. })) =
            (&history_reason, &report.replaced)
        {
            tracing::warn!(volume = %self.hello.volume, path = %path.display(), %reason, "kept the standby's subvolume aside, read-only");
        }
        for (i, r) in [&report.replaced, &report.leftover].into_iter().enumerate() {
            if let Some(crate::btrfs::Replaced::KeptAside { path, reason, .. }) = r {
                kept.push(path.display().to_string());
                // The replaced subvolume's reason is the history check's when that decided.
                reasons.push(match (&history_reason, i) {
                    (Some(h), 0) => h.clone(),
                    _ => reason.to_string(),
                });
            }
        }
        for (path, reason) in kept.iter().zip(&reasons) {
            self.st.kept_aside.push(KeptAside {
                path: path.clone(),
                reason: reason.clone(),
                epoch,
                at_ms: now_ms(),
            });
            self.shared
                .metrics
                .kept_aside
                .get_or_create(&VolumeLabels {
                    volume: self.hello.volume.clone(),
                })
                .inc();
        }
        self.st.version = STATE_VERSION;
        self.st.applies += 1;
        self.st.bytes_received += len;
        self.st.live = Some(LiveRecord {
            tree_hash: uuid.clone(),
            captured_at_ms,
            applied_at_ms: now_ms(),
            sender: self.peer.to_string(),
            epoch,
        });
        state::save(&self.dirs.standby(), &self.st)?;
        let labels = VolumeLabels {
            volume: self.hello.volume.clone(),
        };
        self.shared.metrics.applies.get_or_create(&labels).inc();
        self.shared
            .metrics
            .bytes_received
            .get_or_create(&labels)
            .inc_by(len);
        tracing::info!(volume = %self.hello.volume, snapshot = %uuid, "snapshot applied");
        {
            let l = live.clone();
            if blocking(move || crate::link_btrfs::discard_first_copy(&l)).await? {
                tracing::info!(volume = %self.hello.volume, "deleted what a cut first copy had left");
            }
        }
        send(
            wr,
            &Response::BtrfsApplied {
                uuid,
                kept_aside: kept,
            },
        )
        .await?;
        Ok(())
    }

    async fn verify<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> Result<(), Stop> {
        let live = self.live.clone();
        let chunking = {
            let l = live.clone();
            blocking(move || read_live_manifest_hashed(&l))
                .await?
                .map(|(m, _)| m.chunking)
        };
        // A btrfs volume has no manifest; its tree is captured with the default chunk sizes, as
        // the primary captures its snapshot for the comparison.
        let chunking = match chunking {
            Some(c) => c,
            None if std::fs::symlink_metadata(&live).is_ok_and(|m| m.is_dir()) => {
                crate::manifest::ChunkParams::default()
            }
            None => {
                send(wr, &Response::Verifying { manifest_len: None }).await?;
                return Ok(());
            }
        };
        // A fresh capture, without cache, so the answer is about the bytes on disk now.
        let opts = CaptureOptions {
            chunking,
            max_retries: 3,
            unstable: UnstablePolicy::Include,
            allow_devices: true,
            ignore_device: false,
        };
        let encoded = blocking(move || capture(&live, &opts, None)?.manifest.encode()).await?;
        send(
            wr,
            &Response::Verifying {
                manifest_len: Some(encoded.len() as u64),
            },
        )
        .await?;
        for part in encoded.chunks(MANIFEST_PART) {
            wire::write_frame(wr, &Response::ManifestPart(part.to_vec())).await?;
        }
        wire::flush(wr).await?;
        Ok(())
    }
}

/// The chunks of `manifest` the standby must be sent: neither in the store nor in its live tree
/// (apply takes those from the live files; if one changed meanwhile, apply finds the chunk
/// missing and it is asked for then).
fn wanted_chunks(
    store: &ChunkStore,
    manifest: &Manifest,
    live: &std::path::Path,
    incoming: Option<&Incoming>,
) -> Result<Vec<ChunkId>, VolumeError> {
    let in_live = read_live_manifest_hashed(live)?
        .map(|(l, _)| l.chunk_ids())
        .unwrap_or_default();
    Ok(store
        .missing(manifest)
        .into_iter()
        .filter(|id| !in_live.contains(id))
        .filter(|id| !incoming.is_some_and(|i| i.has_chunk(id)))
        .collect())
}

/// How many bytes the chunks `ids` of `manifest` hold (each counted once).
fn chunk_bytes(manifest: &Manifest, ids: &[ChunkId]) -> u64 {
    let mut left: HashSet<ChunkId> = ids.iter().copied().collect();
    let mut bytes = 0;
    for e in &manifest.entries {
        if let crate::manifest::EntryKind::File { chunks, .. } = &e.kind {
            for c in chunks {
                if left.remove(&c.id) {
                    bytes += u64::from(c.len);
                }
            }
        }
        if left.is_empty() {
            break;
        }
    }
    bytes
}

/// A name beside `live` for a subvolume kept aside: `.<name>.hearth-diverged.e<epoch>.<ns><suffix>`.
fn aside_name(live: &std::path::Path, epoch: u64, suffix: &str) -> String {
    let name = live
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(".{name}.hearth-diverged.e{epoch}.{ns}{suffix}")
}

fn live_content(live: &std::path::Path) -> Result<LiveContent, VolumeError> {
    match read_live_manifest_hashed(live)? {
        Some((_, hash)) => Ok(LiveContent::Applied(hash)),
        None => match std::fs::read_dir(live) {
            Ok(mut it) => Ok(if it.next().is_none() {
                LiveContent::Empty
            } else {
                LiveContent::Foreign
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(LiveContent::Empty),
            Err(e) => Err(VolumeError::io("listing", live, e)),
        },
    }
}

async fn send_want<W: AsyncWrite + Unpin>(wr: &mut W, ids: &[ChunkId]) -> Result<(), NetError> {
    let mut parts = ids.chunks(WANT_PART).peekable();
    if parts.peek().is_none() {
        return send(
            wr,
            &Response::Want {
                ids: Vec::new(),
                last: true,
            },
        )
        .await;
    }
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        wire::write_frame(
            wr,
            &Response::Want {
                ids: part.to_vec(),
                last,
            },
        )
        .await?;
    }
    wire::flush(wr).await
}

async fn refuse<W: AsyncWrite + Unpin>(
    shared: &Shared,
    wr: &mut W,
    volume: &str,
    refusal: Refusal,
    answer: bool,
) -> Result<(), NetError> {
    tracing::warn!(volume, code = ?refusal.code, reason = %refusal.message, "refused a primary's request");
    shared
        .metrics
        .refusals
        .get_or_create(&ReasonLabels {
            volume: volume.to_owned(),
            reason: format!("{:?}", refusal.code),
        })
        .inc();
    if answer {
        send(wr, &Response::Refused(refusal.clone())).await?;
    }
    Err(NetError::Refused(refusal))
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, msg: &Response) -> Result<(), NetError> {
    wire::write_frame(wr, msg).await?;
    wire::flush(wr).await
}

async fn recv<R: AsyncRead + Unpin>(
    rd: &mut R,
    timeout: Duration,
) -> Result<Option<Request>, NetError> {
    tokio::time::timeout(timeout, wire::read_frame(rd))
        .await
        .map_err(|_| {
            NetError::Link(io::Error::new(
                io::ErrorKind::TimedOut,
                "the primary went silent",
            ))
        })?
}

/// Runs blocking filesystem work off the async threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, VolumeError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetError::Protocol(format!("a blocking task failed: {e}")))?
        .map_err(NetError::Volume)
}
