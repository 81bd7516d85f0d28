//! The `btrfs` backend on the link: the primary snapshots the volume's subvolume and sends
//! `btrfs send` streams (incremental from the newest snapshot the standby holds, matched by UUID);
//! the standby receives them into a staging folder beside the live subvolume and switches a writable
//! snapshot of the received one in atomically. The local parts (snapshots, send, receive, switch) are
//! in [`crate::btrfs`]; this module is the exchange and the decisions about history.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::btrfs::{self, BtrfsError, ParentChoice, SubvolInfo};
use crate::error::VolumeError;
use crate::metrics::Metrics;
use crate::net::NetError;
use crate::net::wire::{self, BtrfsOffer, Hello, PROTOCOL_VERSION, Request, Response};
use crate::primary::{PushConfig, PushReport, SyncKind, SyncOutcome, Target, connect, record};
use crate::standby::blocking;
use crate::state::{self, PrimaryState, STATE_VERSION, Snapshot, VolumeDirs, now_ms};

/// The magic number `statfs` reports for btrfs.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;

/// Pieces of a send stream on the wire.
const STREAM_PART: usize = 1 << 20;

/// Whether `path` is on a btrfs filesystem.
// `f_type`'s integer type differs between architectures, so the cast stays.
#[allow(clippy::unnecessary_cast)]
pub fn on_btrfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == BTRFS_SUPER_MAGIC)
}

/// Where the standby keeps received snapshots of the live subvolume `live`: a hidden folder beside it
/// (same filesystem, as `btrfs receive` and snapshots need).
pub fn staging_dir(live: &Path) -> PathBuf {
    hidden(live, "hearth-received")
}

/// Where the primary keeps its read-only snapshots of the volume `source`.
pub fn snapshot_dir(source: &Path) -> PathBuf {
    hidden(source, "hearth-snapshots")
}

/// A read-only snapshot of a volume taken for one push of the files backend, beside the volume in
/// `.<name>.hearth-capture/`, and deleted when the push is over.
#[derive(Debug)]
pub struct CaptureView {
    path: PathBuf,
}

impl CaptureView {
    /// Takes the snapshot when `source` is a btrfs subvolume (`None` otherwise). Snapshots left
    /// in the folder by an earlier push that was killed are hearth's own copies and are deleted
    /// first.
    pub fn take(source: &Path, volume: &str) -> Result<Option<CaptureView>, VolumeError> {
        if !btrfs::is_subvolume(source).unwrap_or(false) {
            return Ok(None);
        }
        let dir = hidden(source, "hearth-capture");
        std::fs::create_dir_all(&dir).map_err(|e| VolumeError::io("creating", &dir, e))?;
        for old in btrfs::list_snapshots(&dir).map_err(VolumeError::Btrfs)? {
            btrfs::delete_subvolume(&old.path).map_err(VolumeError::Btrfs)?;
        }
        let name = format!("{volume}.{}", now_ms());
        let snap = btrfs::take_snapshot(source, &dir, &name).map_err(VolumeError::Btrfs)?;
        Ok(Some(CaptureView { path: snap.path }))
    }

    /// Where the snapshot is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the snapshot.
    pub fn remove(self) -> Result<(), VolumeError> {
        btrfs::delete_subvolume(&self.path).map_err(VolumeError::Btrfs)
    }
}

fn hidden(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.parent()
        .unwrap_or(Path::new("/"))
        .join(format!(".{name}.{suffix}"))
}

fn vol(e: BtrfsError) -> NetError {
    NetError::Volume(VolumeError::Btrfs(e))
}

/// What the standby does with its live subvolume before a received snapshot replaces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BtrfsLiveAction {
    /// Let the switch replace it (it deletes the old subvolume only if hearth made it and it is
    /// unchanged, and keeps it aside otherwise).
    Switch,
    /// Keep it aside first: it did not come from the sender's history.
    KeepAside {
        /// Why, for logs and status.
        reason: String,
    },
}

/// Decides about the live subvolume, given the primary snapshot it was made from (`live_source`,
/// `None` when it was not made from a received snapshot or there is none), the offered parent and
/// the sender's history. Pure.
pub fn decide_btrfs_live(
    live_exists: bool,
    live_source: Option<&str>,
    parent: Option<&str>,
    history: &[String],
) -> BtrfsLiveAction {
    if !live_exists {
        return BtrfsLiveAction::Switch;
    }
    match live_source {
        Some(s)
            if parent.is_some_and(|p| p.eq_ignore_ascii_case(s))
                || history.iter().any(|h| h.eq_ignore_ascii_case(s)) =>
        {
            BtrfsLiveAction::Switch
        }
        Some(s) => BtrfsLiveAction::KeepAside {
            reason: format!(
                "the standby's subvolume came from snapshot {s}, which is not in the sender's history"
            ),
        },
        None => BtrfsLiveAction::KeepAside {
            reason: "the standby's subvolume was not made from a snapshot hearth received".into(),
        },
    }
}

/// The subvolume beside the btrfs volume at `live` in which its first copy is made when the
/// primary sends it by the files backend ([`wire::Hello::btrfs_first`]): `.<name>.hearth-first`.
/// The files backend treats `tree` inside it as its live path, so the copy, the files received
/// ahead of their manifest and the build folder are all in one subvolume and every file reaches
/// its place by a rename; [`adopt_first_copy`] then turns the subvolume itself into the copy.
fn first_copy_subvolume(live: &Path) -> PathBuf {
    hidden(live, "hearth-first")
}

/// Present while [`adopt_first_copy`] reshapes the first-copy subvolume: if it is found, the
/// subvolume is in an unknown state and is deleted (it holds only hearth's copy of the primary's
/// data, never the standby's own).
fn adopting_marker(live: &Path) -> PathBuf {
    hidden(live, "hearth-first.adopting")
}

/// Where the files backend builds the first copy of `live` (see [`first_copy_subvolume`]).
pub fn first_copy_path(live: &Path) -> PathBuf {
    first_copy_subvolume(live).join("tree")
}

/// Whether a first copy by the files backend may be made for `live`, the standby's path of a
/// btrfs volume: its folder is on btrfs, nothing is at `live`, and no received snapshot of the
/// volume is held. `Ok(Err(reason))` when not; otherwise the first-copy subvolume is made (or
/// kept, with what an interrupted copy left in it) and the copy's path returned.
pub fn prepare_first_copy(
    live: &Path,
    first: &wire::BtrfsFirst,
) -> Result<Result<PathBuf, String>, VolumeError> {
    if btrfs::check_name(&first.name).is_err() || !btrfs::is_uuid(&first.uuid) {
        return Ok(Err(format!(
            "`{}` ({}) is not a snapshot name and UUID",
            first.name, first.uuid
        )));
    }
    let Some(received) = standby_received(live)? else {
        return Ok(Err(format!(
            "{} is not on btrfs on this standby; push with --backend files",
            live.parent().unwrap_or(Path::new("/")).display()
        )));
    };
    if !received.is_empty() {
        return Ok(Err(
            "this standby already holds received snapshots of the volume; an incremental or full stream is needed".into(),
        ));
    }
    if !live_is_missing(live)? {
        return Ok(Err(format!(
            "{} exists; a first copy goes only to a standby that holds nothing of the volume",
            live.display()
        )));
    }
    let sub = first_copy_subvolume(live);
    let marker = adopting_marker(live);
    if marker.exists() {
        if btrfs::is_subvolume(&sub).unwrap_or(false) {
            btrfs::delete_subvolume(&sub).map_err(VolumeError::Btrfs)?;
            tracing::info!(path = %sub.display(), "deleted a first copy whose adoption was interrupted");
        }
        std::fs::remove_file(&marker).map_err(|e| VolumeError::io("removing", &marker, e))?;
    }
    if !btrfs::is_subvolume(&sub).unwrap_or(false) {
        if std::fs::symlink_metadata(&sub).is_ok() {
            return Ok(Err(format!(
                "{} exists and is not a btrfs subvolume; move it away",
                sub.display()
            )));
        }
        btrfs::create_subvolume(&sub).map_err(VolumeError::Btrfs)?;
    }
    Ok(Ok(first_copy_path(live)))
}

/// The entries of the folder `dir`, by name.
fn names_in(dir: &Path) -> Result<Vec<std::ffi::OsString>, VolumeError> {
    std::fs::read_dir(dir)
        .and_then(|it| it.map(|e| e.map(|e| e.file_name())).collect())
        .map_err(|e| VolumeError::io("listing", dir, e))
}

/// The names among the entries of a first-copy subvolume that are neither the copy (`tree`) nor
/// the files backend's own companions of it: trees it kept aside as diverged, and anything else.
fn not_hearths_own(names: &[std::ffi::OsString]) -> Vec<String> {
    names
        .iter()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n != "tree")
        .filter(|n| !n.starts_with(".tree.hearth-") || n.starts_with(".tree.hearth-diverged"))
        .collect()
}

/// Deletes what a cut first copy left beside `live` (the subvolume `.NAME.hearth-first`, hearth's
/// own partial copy of the primary's data) once a full stream made the volume live instead.
/// Kept, with a warning, when it holds anything but the copy and the files backend's companions.
/// Returns whether it was deleted.
pub fn discard_first_copy(live: &Path) -> Result<bool, VolumeError> {
    let sub = first_copy_subvolume(live);
    if !btrfs::is_subvolume(&sub).unwrap_or(false) {
        return Ok(false);
    }
    let foreign = not_hearths_own(&names_in(&sub)?);
    if !foreign.is_empty() {
        tracing::warn!(path = %sub.display(), ?foreign, "kept the subvolume of a cut first copy: it holds more than the copy");
        return Ok(false);
    }
    btrfs::delete_subvolume(&sub).map_err(VolumeError::Btrfs)?;
    let marker = adopting_marker(live);
    if marker.exists() {
        std::fs::remove_file(&marker).map_err(|e| VolumeError::io("removing", &marker, e))?;
    }
    Ok(true)
}

/// Whether nothing is at `live` (the btrfs backend's live path must be a subvolume it made, so
/// even an empty folder there is something else).
pub fn live_is_missing(live: &Path) -> Result<bool, VolumeError> {
    match std::fs::symlink_metadata(live) {
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(VolumeError::io("inspecting", live, e)),
    }
}

/// Makes the finished first copy of `live` (the files backend's tree in the first-copy
/// subvolume, whose applied manifest must hash to `tree_hash`) the received copy of `first`'s
/// snapshot, as `btrfs receive` would have left it:
///
/// 1. the subvolume's other contents (the copy's manifest and stamps) are removed, and the
///    tree's top-level entries move up to the subvolume's root (renames within the subvolume),
///    which then takes the tree root's owner, mode, extended attributes and times;
/// 2. the subvolume moves among the received snapshots under the snapshot's name, gets its
///    received UUID and `stransid`, and becomes read-only.
///
/// A crash in step 1 leaves the marker [`adopting_marker`], and the next first copy deletes the
/// subvolume and starts over; one in step 2 leaves a writable subvolume among the received
/// snapshots, which [`standby_received`] removes like a partial receive. Returns the received
/// snapshot.
pub fn adopt_first_copy(
    live: &Path,
    first: &wire::BtrfsFirst,
    tree_hash: crate::manifest::TreeHash,
) -> Result<SubvolInfo, VolumeError> {
    let sub = first_copy_subvolume(live);
    let tree = first_copy_path(live);
    let root = match crate::apply::read_live_manifest_hashed(&tree)? {
        Some((m, h)) if h == tree_hash => m
            .entries
            .iter()
            .find(|e| e.path.is_empty())
            .cloned()
            .ok_or_else(|| VolumeError::BadTarget {
                path: tree.clone(),
                reason: "the first copy's manifest has no root entry".into(),
            })?,
        _ => {
            return Err(VolumeError::BadTarget {
                path: tree,
                reason: "the first copy is not the tree applied on this connection".into(),
            });
        }
    };
    // Beside the copy, the files backend's own companions go (its manifest, stamps, replaced
    // copies of the primary's data). A tree it kept aside as diverged, or anything else, is not
    // deleted: the adoption stops and says so.
    let siblings: Vec<_> = names_in(&sub)?
        .into_iter()
        .filter(|n| n != "tree")
        .collect();
    let foreign = not_hearths_own(&siblings);
    if !foreign.is_empty() {
        return Err(VolumeError::BadTarget {
            path: sub,
            reason: format!(
                "holds {} besides the first copy; move them out of the subvolume (they may be data kept aside) and push again",
                foreign.join(", ")
            ),
        });
    }
    let staging = staging_dir(live);
    let dest = staging.join(&first.name);
    if std::fs::symlink_metadata(&dest).is_ok() {
        return Err(VolumeError::BadTarget {
            path: dest,
            reason: "exists already; the first copy is received under this name".into(),
        });
    }
    let marker = adopting_marker(live);
    crate::durable::write_atomic(&marker, b"", 0o600, crate::durable::Existing::Replace)
        .map_err(|e| VolumeError::io("writing", &marker, e))?;
    for name in siblings {
        let path = sub.join(&name);
        let gone = match std::fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        gone.map_err(|e| VolumeError::io("removing", &path, e))?;
    }
    // The tree may hold a top-level entry named `tree`: it moves under a name it does not hold.
    let names = names_in(&tree)?;
    let mut n = 0u32;
    let holder = loop {
        let candidate = format!(".hearth-first-root.{n}");
        if !names.iter().any(|x| *x == *candidate) {
            break sub.join(candidate);
        }
        n += 1;
    };
    // Every move below is to a name that must be free.
    let move_to_new = |from: &Path, to: &Path, op: &'static str| {
        use rustix::fs::{CWD, RenameFlags, renameat_with};
        renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE)
            .map_err(|e| VolumeError::io(op, to, e.into()))
    };
    move_to_new(&tree, &holder, "moving the first copy to")?;
    for name in &names {
        move_to_new(&holder.join(name), &sub.join(name), "moving up to")?;
    }
    std::fs::remove_dir(&holder).map_err(|e| VolumeError::io("removing", &holder, e))?;
    crate::apply::set_path_meta(&sub, &root, false)?;
    std::fs::create_dir_all(&staging).map_err(|e| VolumeError::io("creating", &staging, e))?;
    move_to_new(&sub, &dest, "moving the first copy to")?;
    std::fs::remove_file(&marker).map_err(|e| VolumeError::io("removing", &marker, e))?;
    btrfs::set_received(&dest, &first.uuid, first.ctransid).map_err(VolumeError::Btrfs)?;
    btrfs::subvolume_info(&dest).map_err(VolumeError::Btrfs)
}

/// When nothing is at `live` but received snapshots are held (a switch that failed after its
/// snapshot arrived, or a live copy deleted by hand), makes a writable snapshot of the newest one
/// live again, as the switch after a receive would have; returns its path. Without this, the
/// primary would find its snapshot received and call the standby in sync while nothing is live.
pub fn restore_missing_live(
    live: &Path,
    diverged_name: &str,
) -> Result<Option<PathBuf>, VolumeError> {
    let staging = staging_dir(live);
    if !live_is_missing(live)? || !staging.is_dir() {
        return Ok(None);
    }
    let newest = btrfs::list_snapshots(&staging)
        .map_err(VolumeError::Btrfs)?
        .into_iter()
        .rfind(|s| s.readonly && s.received_uuid.is_some());
    let Some(newest) = newest else {
        return Ok(None);
    };
    btrfs::switch_live(&newest, live, diverged_name).map_err(VolumeError::Btrfs)?;
    Ok(Some(newest.path))
}

/// The standby's view before a stream: the received UUIDs it holds, cleaning partial receives
/// first. `None` when the live path's folder is not on btrfs.
pub fn standby_received(live: &Path) -> Result<Option<Vec<String>>, VolumeError> {
    let parent = live.parent().unwrap_or(Path::new("/"));
    if !on_btrfs(parent) {
        return Ok(None);
    }
    let staging = staging_dir(live);
    if !staging.exists() {
        // Created by the first receive; a `files` volume on btrfs never gets one.
        return Ok(Some(Vec::new()));
    }
    let cleaned = btrfs::clean_partial_receives(&staging).map_err(VolumeError::Btrfs)?;
    for c in cleaned {
        tracing::info!(path = %c.display(), "removed a partial receive");
    }
    Ok(Some(
        btrfs::received_uuids(&staging).map_err(VolumeError::Btrfs)?,
    ))
}

/// The primary snapshot the live subvolume at `live` was made from: the received UUID of the
/// received snapshot it is a writable snapshot of.
pub fn live_source(live: &Path) -> Result<Option<String>, VolumeError> {
    if std::fs::symlink_metadata(live).is_err() {
        return Ok(None);
    }
    let info = btrfs::subvolume_info(live).map_err(VolumeError::Btrfs)?;
    let Some(parent) = info.parent_uuid else {
        return Ok(None);
    };
    let received = btrfs::list_snapshots(&staging_dir(live)).map_err(VolumeError::Btrfs)?;
    Ok(received
        .into_iter()
        .find(|r| r.uuid.eq_ignore_ascii_case(&parent))
        .and_then(|r| r.received_uuid))
}

/// Receives a stream fed by `next_part` (which returns the stream's pieces and finally its
/// announced length and hash) into `staging`, and checks it. A damaged or cut stream leaves a
/// partial subvolume, which the next [`standby_received`] removes; a stream whose hash does not
/// match has its snapshot deleted (it is hearth's own incoming copy, not user data).
pub async fn receive_checked<R: AsyncRead + Unpin + Send>(
    staging: &Path,
    stream: R,
    expected: impl std::future::Future<Output = Result<(u64, [u8; 32], u64, [u8; 32]), NetError>>,
) -> Result<(SubvolInfo, u64), NetError> {
    let (received, sums) = tokio::join!(btrfs::receive(staging, stream), expected);
    let (len, hash, got_len, got_hash) = sums?;
    let received = received.map_err(vol)?;
    if (len, hash) != (got_len, got_hash) {
        let path = received.path.clone();
        let _ = blocking(move || btrfs::delete_subvolume(&path).map_err(VolumeError::Btrfs)).await;
        return Err(NetError::Protocol(format!(
            "the send stream arrived with {got_len} bytes and another hash than the {len} announced; the received snapshot was deleted"
        )));
    }
    Ok((received, got_len))
}

/// The standby's copy of a full stream as it arrives (see `VolumeDirs::partial_stream`): `held`
/// bytes of it from an earlier transfer are fed to `btrfs receive` first, and what arrives is
/// appended. It is not fsynced: a copy torn by a crash fails the stream's hash at the end and is
/// dropped, which costs only the resume.
pub struct Spool {
    file: tokio::fs::File,
    path: PathBuf,
    held: u64,
}

impl Spool {
    /// Opens the copy at `path` and says how much of the stream it holds; any copy of another
    /// snapshot's stream in the same folder is removed first (one cut first sync is resumed, the
    /// newest).
    pub async fn open(path: PathBuf) -> Result<Spool, NetError> {
        let dir = path.parent().unwrap_or(Path::new("/")).to_owned();
        if let Ok(mut rd) = tokio::fs::read_dir(&dir).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("btrfs-partial.") && e.path() != path {
                    let _ = tokio::fs::remove_file(e.path()).await;
                }
            }
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| NetError::io("creating", &dir, e))?;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|e| NetError::io("opening", &path, e))?;
        let held = file
            .metadata()
            .await
            .map_err(|e| NetError::io("inspecting", &path, e))?
            .len();
        Ok(Spool { file, path, held })
    }

    /// Bytes of the stream already held.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Removes the copy (the stream was received whole, or it was wrong).
    pub async fn remove(path: &Path) {
        let _ = tokio::fs::remove_file(path).await;
    }
}

/// Feeds a stream's pieces, read as frames from `rd`, into `tx`, hashing them; returns the
/// announced and the actual length and hash. With a `spool`, its held bytes go first and every
/// piece that arrives is also appended to it.
pub async fn feed_stream<W, R>(
    mut tx: W,
    rd: &mut R,
    timeout: std::time::Duration,
    mut spool: Option<Spool>,
) -> Result<(u64, [u8; 32], u64, [u8; 32]), NetError>
where
    W: tokio::io::AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut hasher = blake3::Hasher::new();
    let mut got = 0u64;
    let stopped = || {
        NetError::Link(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "btrfs receive stopped reading",
        ))
    };
    if let Some(s) = spool.as_mut().filter(|s| s.held > 0) {
        let mut held = tokio::fs::File::open(&s.path)
            .await
            .map_err(|e| NetError::io("opening", &s.path, e))?;
        held.seek(io::SeekFrom::Start(0))
            .await
            .map_err(|e| NetError::io("reading", &s.path, e))?;
        let mut buf = vec![0u8; STREAM_PART];
        let mut left = s.held;
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = held
                .read(&mut buf[..want])
                .await
                .map_err(|e| NetError::io("reading", &s.path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            got += n as u64;
            left -= n as u64;
            tx.write_all(&buf[..n]).await.map_err(|_| stopped())?;
        }
    }
    loop {
        let frame = tokio::time::timeout(timeout, wire::read_frame(rd))
            .await
            .map_err(|_| {
                NetError::Link(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the primary went silent",
                ))
            })??;
        match frame {
            Some(Request::StreamPart(bytes)) => {
                hasher.update(&bytes);
                got += bytes.len() as u64;
                if let Some(s) = spool.as_mut()
                    && let Err(e) = s.file.write_all(&bytes).await
                {
                    // The copy only serves a later resume; without it this transfer goes on.
                    tracing::warn!(path = %s.path.display(), error = %e, "could not keep a copy of the stream; a cut transfer will start over");
                    spool = None;
                }
                // A receive that failed stops reading; the error comes from its side.
                if tx.write_all(&bytes).await.is_err() {
                    return Err(stopped());
                }
            }
            Some(Request::StreamEnd { len, hash }) => {
                if let Some(s) = spool.as_mut() {
                    s.file.flush().await.ok();
                }
                tx.shutdown().await.ok();
                return Ok((len, hash, got, *hasher.finalize().as_bytes()));
            }
            Some(other) => {
                return Err(NetError::Protocol(format!(
                    "expected a stream part, got {other:?}"
                )));
            }
            None => {
                return Err(NetError::Link(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the primary closed the connection in the middle of a stream",
                )));
            }
        }
    }
}

/// The newest snapshot of `source` in `local` when `source` has not changed since it was taken:
/// after a commit of the filesystem (so that every write so far counts), the subvolume's generation
/// is not past the transaction that created the snapshot. A push with nothing new then takes no
/// snapshot and sends nothing (`btrfs subvolume snapshot` commits a transaction, and the standby
/// would receive and switch in an empty difference). Any change, reading files that updates their
/// access times included, moves the generation; then a snapshot is taken as usual.
///
/// No nested-subvolume check is needed here: the newest snapshot was taken after one, and making a
/// subvolume inside the volume since would have moved its generation.
fn unchanged_since(source: &Path, local: &[SubvolInfo]) -> Result<Option<SubvolInfo>, VolumeError> {
    let Some(newest) = local
        .iter()
        .max_by_key(|s| (s.created_generation, s.id))
        .cloned()
    else {
        return Ok(None);
    };
    btrfs::sync_filesystem(source).map_err(VolumeError::Btrfs)?;
    let info = btrfs::subvolume_info(source).map_err(VolumeError::Btrfs)?;
    let same_source = newest.parent_uuid.as_deref() == Some(info.uuid.as_str());
    Ok((same_source && info.generation <= newest.created_generation).then_some(newest))
}

/// One push of a btrfs volume: snapshot (unless nothing changed since the last one), then each
/// standby brought to it.
pub async fn push_btrfs(cfg: &PushConfig, metrics: &Metrics) -> Result<PushReport, NetError> {
    let dirs = VolumeDirs::new(&cfg.state_dir, &cfg.volume);
    let _lock = crate::primary::lock_for_push(&dirs)?;
    let source = cfg.source.clone();
    let snapdir = snapshot_dir(&cfg.source);
    let keep = cfg.keep.max(1);
    let captured_at_ms = now_ms();
    let name = format!("{}.{captured_at_ms}", cfg.volume);
    let (snap, local, reused) = {
        let snapdir = snapdir.clone();
        blocking(move || {
            std::fs::create_dir_all(&snapdir)
                .map_err(|e| VolumeError::io("creating", &snapdir, e))?;
            let local = btrfs::list_snapshots(&snapdir).map_err(VolumeError::Btrfs)?;
            if let Some(newest) = unchanged_since(&source, &local)? {
                return Ok((newest, local, true));
            }
            let snap =
                btrfs::take_snapshot(&source, &snapdir, &name).map_err(VolumeError::Btrfs)?;
            let local = btrfs::list_snapshots(&snapdir).map_err(VolumeError::Btrfs)?;
            Ok((snap, local, false))
        })
        .await?
    };
    if reused {
        tracing::debug!(volume = %cfg.volume, snapshot = %snap.path.display(), "nothing changed since the newest snapshot; using it");
    }
    let snapshot = Snapshot {
        tree_hash: snap.send_uuid().to_owned(),
        captured_at_ms,
        bytes: 0,
        entries: 0,
        snapshot_path: Some(snap.path.display().to_string()),
    };
    let history: Vec<String> = local.iter().map(|s| s.send_uuid().to_owned()).collect();
    let older: Arc<Vec<SubvolInfo>> = Arc::new(
        local
            .iter()
            .filter(|s| s.uuid != snap.uuid)
            .cloned()
            .collect(),
    );
    let mut tasks = Vec::new();
    for t in &cfg.targets {
        let (cfg, t, snap, history, older) = (
            cfg.clone(),
            t.clone(),
            snap.clone(),
            history.clone(),
            older.clone(),
        );
        tasks.push(async move {
            let r = sync_btrfs(&cfg, &t, &snap, &history, &older, captured_at_ms).await;
            (t, r)
        });
    }
    let steps = futures::future::join_all(tasks).await;
    let firsts: Vec<Target> = steps
        .iter()
        .filter(|(_, s)| matches!(s, Ok(BtrfsStep::FirstByFiles)))
        .map(|(t, _)| t.clone())
        .collect();
    let mut copied = match firsts.is_empty() {
        true => Vec::new(),
        false => first_copies(cfg, &snap, &history, firsts).await,
    };
    if !copied.is_empty() && copied.iter().all(|(_, r)| r.is_ok()) {
        // Its state only serves to resume a cut first copy; a later one captures afresh.
        let dir = VolumeDirs::new(&first_copy_state(&cfg.state_dir), &cfg.volume).root;
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(path = %dir.display(), error = %e, "could not remove the state of finished first copies");
        }
    }
    let outcomes: Vec<(Target, Result<SyncOutcome, NetError>)> = steps
        .into_iter()
        .map(|(t, step)| {
            let outcome = match step {
                Ok(BtrfsStep::Done(o)) => Ok(o),
                Ok(BtrfsStep::FirstByFiles) => {
                    match copied.iter().position(|(a, _)| *a == t.addr) {
                        Some(i) => copied.swap_remove(i).1,
                        None => Err(NetError::Protocol(format!(
                            "no first copy was made for {}",
                            t.addr
                        ))),
                    }
                }
                Err(e) => Err(e),
            };
            (t, outcome)
        })
        .collect();
    let mut st: PrimaryState = state::load(&dirs.primary())?;
    st.version = STATE_VERSION;
    st.epoch = cfg.epoch;
    st.record_snapshot(snapshot.clone(), keep);
    let mut results = Vec::new();
    for (t, outcome) in outcomes {
        record(&mut st, cfg, &t, &snapshot, &outcome, metrics);
        results.push((t.addr.clone(), outcome));
    }
    // Retention: the newest `keep` snapshots and each standby's last common one stay.
    let pinned: Vec<String> = st
        .standbys
        .values()
        .filter_map(|r| r.last_common.as_ref().map(|s| s.tree_hash.clone()))
        .collect();
    let pruned = if reused {
        // No snapshot was added, so none can be beyond retention now.
        0
    } else {
        let pinned = pinned.clone();
        blocking(move || {
            let all = btrfs::list_snapshots(&snapdir).map_err(VolumeError::Btrfs)?;
            let doomed = btrfs::select_for_prune(&all, keep, &pinned);
            for d in &doomed {
                btrfs::delete_subvolume(&d.path).map_err(VolumeError::Btrfs)?;
            }
            Ok(doomed.len())
        })
        .await?
    };
    if pruned > 0 {
        tracing::info!(volume = %cfg.volume, pruned, "deleted old snapshots beyond retention");
    }
    state::save(&dirs.primary(), &st)?;
    Ok(PushReport {
        snapshot,
        capture: Default::default(),
        results,
    })
}

/// Where the primary keeps the files backend's state of first copies (capture cache, manifests):
/// apart from the btrfs backend's own, under the same state folder.
fn first_copy_state(state_dir: &Path) -> PathBuf {
    state_dir.join("btrfs-first-copy")
}

/// Makes the first copy of `snap` on each of `targets` (standbys that hold nothing of the
/// volume) by the files backend: captured from the read-only snapshot, streamed while it is
/// read, resumable where a cut transfer stopped, and adopted by each standby as its received
/// copy of `snap` ([`wire::Hello::btrfs_first`]). Returns each standby's outcome by address.
async fn first_copies(
    cfg: &PushConfig,
    snap: &SubvolInfo,
    history: &[String],
    targets: Vec<Target>,
) -> Vec<(String, Result<SyncOutcome, NetError>)> {
    let addrs: Vec<String> = targets.iter().map(|t| t.addr.clone()).collect();
    match first_copies_to(cfg, snap, history, targets).await {
        Ok(results) => results,
        // A failure of the whole copy (the capture, say) is each standby's outcome, so that the
        // push still records the others.
        Err(e) => {
            let reason = format!("making the first copy failed: {e}");
            addrs
                .into_iter()
                .map(|a| {
                    let e = VolumeError::BadTarget {
                        path: snap.path.clone(),
                        reason: reason.clone(),
                    };
                    (a, Err(e.into()))
                })
                .collect()
        }
    }
}

async fn first_copies_to(
    cfg: &PushConfig,
    snap: &SubvolInfo,
    history: &[String],
    targets: Vec<Target>,
) -> Result<Vec<(String, Result<SyncOutcome, NetError>)>, NetError> {
    // The transaction a send stream of the snapshot would carry, and `btrfs receive` record.
    let Some(ctransid) = snap.ctransid else {
        return Err(NetError::Protocol(format!(
            "the ctransid of {} is not known",
            snap.path.display()
        )));
    };
    tracing::info!(volume = %cfg.volume, snapshot = %snap.send_uuid(), standbys = targets.len(), "first copy by the files backend, adopted as the received snapshot");
    let mut files = cfg.clone();
    files.source = snap.path.clone();
    files.watch = None;
    files.targets = targets;
    // Every snapshot is a new device to `stat`, with the same inode numbers.
    files.capture.ignore_device = true;
    files.btrfs_first = Some(wire::BtrfsFirst {
        uuid: snap.send_uuid().to_owned(),
        ctransid,
        name: snap.name.clone(),
        history: history.to_vec(),
    });
    let dirs = VolumeDirs::new(&first_copy_state(&cfg.state_dir), &cfg.volume);
    // Under the volume's own lock already; this one also makes the folder.
    let _lock = crate::primary::lock_for_push(&dirs)?;
    // The push of the btrfs volume records and counts these syncs; the files backend's own
    // records of them would count each twice.
    let report = crate::primary::push_files(&files, &Metrics::default(), &dirs).await?;
    // To the btrfs backend every first copy is a full one, whatever the files backend found
    // already on the standby.
    Ok(report
        .results
        .into_iter()
        .map(|(a, r)| {
            let r = r.map(|mut o| {
                o.kind = SyncKind::Full;
                o
            });
            (a, r)
        })
        .collect())
}

/// What a standby needs, found by [`sync_btrfs`].
enum BtrfsStep {
    /// Brought to the snapshot (or it held it already).
    Done(SyncOutcome),
    /// It holds nothing of the volume: its first copy goes by the files backend
    /// ([`first_copies`]).
    FirstByFiles,
}

async fn sync_btrfs(
    cfg: &PushConfig,
    target: &Target,
    snap: &SubvolInfo,
    history: &[String],
    older: &[SubvolInfo],
    captured_at_ms: u64,
) -> Result<BtrfsStep, NetError> {
    let started = Instant::now();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        volume: cfg.volume.clone(),
        epoch: cfg.epoch,
        sender: cfg.sender.clone(),
        btrfs_first: None,
    };
    let (mut link, welcome) = connect(&cfg.identity, target, hello, cfg.timeout).await?;
    let Some(received) = welcome.btrfs_received else {
        link.send(&Request::Done).await.ok();
        return Err(VolumeError::BadTarget {
            path: cfg.source.clone(),
            reason: format!(
                "the standby {} does not keep this volume on btrfs; push with --backend files",
                target.addr
            ),
        }
        .into());
    };
    if received
        .iter()
        .any(|u| u.eq_ignore_ascii_case(snap.send_uuid()))
    {
        link.send(&Request::Done).await?;
        return Ok(BtrfsStep::Done(SyncOutcome {
            kind: SyncKind::Unchanged,
            chunks_sent: 0,
            bytes_sent: 0,
            manifest_bytes: 0,
            delta: false,
            applied: None,
            duration: started.elapsed(),
        }));
    }
    let mut sent = 0u64;
    let mut kept_aside = Vec::new();
    let (kind, parent) = match btrfs::choose_parent(older, &received) {
        ParentChoice::Incremental { parent } => (SyncKind::Incremental, Some(parent)),
        ParentChoice::Full { reason } => {
            // The standby holds the start of a cut full stream of an older snapshot that is still
            // here: that stream is finished first, so a first sync resumes even when the volume
            // changed since, and the newest snapshot follows as an incremental stream from it.
            let partial = welcome
                .btrfs_partial
                .as_ref()
                .and_then(|u| older.iter().find(|s| s.send_uuid().eq_ignore_ascii_case(u)));
            match partial {
                Some(p) => {
                    tracing::info!(volume = %cfg.volume, standby = %target.addr, snapshot = %p.send_uuid(), "finishing the cut full stream of an older snapshot first");
                    let (s, _, k) =
                        send_one(cfg, target, &mut link, p, None, history, captured_at_ms).await?;
                    sent += s;
                    kept_aside.extend(k);
                    (SyncKind::Full, Some(p.clone()))
                }
                None if cfg.btrfs_first_by_files && welcome.btrfs_empty => {
                    link.send(&Request::Done).await.ok();
                    tracing::info!(volume = %cfg.volume, standby = %target.addr, %reason, "the standby holds nothing of the volume: its first copy goes by the files backend");
                    return Ok(BtrfsStep::FirstByFiles);
                }
                None => {
                    // Never silent: a full send of a large volume is the expensive case.
                    tracing::warn!(volume = %cfg.volume, standby = %target.addr, %reason, "sending the whole snapshot");
                    (SyncKind::Full, None)
                }
            }
        }
    };
    let (s, len, k) = send_one(
        cfg,
        target,
        &mut link,
        snap,
        parent.as_ref(),
        history,
        captured_at_ms,
    )
    .await?;
    sent += s;
    kept_aside.extend(k);
    link.send(&Request::Done).await.ok();
    tracing::info!(volume = %cfg.volume, standby = %target.addr, kind = kind.as_str(), bytes = sent, "standby is in sync");
    Ok(BtrfsStep::Done(SyncOutcome {
        kind,
        chunks_sent: 0,
        bytes_sent: sent,
        manifest_bytes: 0,
        delta: false,
        applied: Some(wire::Applied {
            tree_hash: crate::manifest::TreeHash([0; 32]),
            unchanged: false,
            files: 0,
            bytes: len,
            reused: 0,
            kept_aside,
        }),
        duration: started.elapsed(),
    }))
}

/// Offers `snap` (a full stream, or incremental from `parent`), sends its stream after whatever
/// the standby already holds of it, and waits until the standby made it live. Returns the bytes
/// sent, the stream's length, and what the standby kept aside.
async fn send_one(
    cfg: &PushConfig,
    target: &Target,
    link: &mut crate::primary::Link,
    snap: &SubvolInfo,
    parent: Option<&SubvolInfo>,
    history: &[String],
    captured_at_ms: u64,
) -> Result<(u64, u64, Vec<String>), NetError> {
    link.send(&Request::BtrfsOffer(BtrfsOffer {
        uuid: snap.send_uuid().to_owned(),
        parent: parent.map(|p| p.send_uuid().to_owned()),
        history: history.to_vec(),
        captured_at_ms,
    }))
    .await?;
    // The standby may hold the start of this stream from a cut transfer: it is made again (the
    // hash at the end covers all of it) and only the rest is sent.
    let skip = match link.recv().await? {
        Response::BtrfsResume { offset } => offset,
        other => {
            return Err(NetError::Protocol(format!(
                "expected BtrfsResume, got {other:?}"
            )));
        }
    };
    if skip > 0 {
        tracing::info!(volume = %cfg.volume, standby = %target.addr, bytes = skip, "the standby holds the start of this stream; resuming after it");
    }
    let mut stream = btrfs::send(snap, parent).map_err(vol)?;
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    let mut sent = 0u64;
    let mut buf = vec![0u8; STREAM_PART];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| vol(BtrfsError::StreamRead { source: e }))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        let from = skip.saturating_sub(len).min(n as u64) as usize;
        len += n as u64;
        if from < n {
            sent += (n - from) as u64;
            link.queue(&Request::StreamPart(buf[from..n].to_vec()))
                .await?;
        }
    }
    stream.finish().await.map_err(vol)?;
    link.send(&Request::StreamEnd {
        len,
        hash: *hasher.finalize().as_bytes(),
    })
    .await?;
    match link.recv_within(cfg.timeout * 60).await? {
        Response::BtrfsApplied { uuid, kept_aside } if uuid == snap.send_uuid() => {
            Ok((sent, len, kept_aside))
        }
        Response::BtrfsApplied { uuid, .. } => Err(NetError::Protocol(format!(
            "the standby applied {uuid}, not {}",
            snap.send_uuid()
        ))),
        other => Err(NetError::Protocol(format!(
            "expected BtrfsApplied, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_decisions() {
        let h = vec!["a".to_string(), "b".to_string()];
        let keep = |a: BtrfsLiveAction| matches!(a, BtrfsLiveAction::KeepAside { .. });
        assert_eq!(
            decide_btrfs_live(false, None, None, &h),
            BtrfsLiveAction::Switch
        );
        assert_eq!(
            decide_btrfs_live(true, Some("B"), None, &h),
            BtrfsLiveAction::Switch
        );
        assert_eq!(
            decide_btrfs_live(true, Some("p"), Some("p"), &h),
            BtrfsLiveAction::Switch
        );
        assert!(keep(decide_btrfs_live(true, Some("z"), Some("a"), &h)));
        assert!(keep(decide_btrfs_live(true, None, Some("a"), &h)));
    }
}
