//! The primary's watch on a volume between the pushes of a long-running `push` (`--every`,
//! `--continuous`): it remembers the last capture and hears, through inotify on every directory,
//! which directories changed since, so that the next capture looks only at those instead of
//! `stat`ing every entry of the tree.
//!
//! A walk of 100,000 entries costs about half a second with cold caches on the disks we
//! measured (`docs/benchmarks.md`), whatever the number of threads, so a push that walks can
//! never get much below that; with the watch a push of an unchanged volume looks at nothing.
//!
//! What a directory watch cannot see, and how each case is covered:
//! - writes through a shared writable memory mapping (the kernel reports no event for them):
//!   every pass reads `/proc/*/maps` and looks again at each file of the volume mapped shared
//!   and writable at that moment. A mapping made, written through and removed between two
//!   passes while its file stays open is seen only by the next walk;
//! - a second name of a file outside the watched directories (hard links): every name of a file
//!   with several names is looked at on every pass, and a new such file whose other names are
//!   not all looked at makes the pass walk;
//! - lost events (the queue overflowed), a moved directory, a replaced root, a watch that could
//!   not be added: the next pass walks and starts a new watch;
//! - anything else: a walk at least every `walk_every` (an hour by default) bounds how long a
//!   change can go unseen.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inotify::EventMask;

use crate::capture::{
    Capture, CaptureCache, CaptureOptions, CaptureReport, Changes, DirWatch, Sink, capture_changes,
    capture_streaming,
};
use crate::error::VolumeError;
use crate::manifest::Manifest;
use crate::watch::{DirWatches, Seen};

/// The default longest time between two walks of a watched volume.
pub const DEFAULT_WALK_EVERY: Duration = Duration::from_secs(3600);

/// Why a pass walks the whole tree instead of looking only at what the watch saw change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalkReason {
    /// Nothing is watched yet (the first pass, or the watch could not be started).
    NotWatching,
    /// The watch may have missed changes.
    Lost(String),
    /// The volume's directory is another one than the watch started on.
    RootReplaced,
    /// The last walk is `walk_every` old.
    Due,
    /// `/proc` could not be listed, so no write through a mapping would be seen.
    MappingsUnknown(String),
    /// The change set could not vouch for the rest of the tree (see `capture_changes`).
    ChangesNotEnough,
}

impl WalkReason {
    /// The metric label (`hearth_volume_captures_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            WalkReason::NotWatching => "walk_not_watching",
            WalkReason::Lost(_) => "walk_lost",
            WalkReason::RootReplaced => "walk_root_replaced",
            WalkReason::Due => "walk_due",
            WalkReason::MappingsUnknown(_) => "walk_mappings_unknown",
            WalkReason::ChangesNotEnough => "walk_changes_not_enough",
        }
    }
}

impl fmt::Display for WalkReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkReason::NotWatching => f.write_str("nothing watched yet"),
            WalkReason::Lost(why) => write!(f, "the watch may have missed changes: {why}"),
            WalkReason::RootReplaced => f.write_str("the volume's directory was replaced"),
            WalkReason::Due => f.write_str("the periodic walk is due"),
            WalkReason::MappingsUnknown(why) => {
                write!(f, "memory mappings could not be read: {why}")
            }
            WalkReason::ChangesNotEnough => f.write_str(
                "the changes seen could not vouch for the rest (files with several names, or a folder gone unseen)",
            ),
        }
    }
}

/// How one capture of a watched volume went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pass {
    /// The whole tree was walked; `watching` says whether a watch follows it from now on.
    Walked {
        /// Why.
        reason: WalkReason,
        /// Whether the watch started (it fails when inotify or its watch limit says no).
        watching: bool,
    },
    /// Only what changed was looked at.
    Changes {
        /// Paths looked at (changed entries and their directories, mapped files, files with
        /// several names).
        paths: usize,
    },
}

/// The decision of a pass: walk (and why), or look only at the changes. The state in, the
/// decision out; `SourceWatch::capture` carries it out.
pub(crate) fn decide(
    watching: bool,
    lost: Option<&str>,
    root_same: bool,
    since_walk: Duration,
    walk_every: Duration,
    mappings: Result<(), &str>,
) -> Option<WalkReason> {
    if !watching {
        return Some(WalkReason::NotWatching);
    }
    if let Some(why) = lost {
        return Some(WalkReason::Lost(why.to_owned()));
    }
    if !root_same {
        return Some(WalkReason::RootReplaced);
    }
    if since_walk >= walk_every {
        return Some(WalkReason::Due);
    }
    if let Err(why) = mappings {
        return Some(WalkReason::MappingsUnknown(why.to_owned()));
    }
    None
}

/// A volume's source watched between pushes. See the module documentation.
pub struct SourceWatch {
    root: PathBuf,
    walk_every: Duration,
    on: Option<Watching>,
    /// Whether a failure to start the watch was logged (it is tried again at every walk).
    told_cannot_watch: bool,
}

impl fmt::Debug for SourceWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceWatch")
            .field("root", &self.root)
            .field("watching", &self.on.is_some())
            .finish()
    }
}

struct Watching {
    watches: DirWatches,
    /// The root with every symlink resolved, as `/proc/self/mountinfo` names mount points.
    canonical_root: PathBuf,
    /// Device and inode of the root directory when the watch started.
    root_id: (u64, u64),
    /// When the walk the watch started with began.
    walked_at: Instant,
    /// Entries (and the directories they are in) changed since the last capture looked.
    changed: BTreeSet<Vec<u8>>,
    /// Why changes may have been missed, once they may have.
    lost: Option<String>,
    /// The last capture's tree and cache: what a pass that looks only at changes starts from.
    /// The tree is shared with the push that sent it ([`SourceWatch::share_last_tree`]).
    base: Arc<Manifest>,
    cache: CaptureCache,
    /// Files with several names (hard links, inside the volume or outside it): a change made
    /// through another name is heard of only in that name's folder, if at all.
    linked: BTreeSet<Vec<u8>>,
    /// Files the last capture read within the racy margin of its start (see
    /// `CaptureCache::racy_paths`): looked at again until a capture finds them settled.
    recheck: BTreeSet<Vec<u8>>,
    /// The mount points at or below the root when the watch started (mounts raise no events).
    mounts: Vec<Vec<u8>>,
    /// Whether processes with unreadable mappings were warned about.
    told_unreadable: bool,
    /// Events read so far (for [`SourceWatch::poll_changed`]).
    events: u64,
}

impl SourceWatch {
    /// A watch for the volume at `root` that walks it at least every `walk_every`. Nothing is
    /// watched until the first [`SourceWatch::capture`].
    pub fn new(root: &Path, walk_every: Duration) -> Self {
        SourceWatch {
            root: root.to_owned(),
            walk_every,
            on: None,
            told_cannot_watch: false,
        }
    }

    /// The watched volume's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes `m` as the last capture's tree when it is that tree: the push keeps the manifest it
    /// sent (for its chunk index and the next pass's deltas), and sharing it keeps one copy of a
    /// large manifest in memory instead of two.
    pub fn share_last_tree(&mut self, m: &Arc<Manifest>) {
        if let Some(w) = &mut self.on
            && (Arc::ptr_eq(&w.base, m) || *w.base == **m)
        {
            w.base = m.clone();
        }
    }

    /// Whether the volume is watched now (after a first capture, unless the watch could not be
    /// started).
    pub fn watching(&self) -> bool {
        self.on.is_some()
    }

    /// Reads the pending events without waiting (they are kept for the next capture) and says
    /// whether any arrived since the last call: `push --continuous` polls this to hear of
    /// changes without a second watcher on every folder. `false` while nothing is watched.
    pub fn poll_changed(&mut self) -> bool {
        let Some(w) = self.on.as_mut() else {
            return false;
        };
        let before = w.events;
        w.drain();
        w.events != before
    }

    /// Captures the volume: by looking at what changed since the last capture when the watch
    /// can vouch for the rest, else by walking it all (and starting a new watch). `load_cache`
    /// gives the capture cache on disk for a walk with nothing in memory.
    pub fn capture(
        &mut self,
        opts: &CaptureOptions,
        load_cache: &mut dyn FnMut() -> Option<CaptureCache>,
        mut sink: Option<Sink<'_>>,
    ) -> Result<(Capture, Pass), VolumeError> {
        let root_id = std::fs::symlink_metadata(&self.root)
            .map(|md| (md.dev(), md.ino()))
            .map_err(|e| VolumeError::io("inspecting", &self.root, e))?;
        let reason = match &mut self.on {
            None => WalkReason::NotWatching,
            Some(w) => {
                w.drain();
                // Mounts raise no events: one made or removed inside the volume since the
                // watch started changes what a walk would see.
                match mounts_under(&w.canonical_root) {
                    Ok(now) if now == w.mounts => {}
                    Ok(_) => {
                        w.lost
                            .get_or_insert("a filesystem was mounted or unmounted in it".into());
                    }
                    Err(e) => {
                        w.lost
                            .get_or_insert(format!("/proc/self/mountinfo cannot be read: {e}"));
                    }
                }
                let mapped = shared_writable_inodes();
                let reason = decide(
                    true,
                    w.lost.as_deref(),
                    w.root_id == root_id,
                    w.walked_at.elapsed(),
                    self.walk_every,
                    mapped.as_ref().map(|_| ()).map_err(|e| e.as_str()),
                );
                if let Some(reason) = reason {
                    reason
                } else {
                    let mapped = mapped.unwrap_or_default();
                    if !mapped.unreadable.is_empty() && !w.told_unreadable {
                        // Their writes through a mapping are seen by the next walk (at most
                        // `walk_every` away), as every other change the watch cannot see.
                        w.told_unreadable = true;
                        tracing::warn!(root = %self.root.display(), processes = %mapped.unreadable.join(", "), "cannot read the memory mappings of some processes; a file they write through a shared mapping is seen by the next walk of the volume");
                    }
                    let mapped = mapped.inodes;
                    match w.capture_changes(&self.root, opts, &mapped, sink.as_mut())? {
                        Some(done) => return Ok(done),
                        None => WalkReason::ChangesNotEnough,
                    }
                }
            }
        };
        let cache = match self.on.take() {
            Some(w) => Some(w.cache),
            None => load_cache(),
        };
        let walked_at = Instant::now();
        // The watches are in place before the walk lists anything, so that a change made
        // after the walk looked at a directory is heard of.
        let watches = match start_watch(&self.root) {
            Ok(w) => Some(w),
            Err(e) => {
                if !self.told_cannot_watch {
                    self.told_cannot_watch = true;
                    tracing::warn!(root = %self.root.display(), error = %e, "cannot watch the volume; every pass walks it");
                }
                None
            }
        };
        let cap = capture_streaming(&self.root, opts, cache.as_ref(), sink)?;
        let watching = watches.is_some();
        if let Some((watches, canonical_root, mounts)) = watches {
            let mut w = Watching {
                watches,
                canonical_root,
                root_id,
                walked_at,
                changed: BTreeSet::new(),
                lost: None,
                linked: BTreeSet::new(),
                recheck: BTreeSet::new(),
                mounts,
                told_unreadable: false,
                events: 0,
                base: Arc::new(Manifest {
                    chunking: opts.chunking,
                    entries: Vec::new(),
                }),
                cache: CaptureCache::default(),
            };
            w.remember(&cap, &BTreeSet::new());
            self.on = Some(w);
        }
        Ok((cap, Pass::Walked { reason, watching }))
    }
}

impl Watching {
    /// Reads the pending events into `changed` and `lost`.
    fn drain(&mut self) {
        let (changed, lost, events) = (&mut self.changed, &mut self.lost, &mut self.events);
        self.watches.drain(|seen| {
            *events += 1;
            note(changed, lost, seen)
        });
    }
}

/// Adds what one event says to the pending changes, or says why changes may have been missed.
fn note(changed: &mut BTreeSet<Vec<u8>>, lost: &mut Option<String>, seen: Seen<'_>) {
    match seen {
        Seen::Lost(why) => {
            lost.get_or_insert(why);
        }
        Seen::Change { dir, mask, .. } if mask.contains(EventMask::MOVE_SELF) => {
            // Every path below it changed; the watch knows them by their old names.
            lost.get_or_insert(format!(
                "directory `{}` was moved",
                String::from_utf8_lossy(dir)
            ));
        }
        Seen::Change {
            dir,
            name: None,
            mask,
        } if dir.is_empty()
            && (mask.contains(EventMask::DELETE_SELF) || mask.contains(EventMask::IGNORED)) =>
        {
            lost.get_or_insert("the volume's directory was removed".into());
        }
        Seen::Change { dir, name, .. } => {
            // The directory too: a change of one of its entries moves its own timestamps.
            changed.insert(dir.to_vec());
            if let Some(name) = name {
                use std::os::unix::ffi::OsStrExt;
                changed.insert(if dir.is_empty() {
                    name.as_bytes().to_vec()
                } else {
                    [dir, b"/", name.as_bytes()].concat()
                });
            }
        }
    }
}

impl Watching {
    /// A capture that looks only at the changes; `None` when they cannot vouch for the rest.
    fn capture_changes(
        &mut self,
        root: &Path,
        opts: &CaptureOptions,
        mapped: &HashSet<u64>,
        sink: Option<&mut Sink<'_>>,
    ) -> Result<Option<(Capture, Pass)>, VolumeError> {
        let changed = std::mem::take(&mut self.changed);
        let mut paths = changed.clone();
        paths.extend(self.linked.iter().cloned());
        paths.extend(self.recheck.iter().cloned());
        if !mapped.is_empty() {
            paths.extend(
                self.cache
                    .identities()
                    .filter(|(_, _, ino, ..)| mapped.contains(ino))
                    .map(|(p, ..)| p.to_vec()),
            );
        }
        if paths.is_empty() {
            // Nothing to look at: the tree is the last capture's, as it was.
            let report = CaptureReport {
                files_reused: self.cache.len() as u64,
                ..CaptureReport::default()
            };
            let cap = Capture {
                manifest: Manifest::clone(&self.base),
                cache: self.cache.clone(),
                report,
            };
            return Ok(Some((cap, Pass::Changes { paths: 0 })));
        }
        let mut watch = WatchAdapter {
            watches: &mut self.watches,
            root,
        };
        let mut changes = Changes {
            base: &self.base,
            paths: &paths,
            watch: &mut watch,
        };
        let sink = sink.map(|s| &mut **s as Sink<'_>);
        let cap = match capture_changes(root, opts, &self.cache, &mut changes, sink) {
            Ok(Some(cap)) => cap,
            Ok(None) => return Ok(None),
            Err(e) => {
                // Looked at again next time.
                self.changed.extend(changed);
                return Err(e);
            }
        };
        self.remember(&cap, &paths);
        let pass = Pass::Changes { paths: paths.len() };
        Ok(Some((cap, pass)))
    }

    /// Makes `cap` the capture the next pass starts from; `looked_at` are the paths it looked
    /// at on purpose (their several-names status is the capture's now).
    fn remember(&mut self, cap: &Capture, looked_at: &BTreeSet<Vec<u8>>) {
        self.linked.retain(|p| !looked_at.contains(p));
        self.linked.extend(cap.report.several_names.iter().cloned());
        self.recheck = cap.cache.racy_paths().map(<[u8]>::to_vec).collect();
        self.base = Arc::new(cap.manifest.clone());
        self.cache = cap.cache.clone();
    }
}

/// The [`DirWatch`] a change capture adds watches through.
struct WatchAdapter<'a> {
    watches: &'a mut DirWatches,
    root: &'a Path,
}

impl DirWatch for WatchAdapter<'_> {
    fn watched(&self, rel: &[u8], ino: u64) -> bool {
        self.watches.contains(rel, ino)
    }

    fn watch(&mut self, rel: &[u8]) -> io::Result<()> {
        self.watches.add(self.root, rel)
    }
}

/// Filesystems whose every change is made through this kernel, which therefore tells inotify of
/// it (`statfs` magic numbers). On network and shared filesystems (NFS, SMB, FUSE, 9p, virtiofs,
/// Ceph) and on overlay layers, other clients or the host change files unseen.
const LOCAL_FILESYSTEMS: [(i64, &str); 9] = [
    (0xEF53, "ext2/3/4"),
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
    (0x0102_1994, "tmpfs"),
    (0xF2F5_2010, "f2fs"),
    (0xCA45_1A4E, "bcachefs"),
    (0x2FC1_2FC1, "zfs"),
    (0x3153_464A, "jfs"),
    (0x5265_4973, "reiserfs"),
];

/// Starts a watch on every folder of the volume at `root`: the watches, the canonical root and
/// the mount points at or below it. Fails on a filesystem that is not known to be local.
fn start_watch(root: &Path) -> io::Result<(DirWatches, PathBuf, Vec<Vec<u8>>)> {
    let fs_type = rustix::fs::statfs(root)?.f_type as i64;
    if !LOCAL_FILESYSTEMS.iter().any(|(magic, _)| *magic == fs_type) {
        return Err(io::Error::other(format!(
            "its filesystem (statfs type {fs_type:#x}) is not one where every change is made \
             through this machine's kernel (ext4, xfs, btrfs, tmpfs, f2fs, bcachefs, zfs, jfs, reiserfs)"
        )));
    }
    let canonical = std::fs::canonicalize(root)?;
    let mounts = mounts_under(&canonical)?;
    let mut watches = DirWatches::new()?;
    watch_all(root, &mut watches)?;
    Ok((watches, canonical, mounts))
}

/// The mount points at or below `root` (canonical), from `/proc/self/mountinfo`, sorted.
fn mounts_under(root: &Path) -> io::Result<Vec<Vec<u8>>> {
    use std::os::unix::ffi::OsStrExt;
    let text = std::fs::read("/proc/self/mountinfo")?;
    let root = root.as_os_str().as_bytes();
    let mut out: Vec<Vec<u8>> = text
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|mp| {
            mp.strip_prefix(root)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"/"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && let Some(code) = field
                .get(i + 1..i + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Watches every directory under `root` on its filesystem, each before it is listed.
fn watch_all(root: &Path, watches: &mut DirWatches) -> io::Result<()> {
    let root_dev = std::fs::symlink_metadata(root)?.dev();
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        match watches.add(root, &rel) {
            Ok(()) => {}
            // Removed (or replaced by a file) since its parent was listed: its parent's watch
            // has heard of that.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        }
        let abs = crate::apply::join(root, &rel);
        let items = match std::fs::read_dir(&abs) {
            Ok(items) => items,
            // Removed meanwhile: its parent's watch has heard of it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for item in items {
            let item = item?;
            if !item.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match std::fs::symlink_metadata(item.path()) {
                Ok(md) if md.is_dir() && md.dev() == root_dev => {}
                _ => continue,
            }
            use std::os::unix::ffi::OsStrExt;
            let name = item.file_name();
            stack.push(if rel.is_empty() {
                name.as_bytes().to_vec()
            } else {
                [rel.as_slice(), b"/", name.as_bytes()].concat()
            });
        }
    }
    Ok(())
}

/// What `/proc/*/maps` says about shared writable file mappings.
#[derive(Debug, Default)]
struct Mapped {
    /// The inode numbers of files some process has mapped shared and writable now.
    inodes: HashSet<u64>,
    /// Processes whose mappings could not be read (`PID (name): error`): without
    /// `CAP_SYS_PTRACE`, or where the kernel refuses it, as for some init processes.
    unreadable: Vec<String>,
}

/// Reads every `/proc/PID/maps`; `Err` when `/proc` cannot be listed at all.
fn shared_writable_inodes() -> Result<Mapped, String> {
    let mut out = Mapped::default();
    // The initial PID namespace's inode number (PROC_PID_INIT_INO): in any other (a
    // container), processes outside it are not in this /proc.
    if std::fs::read_link("/proc/self/ns/pid").is_ok_and(|l| l.as_os_str() != "pid:[4026531836]") {
        out.unreadable
            .push("processes outside this PID namespace (hearth runs in a container)".into());
    }
    let procs = std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    for p in procs.flatten() {
        let name = p.file_name();
        if !name.as_encoded_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let path = p.path().join("maps");
        match std::fs::read(&path) {
            Ok(text) => out.inodes.extend(parse_shared_writable(&text)),
            // The process ended meanwhile.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) => {}
            Err(e) => {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                out.unreadable
                    .push(format!("{} ({}): {e}", name.to_string_lossy(), comm.trim()));
            }
        }
    }
    Ok(out)
}

/// The inodes of the shared writable file mappings in one `/proc/PID/maps`:
/// `address perms offset dev inode [path]`, perms like `rw-s`.
fn parse_shared_writable(maps: &[u8]) -> impl Iterator<Item = u64> + '_ {
    maps.split(|&b| b == b'\n').filter_map(|line| {
        let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
        let _addr = fields.next()?;
        let perms = fields.next()?;
        if perms.get(1) != Some(&b'w') || perms.get(3) != Some(&b's') {
            return None;
        }
        let _offset = fields.next()?;
        let _dev = fields.next()?;
        let inode: u64 = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
        (inode != 0).then_some(inode)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision_walks_for_each_reason_in_order() {
        let h = Duration::from_secs(3600);
        let m = Duration::from_secs(60);
        /// Name; watching, lost, root the same, time since the walk, mappings; the decision.
        type Case<'a> = (
            &'a str,
            bool,
            Option<&'a str>,
            bool,
            Duration,
            Result<(), &'a str>,
            Option<WalkReason>,
        );
        let cases: [Case<'_>; 7] = [
            (
                "first pass",
                false,
                None,
                true,
                m,
                Ok(()),
                Some(WalkReason::NotWatching),
            ),
            (
                "lost beats everything after it",
                true,
                Some("too many changes to follow"),
                false,
                h,
                Err("x"),
                Some(WalkReason::Lost("too many changes to follow".into())),
            ),
            (
                "root replaced",
                true,
                None,
                false,
                m,
                Ok(()),
                Some(WalkReason::RootReplaced),
            ),
            (
                "due at exactly walk_every",
                true,
                None,
                true,
                h,
                Ok(()),
                Some(WalkReason::Due),
            ),
            (
                "mappings unreadable",
                true,
                None,
                true,
                m,
                Err("/proc/1/maps: permission denied"),
                Some(WalkReason::MappingsUnknown(
                    "/proc/1/maps: permission denied".into(),
                )),
            ),
            (
                "watched and recent: changes only",
                true,
                None,
                true,
                m,
                Ok(()),
                None,
            ),
            (
                "just before due",
                true,
                None,
                true,
                h - Duration::from_millis(1),
                Ok(()),
                None,
            ),
        ];
        for (name, watching, lost, root_same, age, mappings, want) in cases {
            assert_eq!(
                decide(watching, lost, root_same, age, h, mappings),
                want,
                "{name}"
            );
        }
    }

    /// A separate process that maps `path` shared and writable, writes `b"MAPPD"` at offset 100
    /// through the mapping (no system call a watch would hear of), and keeps the mapping until
    /// [`Mapper::end`].
    struct Mapper(std::process::Child);

    impl Mapper {
        fn start(path: &Path) -> Mapper {
            use std::io::BufRead;
            let mut child = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import mmap, os, sys\n\
                     f = open(sys.argv[1], 'r+b')\n\
                     m = mmap.mmap(f.fileno(), os.fstat(f.fileno()).st_size)\n\
                     m[100:105] = b'MAPPD'\n\
                     print('written', flush=True)\n\
                     sys.stdin.read()",
                ])
                .arg(path)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "written");
            Mapper(child)
        }

        fn end(mut self) {
            drop(self.0.stdin.take());
            assert!(self.0.wait().unwrap().success());
        }
    }

    /// A volume folder `vol` in a new temporary directory holding `files` (parents made).
    fn volume(files: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vol");
        std::fs::create_dir_all(&root).unwrap();
        for (path, data) in files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
        (tmp, root)
    }

    fn walk(root: &Path) -> Manifest {
        crate::capture::capture(root, &CaptureOptions::default(), None)
            .unwrap()
            .manifest
    }

    fn pass(w: &mut SourceWatch) -> (Capture, Pass) {
        w.capture(&CaptureOptions::default(), &mut || None, None)
            .unwrap()
    }

    fn mode_of(m: &Manifest, path: &[u8]) -> u32 {
        m.entries.iter().find(|e| e.path == path).unwrap().mode
    }

    #[test]
    fn a_pass_looks_only_at_what_changed_and_equals_a_walk() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vol");
        for d in ["a/b", "c", "d/e/f"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (i, f) in ["a/1", "a/b/2", "c/3", "c/4", "d/e/f/5"].iter().enumerate() {
            std::fs::write(root.join(f), vec![i as u8; 1000 * (i + 1)]).unwrap();
        }
        // Past the racy margin, so the walk's reads are trusted as they are.
        std::thread::sleep(Duration::from_millis(250));
        let mut w = SourceWatch::new(&root, Duration::from_secs(3600));
        let (first, p) = pass(&mut w);
        assert_eq!(
            p,
            Pass::Walked {
                reason: WalkReason::NotWatching,
                watching: true
            }
        );
        assert_eq!(first.manifest, walk(&root));

        let (cap, p) = pass(&mut w);
        assert_eq!(p, Pass::Changes { paths: 0 });
        assert_eq!(cap.report.files_read, 0);
        assert_eq!(cap.manifest, first.manifest);

        // A write, a chmod, a new folder with a file, a removed folder with its files.
        std::fs::write(root.join("a/1"), b"new contents").unwrap();
        std::fs::set_permissions(root.join("c/3"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir_all(root.join("c/new/deeper")).unwrap();
        std::fs::write(root.join("c/new/deeper/6"), b"six").unwrap();
        std::fs::remove_dir_all(root.join("d/e")).unwrap();
        let (cap, p) = pass(&mut w);
        // a, a/1, c, c/3, c/new, d, d/e, d/e/f, d/e/f/5 (each entry an event named and its
        // folder); the new folder's insides are listed because it is new, not because an event
        // named them.
        assert_eq!(p, Pass::Changes { paths: 9 });
        assert_eq!(cap.manifest, walk(&root));
        // a/1 changed (c/3 only changed mode, so it is read again as well) and c/new/deeper/6 is new.
        assert_eq!(cap.report.files_read, 3);

        // Changes made inside the new folder after it was first listed are heard of too.
        std::fs::write(root.join("c/new/deeper/6"), b"six, longer").unwrap();
        let (cap, p) = pass(&mut w);
        assert!(matches!(p, Pass::Changes { .. }), "{p:?}");
        assert_eq!(cap.manifest, walk(&root));
    }

    #[test]
    fn writes_through_a_shared_mapping_are_seen_though_no_event_tells() {
        let (_tmp, root) = volume(&[("db/data", &[b'a'; 8192])]);
        let mut w = SourceWatch::new(&root, Duration::from_secs(3600));
        let (first, _) = pass(&mut w);
        // Let the racy margin pass, so the file's stamp from the walk is trusted as such.
        std::thread::sleep(Duration::from_millis(250));
        // A process maps the file shared and writable and writes through the mapping: the
        // kernel moves the file's mtime but tells no inotify watch.
        let mapper = Mapper::start(&root.join("db/data"));
        let (cap, p) = pass(&mut w);
        mapper.end();
        assert_eq!(p, Pass::Changes { paths: 1 });
        assert_eq!(cap.report.files_read, 1);
        assert_ne!(cap.manifest, first.manifest);
        assert_eq!(cap.manifest, walk(&root));
    }

    #[test]
    fn a_moved_folder_makes_the_next_pass_walk_and_the_one_after_look_at_changes() {
        let (_tmp, root) = volume(&[("a/b/f", b"f")]);
        let mut w = SourceWatch::new(&root, Duration::from_secs(3600));
        pass(&mut w);
        std::fs::rename(root.join("a"), root.join("z")).unwrap();
        let (cap, p) = pass(&mut w);
        assert_eq!(
            p,
            Pass::Walked {
                reason: WalkReason::Lost("directory `a` was moved".into()),
                watching: true
            }
        );
        assert_eq!(cap.manifest, walk(&root));
        std::fs::write(root.join("z/b/f"), b"g").unwrap();
        let (cap, p) = pass(&mut w);
        assert_eq!(p, Pass::Changes { paths: 2 });
        assert_eq!(cap.manifest, walk(&root));
    }

    #[test]
    fn a_change_through_a_short_lived_second_name_waits_for_the_walk() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, root) = volume(&[("a/x", b"x")]);
        std::fs::create_dir_all(root.join("b")).unwrap();
        std::thread::sleep(Duration::from_millis(250));
        let mut w = SourceWatch::new(&root, Duration::from_millis(300));
        let (first, _) = pass(&mut w);
        // A second name, a change made through it, and the name removed again, all between
        // two passes: nothing the watch hears names a/x.
        std::fs::hard_link(root.join("a/x"), root.join("b/y")).unwrap();
        std::fs::set_permissions(root.join("b/y"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_file(root.join("b/y")).unwrap();
        let (cap, p) = pass(&mut w);
        assert!(matches!(p, Pass::Changes { .. }), "{p:?}");
        // The documented gap (docs/volume.md): the old mode, until the walk.
        assert_eq!(
            mode_of(&cap.manifest, b"a/x"),
            mode_of(&first.manifest, b"a/x")
        );
        assert_ne!(cap.manifest, walk(&root));
        std::thread::sleep(Duration::from_millis(300));
        let (cap, p) = pass(&mut w);
        assert_eq!(
            p,
            Pass::Walked {
                reason: WalkReason::Due,
                watching: true
            }
        );
        assert_eq!(mode_of(&cap.manifest, b"a/x"), 0o600);
        assert_eq!(cap.manifest, walk(&root));
    }

    #[test]
    fn polling_tells_of_every_change_and_keeps_it_for_the_next_pass() {
        let (_tmp, root) = volume(&[("a/f", b"one")]);
        std::thread::sleep(Duration::from_millis(250));
        let mut w = SourceWatch::new(&root, Duration::from_secs(3600));
        assert!(!w.watching());
        assert!(!w.poll_changed());
        pass(&mut w);
        assert!(w.watching());
        assert!(!w.poll_changed());
        std::fs::write(root.join("a/f"), b"two").unwrap();
        assert!(w.poll_changed());
        assert!(!w.poll_changed());
        // The same file again: still news for `--continuous`'s quiet period.
        std::fs::write(root.join("a/f"), b"three").unwrap();
        assert!(w.poll_changed());
        let (cap, p) = pass(&mut w);
        assert_eq!(p, Pass::Changes { paths: 2 });
        assert_eq!(cap.manifest, walk(&root));
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(
            unescape_mountinfo(b"/data/with\\040space"),
            b"/data/with space"
        );
        assert_eq!(unescape_mountinfo(b"/a\\011tab\\134x"), b"/a\ttab\\x");
        assert_eq!(unescape_mountinfo(b"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(b"/odd\\09"), b"/odd\\09");
    }

    #[test]
    fn files_read_within_the_racy_margin_are_looked_at_again_until_settled() {
        let (_tmp, root) = volume(&[("a/f", b"just written")]);
        let mut w = SourceWatch::new(&root, Duration::from_secs(3600));
        pass(&mut w);
        // Written right before the walk read it: a same-tick change after the read would not
        // move its stamp, so the next pass reads it again although no event names it.
        let (cap, p) = pass(&mut w);
        assert_eq!(p, Pass::Changes { paths: 1 });
        assert_eq!(cap.report.files_read, 1);
        let mut settled = false;
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(150));
            if pass(&mut w).1 == (Pass::Changes { paths: 0 }) {
                settled = true;
                break;
            }
        }
        assert!(settled, "the file was never trusted again");
    }

    #[test]
    fn a_file_with_a_second_name_outside_the_volume_is_looked_at_every_pass() {
        let (tmp, root) = volume(&[("a/x", b"one")]);
        std::fs::hard_link(root.join("a/x"), tmp.path().join("outside")).unwrap();
        let mut w = SourceWatch::new(&root, Duration::from_secs(3600));
        pass(&mut w);
        std::thread::sleep(Duration::from_millis(250));
        // Written through the name outside: no watched folder hears of it.
        std::fs::write(tmp.path().join("outside"), b"two, longer").unwrap();
        let (cap, p) = pass(&mut w);
        assert_eq!(p, Pass::Changes { paths: 1 });
        assert_eq!(cap.manifest, walk(&root));
    }

    #[test]
    fn a_folder_made_again_while_the_old_one_is_held_open_is_listed_anew() {
        let (_tmp, root) = volume(&[("d/old", b"old")]);
        let mut w = SourceWatch::new(&root, Duration::from_secs(3600));
        pass(&mut w);
        // An open descriptor keeps the old folder's inode, and its watch, alive.
        let held = std::fs::File::open(root.join("d")).unwrap();
        std::fs::remove_dir_all(root.join("d")).unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/new"), b"new").unwrap();
        let (cap, p) = pass(&mut w);
        assert!(matches!(p, Pass::Changes { .. }), "{p:?}");
        assert_eq!(cap.manifest, walk(&root));
        // And the new folder is watched: a change in it is heard of.
        std::fs::write(root.join("d/new2"), b"newer").unwrap();
        let (cap, _) = pass(&mut w);
        assert_eq!(cap.manifest, walk(&root));
        drop(held);
    }

    #[test]
    fn a_mount_inside_the_volume_makes_the_next_pass_walk() {
        let (_tmp, root) = volume(&[("m/under", b"hidden by the mount")]);
        let mut w = SourceWatch::new(&root, Duration::from_secs(3600));
        pass(&mut w);
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "hearth-test"])
            .arg(root.join("m"))
            .status()
            .unwrap();
        assert!(mounted.success(), "mount needs root, as the CI has");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (cap, p) = pass(&mut w);
            assert_eq!(
                p,
                Pass::Walked {
                    reason: WalkReason::Lost("a filesystem was mounted or unmounted in it".into()),
                    watching: true
                }
            );
            assert_eq!(cap.manifest, walk(&root));
            assert_eq!(cap.report.skipped.len(), 1);
        }));
        let unmounted = std::process::Command::new("umount")
            .arg(root.join("m"))
            .status()
            .unwrap();
        assert!(unmounted.success());
        result.unwrap();
        // The hidden file is back, and the unmount made the pass walk again.
        let (cap, p) = pass(&mut w);
        assert!(matches!(p, Pass::Walked { .. }), "{p:?}");
        assert_eq!(cap.manifest, walk(&root));
    }

    #[test]
    fn only_shared_writable_file_mappings_count() {
        let maps = b"\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234 /usr/bin/cat
7f0000000000-7f0000001000 rw-s 00000000 fd:01 5555 /data/app/db-shm
7f0000001000-7f0000002000 r--s 00000000 fd:01 6666 /data/app/ro-shared
7f0000002000-7f0000003000 rw-p 00000000 fd:01 7777 /data/app/private
7f0000003000-7f0000004000 rw-s 00000000 00:01 0 /dev/zero (deleted)
7f0000004000-7f0000005000 rw-s 00001000 00:2a 8888
7fff00000000-7fff00021000 rw-p 00000000 00:00 0                          [stack]
garbage line
";
        let got: Vec<u64> = parse_shared_writable(maps).collect();
        assert_eq!(got, vec![5555, 8888]);
    }

    #[test]
    fn a_file_another_process_maps_shared_and_writable_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapped");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        assert!(!shared_writable_inodes().unwrap().inodes.contains(&ino));
        // A real process holding a shared writable mapping, as a database with a mapped file
        // would.
        let mapper = Mapper::start(&path);
        assert!(shared_writable_inodes().unwrap().inodes.contains(&ino));
        mapper.end();
        assert!(!shared_writable_inodes().unwrap().inodes.contains(&ino));
    }
}
