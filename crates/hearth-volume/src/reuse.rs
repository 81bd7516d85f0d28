//! Reuse of unchanged files from the live tree during [`crate::apply`]: the identity stamps that
//! apply records for every file it builds, and cloning (or copying) a live file into the staging
//! tree when its content is the one the new manifest wants and it has not been touched since.
//!
//! Why a stamp and not a re-hash: re-reading and hashing every unchanged file would cost about
//! as much as rebuilding it from the chunk store, which is what this module exists to avoid. The
//! stamp (device, inode, size, mtime, ctime) changes whenever the file's data or metadata is
//! changed through the filesystem, because the kernel sets the ctime on every such change and
//! nobody but the kernel can set it. The stamps file format is in `docs/formats/volume-tree.md`.
//!
//! A file whose content *and* metadata (mode, owner, mtime, xattrs) are unchanged is hard-linked
//! from the live tree into the staging tree when the filesystem cannot clone (ext4): copying
//! every unchanged byte on every sync would make an incremental sync cost as much as a full one.
//! The replaced tree then shares those inodes with the new live tree, as rsync's `--link-dest`
//! snapshots do. This is safe because the live tree is checked to be exactly as apply left it
//! before anything is linked (a tree that changed on the standby is kept aside as diverged, not
//! linked from), each live file is linked into at most one new path (so no hard link appears that
//! the primary does not have), and nothing hearth does writes into a linked file: a later write on
//! the standby to the live file changes the shared inode, which the next apply notices by its
//! stamp and keeps aside with the tree. What a shared inode gives up is that a replaced (`prev`)
//! tree no longer stays byte-for-byte what it was if someone writes to the live copy; pruning
//! then keeps it as diverged instead of deleting it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::capture::{AppliedFile, CaptureCache};
use crate::error::{IoContext, VolumeError};
use crate::manifest::{ChunkId, ChunkRef, Entry, EntryKind, Manifest, TreeHash, Xattr};

const MAGIC: &[u8; 8] = b"HEARTHST";
const STAMPS_VERSION: u16 = 1;

/// How long after the newest recorded ctime the new tree may be switched in at the earliest.
/// File timestamps come from the kernel's coarse clock, which lags the real clock by at most one
/// tick (10 ms at the lowest common `HZ` of 100). Switching in later than this guarantees that a
/// change made to a live file after the switch gets a ctime different from the recorded one,
/// even on kernels without fine-grained timestamps.
const CTIME_MARGIN: Duration = Duration::from_millis(25);

/// The identity of one file as apply left it, taken after all its metadata was set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
    ctime_sec: i64,
    ctime_nsec: i64,
}

impl FileStamp {
    pub(crate) fn of(md: &std::fs::Metadata) -> Self {
        FileStamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime_sec: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
            ctime_sec: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
        }
    }

    /// The stamp of a file as a capture saw it (see [`CaptureCache::identities`]).
    pub(crate) fn from_capture(
        dev: u64,
        ino: u64,
        size: u64,
        mtime_ns: i128,
        ctime_ns: i128,
    ) -> Self {
        let split = |ns: i128| {
            (
                i64::try_from(ns.div_euclid(1_000_000_000)).unwrap_or(0),
                ns.rem_euclid(1_000_000_000) as i64,
            )
        };
        let (mtime_sec, mtime_nsec) = split(mtime_ns);
        let (ctime_sec, ctime_nsec) = split(ctime_ns);
        FileStamp {
            dev,
            ino,
            size,
            mtime_sec,
            mtime_nsec,
            ctime_sec,
            ctime_nsec,
        }
    }

    fn applied_file(&self, entry: &Entry, chunks: &[ChunkRef]) -> AppliedFile {
        AppliedFile {
            path: entry.path.clone(),
            dev: self.dev,
            ino: self.ino,
            size: self.size,
            mode: 0o100000 | entry.mode,
            mtime_ns: i128::from(self.mtime_sec) * 1_000_000_000 + i128::from(self.mtime_nsec),
            ctime_ns: i128::from(self.ctime_sec) * 1_000_000_000 + i128::from(self.ctime_nsec),
            xattrs: entry.xattrs.clone(),
            chunks: chunks.to_vec(),
        }
    }

    fn ctime(&self) -> Duration {
        let secs = u64::try_from(self.ctime_sec).unwrap_or(0);
        let nanos = u32::try_from(self.ctime_nsec).unwrap_or(0);
        Duration::new(secs, nanos)
    }
}

/// The stamps of every regular file of one applied tree, bound to that tree's hash so a stamps
/// file can never be used with a manifest it was not written for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AppliedStamps {
    tree_hash: [u8; 32],
    /// `(path, stamp)` for each `File` entry, in manifest order.
    files: Vec<(Vec<u8>, FileStamp)>,
}

impl AppliedStamps {
    /// The stamps a capture of the tree with hash `tree_hash` recorded (its output cache).
    pub(crate) fn from_capture(tree_hash: TreeHash, cache: &CaptureCache) -> Self {
        AppliedStamps {
            tree_hash: tree_hash.0,
            files: cache
                .identities()
                .map(|(p, dev, ino, size, m, c)| {
                    (p.to_vec(), FileStamp::from_capture(dev, ino, size, m, c))
                })
                .collect(),
        }
    }

    /// The hash of the tree these stamps were taken of.
    pub(crate) fn tree_hash(&self) -> TreeHash {
        TreeHash(self.tree_hash)
    }

    /// `(path, stamp)` for each regular file, in manifest order.
    pub(crate) fn files(&self) -> &[(Vec<u8>, FileStamp)] {
        &self.files
    }

    pub(crate) fn new(tree_hash: TreeHash, files: Vec<(Vec<u8>, FileStamp)>) -> Self {
        AppliedStamps {
            tree_hash: tree_hash.0,
            files,
        }
    }

    /// Magic, version, postcard body, BLAKE3 of the body: the same envelope as a manifest.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, VolumeError> {
        let body = postcard::to_stdvec(self)
            .map_err(|e| VolumeError::InvalidManifest(format!("cannot encode stamps: {e}")))?;
        Ok(crate::envelope::seal(MAGIC, STAMPS_VERSION, &body))
    }

    /// Decodes a stamps file; `None` for anything damaged or of another version, since stamps
    /// are only a speed-up and a tree without them is simply rebuilt from chunks.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let body = crate::envelope::open(MAGIC, STAMPS_VERSION, bytes).ok()?;
        postcard::from_bytes(body).ok()
    }

    /// The earliest moment the tree these stamps describe may be switched in; see
    /// [`CTIME_MARGIN`].
    pub(crate) fn switch_not_before(&self) -> Duration {
        self.files
            .iter()
            .map(|(_, s)| s.ctime())
            .max()
            .unwrap_or_default()
            + CTIME_MARGIN
    }
}

/// A capture cache for the tree applied from `manifest` with `stamps`, so that capturing it
/// again reads only the files changed since apply left them; `None` when the stamps belong to
/// another tree.
pub(crate) fn cache_for(
    manifest: &Manifest,
    stamps: &AppliedStamps,
) -> Result<Option<CaptureCache>, VolumeError> {
    if manifest.tree_hash()?.0 != stamps.tree_hash {
        return Ok(None);
    }
    let by_path: HashMap<&[u8], &FileStamp> = stamps
        .files
        .iter()
        .map(|(p, s)| (p.as_slice(), s))
        .collect();
    let files = manifest.entries.iter().filter_map(|e| match &e.kind {
        EntryKind::File { chunks, .. } => by_path
            .get(e.path.as_slice())
            .map(|s| s.applied_file(e, chunks)),
        _ => None,
    });
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    Ok(Some(CaptureCache::from_applied(
        manifest.chunking,
        now_ns,
        files,
    )))
}

/// Waits until the wall clock has passed `not_before` (a time since the epoch). Usually it
/// already has, because flushing the staging tree takes longer than the margin.
pub(crate) fn wait_until(not_before: Duration) {
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if now >= not_before {
            return;
        }
        std::thread::sleep((not_before - now).min(CTIME_MARGIN));
    }
}

/// What the content of a regular file is, as far as reuse is concerned: its size and its exact
/// chunk list (offsets included, so the holes are the same too).
type ContentKey = (u64, Vec<(u64, u32, ChunkId)>);

fn content_key(size: u64, chunks: &[ChunkRef]) -> ContentKey {
    (
        size,
        chunks.iter().map(|c| (c.offset, c.len, c.id)).collect(),
    )
}

/// The metadata a hard-linked file shares with its live original, which must be equal.
type MetaKey = (u32, u32, u32, i64, u32, Vec<Xattr>);

/// Live files (path and stamp) by content and metadata: the candidates for a hard link.
type ByIdentity = HashMap<(ContentKey, MetaKey), Vec<(Vec<u8>, FileStamp)>>;

fn meta_key(e: &Entry) -> MetaKey {
    (
        e.mode,
        e.uid,
        e.gid,
        e.mtime_sec,
        e.mtime_nsec,
        e.xattrs.clone(),
    )
}

/// How a file of the new tree got its data from the live tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reused {
    /// By a hard link to the live file (content and metadata equal, filesystem cannot clone).
    Linked,
    /// By `FICLONE`: the new file shares the old one's extents (copy-on-write).
    Cloned,
    /// By copying the data ranges (`copy_file_range`, or reads and writes).
    Copied,
}

/// What a reuse attempt found.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// The data is in place; the caller still sets the metadata.
    Done(Reused),
    /// The live tree has no file with this content.
    NoCandidate,
    /// A live file had this content when it was applied but has changed since (or could not
    /// be read); the caller builds the file from chunks. The destination is empty again.
    Changed(PathBuf),
}

/// The live tree's files that may be reused, by content.
pub(crate) struct LiveFiles {
    root: PathBuf,
    by_content: HashMap<ContentKey, (Vec<u8>, FileStamp)>,
    /// Live files by content and metadata, for hard links.
    by_identity: ByIdentity,
    /// Where each chunk of the live tree is: path, offset, length.
    chunk_at: HashMap<ChunkId, (Vec<u8>, u64, u32)>,
    /// Live files already linked into the new tree: each at most once.
    linked: Mutex<HashSet<Vec<u8>>>,
    /// Cleared after the filesystem said it cannot clone, so it is not asked for every file.
    clone_works: AtomicBool,
    /// Cleared after `copy_file_range` was refused, for the same reason.
    copy_range_works: AtomicBool,
}

impl LiveFiles {
    /// The reusable files of the tree at `root`, applied from `manifest` (with tree hash `hash`)
    /// with `stamps`; files without a stamp, or stamps for another tree, give nothing to reuse.
    /// With `wanted`, only the live files that hold at least one of those chunks: an in-place
    /// apply builds only a few files and needs no index of the other 100,000.
    pub(crate) fn new_for(
        root: &Path,
        manifest: &Manifest,
        hash: TreeHash,
        stamps: &AppliedStamps,
        wanted: Option<&HashSet<ChunkId>>,
    ) -> Result<Self, VolumeError> {
        let mut by_content = HashMap::new();
        let mut by_identity = ByIdentity::new();
        let mut chunk_at = HashMap::new();
        if hash.0 == stamps.tree_hash {
            let useful = |chunks: &[ChunkRef]| {
                // Nothing to gain for a file without data: it is only a length.
                !chunks.is_empty()
                    && wanted.is_none_or(|w| chunks.iter().any(|c| w.contains(&c.id)))
            };
            let candidates: Vec<(&Entry, u64, &[ChunkRef])> = manifest
                .entries
                .iter()
                .filter_map(|e| match &e.kind {
                    EntryKind::File { size, chunks } if useful(chunks) => {
                        Some((e, *size, chunks.as_slice()))
                    }
                    _ => None,
                })
                .collect();
            let paths: HashSet<&[u8]> = match wanted {
                Some(_) => candidates
                    .iter()
                    .map(|(e, _, _)| e.path.as_slice())
                    .collect(),
                None => HashSet::new(),
            };
            let by_path: HashMap<&[u8], &FileStamp> = stamps
                .files
                .iter()
                .filter(|(p, _)| wanted.is_none() || paths.contains(p.as_slice()))
                .map(|(p, s)| (p.as_slice(), s))
                .collect();
            for (entry, size, chunks) in candidates {
                for c in chunks {
                    if wanted.is_none_or(|w| w.contains(&c.id)) {
                        chunk_at
                            .entry(c.id)
                            .or_insert_with(|| (entry.path.clone(), c.offset, c.len));
                    }
                }
                if let Some(stamp) = by_path.get(entry.path.as_slice()) {
                    let key = content_key(size, chunks);
                    by_identity
                        .entry((key.clone(), meta_key(entry)))
                        .or_default()
                        .push((entry.path.clone(), **stamp));
                    by_content
                        .entry(key)
                        .or_insert_with(|| (entry.path.clone(), **stamp));
                }
            }
        }
        Ok(LiveFiles {
            root: root.to_owned(),
            by_content,
            by_identity,
            chunk_at,
            linked: Mutex::new(HashSet::new()),
            clone_works: AtomicBool::new(true),
            copy_range_works: AtomicBool::new(true),
        })
    }

    /// Whether some live file holds chunk `id` (as of the check before the build).
    pub(crate) fn has_chunk(&self, id: &ChunkId) -> bool {
        self.chunk_at.contains_key(id)
    }

    /// Reads chunk `id` from the live file that holds it; `None` when it is not there any more
    /// (the bytes are checked against the id, so a file changed since cannot pass wrong data).
    pub(crate) fn read_chunk(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let (rel, offset, len) = self.chunk_at.get(id)?;
        let path = crate::apply::join(&self.root, rel);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .ok()?;
        let mut buf = vec![0u8; *len as usize];
        file.read_exact_at(&mut buf, *offset).ok()?;
        (ChunkId::of(&buf) == *id).then_some(buf)
    }

    /// The same files, for cloning or copying only: used when the live tree changed on the
    /// standby, whose inodes must not be shared with the new tree.
    pub(crate) fn without_links(mut self) -> Self {
        self.by_identity.clear();
        self
    }

    /// Finds out once whether the filesystem of `dir` (where the new tree is built) can clone,
    /// with two small files made and removed there. Apply builds files on several threads; left to
    /// the first reuse to find out, several would try to clone at once and copy files that could
    /// have been linked. When the probe itself fails, the first reuse finds out as before.
    pub(crate) fn probe_clone(&self, dir: &Path) {
        let (a, b) = (
            dir.join(".hearth-clone-probe"),
            dir.join(".hearth-clone-probe.copy"),
        );
        let probe = || -> std::io::Result<bool> {
            std::fs::write(&a, b"probe")?;
            let dst = File::create(&b)?;
            Ok(rustix::fs::ioctl_ficlone(&dst, &File::open(&a)?).is_ok())
        };
        let can = probe();
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        if let Ok(false) = can {
            self.clone_works.store(false, Ordering::Relaxed);
        }
    }

    /// Whether hard links are the way to reuse on this filesystem: only where cloning is not
    /// possible, since a clone gives an independent inode at no cost.
    pub(crate) fn prefers_links(&self) -> bool {
        !self.clone_works.load(Ordering::Relaxed)
    }

    /// Hard-links an unchanged live file with the same content and metadata as `entry` to
    /// `dst` (which must not exist). Each live file is linked at most once.
    pub(crate) fn link(
        &self,
        entry: &Entry,
        size: u64,
        chunks: &[ChunkRef],
        dst: &Path,
    ) -> Result<Attempt, VolumeError> {
        if chunks.is_empty() {
            return Ok(Attempt::NoCandidate);
        }
        let Some(candidates) = self
            .by_identity
            .get(&(content_key(size, chunks), meta_key(entry)))
        else {
            return Ok(Attempt::NoCandidate);
        };
        // The candidate is taken under the lock and linked outside it (apply builds on several
        // threads); one that turns out changed stays taken, so no other entry tries it again.
        let (rel, stamp) = {
            let Ok(mut linked) = self.linked.lock() else {
                return Ok(Attempt::NoCandidate);
            };
            let Some((rel, stamp)) = candidates.iter().find(|(p, _)| !linked.contains(p)) else {
                return Ok(Attempt::NoCandidate);
            };
            linked.insert(rel.clone());
            (rel, stamp)
        };
        let path = crate::apply::join(&self.root, rel);
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.is_file() && FileStamp::of(&md) == *stamp => {}
            _ => return Ok(Attempt::Changed(path)),
        }
        std::fs::hard_link(&path, dst).ctx("linking", dst)?;
        Ok(Attempt::Done(Reused::Linked))
    }

    /// Fills the empty file `dst` with the data of content `(size, chunks)` from a live file
    /// that holds it, if there is one and it is unchanged since it was applied. The caller sets
    /// the length (a clone already has it; a copy stops after the last chunk).
    pub(crate) fn fill(
        &self,
        size: u64,
        chunks: &[ChunkRef],
        dst: &File,
    ) -> Result<Attempt, VolumeError> {
        if chunks.is_empty() {
            return Ok(Attempt::NoCandidate);
        }
        let Some((rel, stamp)) = self.by_content.get(&content_key(size, chunks)) else {
            return Ok(Attempt::NoCandidate);
        };
        let path = crate::apply::join(&self.root, rel);
        let changed = || Ok(Attempt::Changed(path.clone()));
        // O_NOFOLLOW and a stamp taken through the descriptor: what is checked is what is read.
        let src = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
        {
            Ok(f) => f,
            Err(_) => return changed(),
        };
        match src.metadata() {
            Ok(md) if md.is_file() && FileStamp::of(&md) == *stamp => {}
            _ => return changed(),
        }
        let how = match self.copy_data(&src, dst, chunks) {
            Ok(how) => how,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not reuse a live file; building it from chunks");
                dst.set_len(0).ctx("truncating", &path)?;
                return changed();
            }
        };
        // A change while the data was taken shows in the stamp afterwards (its ctime moves past
        // the recorded one); the copy may then mix two versions and is thrown away.
        match src.metadata() {
            Ok(md) if FileStamp::of(&md) == *stamp => Ok(Attempt::Done(how)),
            _ => {
                dst.set_len(0).ctx("truncating", &path)?;
                changed()
            }
        }
    }

    fn copy_data(&self, src: &File, dst: &File, chunks: &[ChunkRef]) -> std::io::Result<Reused> {
        if self.clone_works.load(Ordering::Relaxed) {
            match rustix::fs::ioctl_ficlone(dst, src) {
                Ok(()) => return Ok(Reused::Cloned),
                Err(e) => {
                    // EOPNOTSUPP (ext4, tmpfs), ENOTTY, EINVAL or EXDEV: this filesystem cannot
                    // clone at all, so it is not asked again during this apply.
                    if matches!(
                        e,
                        rustix::io::Errno::OPNOTSUPP
                            | rustix::io::Errno::NOTTY
                            | rustix::io::Errno::INVAL
                            | rustix::io::Errno::XDEV
                            | rustix::io::Errno::NOSYS
                    ) {
                        self.clone_works.store(false, Ordering::Relaxed);
                    }
                    dst.set_len(0)?;
                }
            }
        }
        // Only the chunk ranges are copied, and the length is set afterwards, so every range no
        // chunk covers stays a hole exactly as in a build from chunks. Adjacent chunks are
        // copied as one range.
        let mut i = 0;
        while i < chunks.len() {
            let start = chunks[i].offset;
            let mut end = start + u64::from(chunks[i].len);
            i += 1;
            while i < chunks.len() && chunks[i].offset == end {
                end += u64::from(chunks[i].len);
                i += 1;
            }
            self.copy_range(src, dst, start, end)?;
        }
        // The caller sets the length afterwards, which leaves the rest as holes.
        Ok(Reused::Copied)
    }

    fn copy_range(&self, src: &File, dst: &File, start: u64, end: u64) -> std::io::Result<()> {
        let mut pos = start;
        while pos < end && self.copy_range_works.load(Ordering::Relaxed) {
            let (mut off_in, mut off_out) = (pos, pos);
            let want = usize::try_from(end - pos)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)
            {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => pos += n as u64,
                Err(
                    rustix::io::Errno::NOSYS
                    | rustix::io::Errno::XDEV
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::INVAL,
                ) => self.copy_range_works.store(false, Ordering::Relaxed),
                Err(e) => return Err(e.into()),
            }
        }
        // Plain reads and writes where the kernel cannot copy between these files.
        let mut buf = vec![0u8; 256 * 1024];
        while pos < end {
            let n = usize::try_from(end - pos)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            src.read_exact_at(&mut buf[..n], pos)?;
            dst.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ctime_sec: i64) -> FileStamp {
        FileStamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_sec: 4,
            mtime_nsec: 5,
            ctime_sec,
            ctime_nsec: 6,
        }
    }

    #[test]
    fn stamps_round_trip_and_refuse_damage() {
        let s = AppliedStamps::new(
            TreeHash([7; 32]),
            vec![(b"a".to_vec(), stamp(10)), (b"b/c".to_vec(), stamp(20))],
        );
        let bytes = s.encode().unwrap();
        assert_eq!(AppliedStamps::decode(&bytes), Some(s.clone()));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("truncated", bytes[..bytes.len() - 1].to_vec()),
            ("bit flip", {
                let mut b = bytes.clone();
                b[12] ^= 1;
                b
            }),
            ("other version", {
                let mut b = bytes.clone();
                b[8] = 9;
                b
            }),
        ];
        for (what, bad) in cases {
            assert_eq!(AppliedStamps::decode(&bad), None, "{what}");
        }
        assert_eq!(
            s.switch_not_before(),
            Duration::new(20, 6) + CTIME_MARGIN,
            "the newest ctime decides"
        );
    }
}
