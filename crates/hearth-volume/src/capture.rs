//! Tree capture: walk a directory (never following symlinks, never leaving its filesystem) into a
//! [`Manifest`], cutting regular files into content-defined chunks and recording sparse holes.
//!
//! Without a filesystem snapshot the view is made consistent by checking: every file is stat'ed
//! through its open descriptor before and after it is read, and read again when size, mtime or
//! ctime moved; every directory is stat'ed again after the walk, and the walk is repeated (cheaply,
//! through the [`CaptureCache`]) when one changed. Files that never hold still are reported.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use fastcdc::v2020::StreamCDC;
use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::error::{IoContext, VolumeError};
use crate::manifest::{ChunkId, ChunkParams, ChunkRef, Entry, EntryKind, Manifest, Xattr};
use crate::threads::on_threads;

/// What to do with files that still change after all retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnstablePolicy {
    /// Fail the capture with [`VolumeError::Unstable`] (retryable): the safe default.
    Fail,
    /// Keep the last read of such files (which may mix two versions of the file) and list them
    /// in [`CaptureReport::unstable`]. For busy logs that would otherwise block every sync.
    Include,
}

/// How to capture.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// Chunk sizes.
    pub chunking: ChunkParams,
    /// How often a changing file is read again, and how often the walk is repeated when
    /// directories changed under it.
    pub max_retries: u32,
    /// What to do with files that never hold still.
    pub unstable: UnstablePolicy,
    /// Record character and block devices; when false they fail the capture.
    pub allow_devices: bool,
    /// Leave device numbers out when matching files against the cache: for a tree captured from
    /// a new snapshot each time (each btrfs snapshot is a device of its own to `stat`, with the
    /// inode numbers of the subvolume it was taken of).
    pub ignore_device: bool,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            chunking: ChunkParams::default(),
            max_retries: 3,
            unstable: UnstablePolicy::Fail,
            allow_devices: false,
            ignore_device: false,
        }
    }
}

/// What a capture did besides producing the manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureReport {
    /// Regular files whose contents were read and chunked.
    pub files_read: u64,
    /// Regular files whose chunk list came from the cache without reading.
    pub files_reused: u64,
    /// Bytes of file data read.
    pub bytes_read: u64,
    /// Files that changed while being read and were read again (relative paths).
    pub retried: Vec<PathBuf>,
    /// Files or directories that were still changing after all retries.
    pub unstable: Vec<PathBuf>,
    /// Entries left out, with the reason (sockets, mount points of other filesystems).
    pub skipped: Vec<(PathBuf, &'static str)>,
    /// How often the walk was repeated because directories changed during it.
    pub rescans: u32,
    /// Regular files looked at that have more than one name (hard links, inside the tree or
    /// outside it), by path relative to the root.
    pub several_names: Vec<Vec<u8>>,
}

/// The result of [`capture`].
#[derive(Clone, Debug)]
pub struct Capture {
    /// The tree.
    pub manifest: Manifest,
    /// Identity and chunks of every file read, for the next capture of the same root.
    pub cache: CaptureCache,
    /// What happened.
    pub report: CaptureReport,
}

/// Chunk lists of files from an earlier capture, keyed by path, so an unchanged file (same
/// device, inode, size, mtime and ctime) is not read again.
///
/// A file whose ctime is within [`CaptureCache::racy_margin_ns`] of the start of the capture
/// that recorded it is never reused: it might have changed again within the same timestamp
/// granularity (the "racy git" problem).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CaptureCache {
    started_ns: i128,
    chunking: Option<ChunkParams>,
    files: HashMap<Vec<u8>, CachedFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CachedFile {
    stamp: Stamp,
    xattrs: Vec<Xattr>,
    chunks: Vec<ChunkRef>,
}

impl CaptureCache {
    /// Two seconds: larger than any timestamp granularity of the filesystems we support.
    pub const RACY_MARGIN_NS: i128 = 2_000_000_000;

    /// A tenth of a second, for timestamps with a sub-second part: such a filesystem keeps
    /// nanoseconds and its clock advances every tick (10 ms at the lowest common `HZ`, and on
    /// kernels since 6.13 a timestamp that was read is followed by a later one), so a change made
    /// after the capture read a file gets a later ctime once 100 ms have passed.
    pub const FINE_RACY_MARGIN_NS: i128 = 100_000_000;

    /// The racy margin for a file with this ctime: [`Self::RACY_MARGIN_NS`] when the ctime has
    /// no sub-second part (a filesystem with whole-second or two-second timestamps, or, once in
    /// a billion, a fine one by chance), else [`Self::FINE_RACY_MARGIN_NS`]. With the long margin
    /// every file changed shortly before a sync would be read again by the next one too.
    pub fn racy_margin_ns(ctime_ns: i128) -> i128 {
        if ctime_ns.rem_euclid(1_000_000_000) == 0 {
            Self::RACY_MARGIN_NS
        } else {
            Self::FINE_RACY_MARGIN_NS
        }
    }

    /// Files whose recorded stamp a later capture would not trust, because they changed within
    /// the racy margin of this capture's start: a capture that looks only at what a watch saw
    /// change must look at them again, as a walk would.
    pub(crate) fn racy_paths(&self) -> impl Iterator<Item = &[u8]> {
        self.files
            .iter()
            .filter(|(_, f)| {
                f.stamp.ctime_ns >= self.started_ns - Self::racy_margin_ns(f.stamp.ctime_ns)
            })
            .map(|(p, _)| p.as_slice())
    }

    /// Number of files remembered.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Encodes the cache for the next run of the primary: magic, version, postcard body, BLAKE3
    /// of the body (`docs/formats/volume-tree.md`, "capture cache").
    pub fn encode(&self) -> Result<Vec<u8>, VolumeError> {
        let body = postcard::to_stdvec(self).map_err(|e| {
            VolumeError::InvalidManifest(format!("cannot encode the capture cache: {e}"))
        })?;
        Ok(crate::envelope::seal(CACHE_MAGIC, CACHE_VERSION, &body))
    }

    /// Decodes a cache written by [`CaptureCache::encode`]; `None` when the bytes are not a
    /// whole cache of this version. The cache is only a speed-up, so a damaged one is dropped,
    /// never trusted.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let body = crate::envelope::open(CACHE_MAGIC, CACHE_VERSION, bytes).ok()?;
        postcard::from_bytes(body).ok()
    }

    /// A cache describing a tree that apply built, from its manifest and the identity of each
    /// file as apply recorded it, so that capturing that tree reads only files changed since.
    /// `now_ns` is the time the cache counts as its capture's start (for the racy rule).
    pub(crate) fn from_applied(
        chunking: ChunkParams,
        now_ns: i128,
        files: impl IntoIterator<Item = AppliedFile>,
    ) -> Self {
        CaptureCache {
            started_ns: now_ns,
            chunking: Some(chunking),
            files: files
                .into_iter()
                .map(|f| {
                    (
                        f.path,
                        CachedFile {
                            stamp: Stamp {
                                dev: f.dev,
                                ino: f.ino,
                                size: f.size,
                                mode: f.mode,
                                mtime_ns: f.mtime_ns,
                                ctime_ns: f.ctime_ns,
                            },
                            xattrs: f.xattrs,
                            chunks: f.chunks,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Each cached file's path and identity: `(path, dev, ino, size, mtime_ns, ctime_ns)`.
    pub(crate) fn identities(&self) -> impl Iterator<Item = (&[u8], u64, u64, u64, i128, i128)> {
        self.files.iter().map(|(p, f)| {
            (
                p.as_slice(),
                f.stamp.dev,
                f.stamp.ino,
                f.stamp.size,
                f.stamp.mtime_ns,
                f.stamp.ctime_ns,
            )
        })
    }

    fn lookup(&self, path: &[u8], stamp: &Stamp, chunking: ChunkParams) -> Option<&CachedFile> {
        if self.chunking != Some(chunking) {
            return None;
        }
        let cached = self.files.get(path)?;
        (cached.stamp == *stamp
            && stamp.ctime_ns < self.started_ns - Self::racy_margin_ns(stamp.ctime_ns))
        .then_some(cached)
    }
}

/// One regular file as apply left it, for [`CaptureCache::from_applied`].
#[derive(Clone, Debug)]
pub(crate) struct AppliedFile {
    pub(crate) path: Vec<u8>,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    /// The whole `st_mode`, file type bits included.
    pub(crate) mode: u32,
    pub(crate) mtime_ns: i128,
    pub(crate) ctime_ns: i128,
    pub(crate) xattrs: Vec<Xattr>,
    pub(crate) chunks: Vec<ChunkRef>,
}

/// The first bytes of an encoded capture cache.
const CACHE_MAGIC: &[u8; 8] = b"HRTHCCHE";
/// The version of the capture cache encoding.
const CACHE_VERSION: u16 = 1;

/// The parts of a stat result that change when a file or directory changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mode: u32,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    /// The stamp the cache keeps and compares: without the device number when the options say
    /// each capture sees the tree on a new device.
    fn for_cache(md: &Metadata, opts: &CaptureOptions) -> Self {
        let mut s = Stamp::of(md);
        if opts.ignore_device {
            s.dev = 0;
        }
        s
    }

    fn of(md: &Metadata) -> Self {
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mode: md.mode(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
            ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
        }
    }
}

/// What a capture hands to its sink while it reads (see [`capture_streaming`]).
#[derive(Debug)]
pub enum Streamed<'a> {
    /// A regular file (its path relative to the root) is about to be read; if it is read again
    /// because it changed, this comes again and what was streamed for it before is void.
    Begin {
        /// The path relative to the root.
        path: &'a [u8],
    },
    /// One chunk of the file last begun.
    Chunk {
        /// Its offset in the file.
        offset: u64,
        /// Its hash.
        id: ChunkId,
        /// Its bytes.
        data: &'a [u8],
    },
}

/// A receiver of file data as a capture reads it.
pub type Sink<'s> = &'s mut dyn FnMut(Streamed<'_>);

/// Captures the tree under `root`. `cache` from an earlier capture of the same root makes
/// unchanged files free.
pub fn capture(
    root: &Path,
    opts: &CaptureOptions,
    cache: Option<&CaptureCache>,
) -> Result<Capture, VolumeError> {
    capture_streaming(root, opts, cache, None)
}

/// [`capture`], handing every chunk it reads to `sink` as it goes, so that a first sync can send
/// file data while the walk is still running instead of reading everything twice. The manifest
/// stays the only statement of what the tree is: the sink sees every read, including reads that
/// a change made void (each file's last [`Streamed::Begin`] starts the data that counts).
pub fn capture_streaming(
    root: &Path,
    opts: &CaptureOptions,
    cache: Option<&CaptureCache>,
    sink: Option<Sink<'_>>,
) -> Result<Capture, VolumeError> {
    let captured = capture_with(root, opts, cache, sink, None)?;
    // Without a change set nothing makes the walk give up.
    captured.ok_or_else(|| VolumeError::io("walking", root, io::Error::other("the walk gave up")))
}

/// What may have changed in a tree since an earlier capture of it, for [`capture_changes`]:
/// everything else is taken from that capture without a look at the disk.
pub struct Changes<'a> {
    /// The earlier capture's tree.
    pub base: &'a Manifest,
    /// Entries to look at again: each entry a watch saw change and the directory it is in
    /// (whose own timestamps its change moved), files written through a shared mapping (which
    /// no watch reports), and every name of a file with several names. A directory among them
    /// that is new to the tree is listed all through; one that is gone is left out with all
    /// below it.
    pub paths: &'a BTreeSet<Vec<u8>>,
    /// Which directories are watched, and the way to watch one more.
    pub watch: &'a mut dyn DirWatch,
}

/// The watch a [`Changes`] relies on: it vouches for the directories it watches.
pub trait DirWatch {
    /// Whether directory `rel`, now the directory with inode number `ino`, has been watched
    /// since before it was last listed (a folder deleted and made again under the same name is
    /// another inode, and not watched, even while the old one's watch lingers).
    fn watched(&self, rel: &[u8], ino: u64) -> bool;
    /// Starts watching directory `rel`; called before a directory new to the tree is listed,
    /// so that nothing changed in it after the listing goes unseen.
    fn watch(&mut self, rel: &[u8]) -> io::Result<()>;
}

/// Captures the tree under `root` as [`capture_streaming`] does, looking only at what `changes`
/// names (and at directories new since `changes.base`), and taking every other entry from
/// `changes.base` and its files' chunks from `cache` (the cache of that capture).
///
/// `None` means the change set cannot vouch for the rest of the tree and the caller must walk
/// it: a file with several names of which some lie in parts of the tree not looked at (or
/// outside it), an entry whose folder is gone without its parent having changed, a watch that
/// could not be added, or a mount point that appeared.
pub fn capture_changes(
    root: &Path,
    opts: &CaptureOptions,
    cache: &CaptureCache,
    changes: &mut Changes<'_>,
    sink: Option<Sink<'_>>,
) -> Result<Option<Capture>, VolumeError> {
    capture_with(root, opts, Some(cache), sink, Some(changes))
}

fn capture_with(
    root: &Path,
    opts: &CaptureOptions,
    cache: Option<&CaptureCache>,
    mut sink: Option<Sink<'_>>,
    mut changes: Option<&mut Changes<'_>>,
) -> Result<Option<Capture>, VolumeError> {
    let started_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    let root_md = std::fs::symlink_metadata(root).ctx("inspecting", root)?;
    if !root_md.is_dir() {
        return Err(VolumeError::BadTarget {
            path: root.to_owned(),
            reason: "not a directory".into(),
        });
    }
    let mut report = CaptureReport::default();
    // Borrowed for the first walk (a cache holds every file of the volume; copying it would cost
    // more than the walk of an unchanged tree), owned after a rescan.
    let empty = CaptureCache::default();
    let mut prev = std::borrow::Cow::Borrowed(cache.unwrap_or(&empty));
    let mut attempt = 0;
    loop {
        // Skipped entries are reported as the last walk saw them.
        report.skipped.clear();
        report.several_names.clear();
        let listing = match changes.as_deref_mut() {
            None => list_tree(root, root_md.dev())?,
            Some(c) => match list_changes(root, root_md.dev(), c, &prev)? {
                Some(listing) => listing,
                None => return Ok(None),
            },
        };
        let scan = scan_once(root, opts, listing, &prev, &mut report, &mut sink)?;
        let mut changed = scan.vanished.clone();
        for (rel, stamp) in &scan.dirs {
            let abs = join(root, rel);
            let now = std::fs::symlink_metadata(&abs).map(|m| Stamp::of(&m)).ok();
            if now != Some(*stamp) {
                changed.push(PathBuf::from(OsStr::from_bytes(rel)));
            }
        }
        let cache = CaptureCache {
            started_ns,
            chunking: Some(opts.chunking),
            files: scan.cached,
        };
        if changed.is_empty() || attempt >= opts.max_retries {
            if !changed.is_empty() {
                report.unstable.extend(changed);
            }
            for list in [&mut report.retried, &mut report.unstable] {
                list.sort();
                list.dedup();
            }
            report.skipped.sort();
            if opts.unstable == UnstablePolicy::Fail && !report.unstable.is_empty() {
                return Err(VolumeError::Unstable {
                    paths: report.unstable,
                });
            }
            return Ok(Some(Capture {
                manifest: scan.manifest,
                cache,
                report,
            }));
        }
        tracing::debug!(
            changed = changed.len(),
            "directories changed during the walk, scanning again"
        );
        attempt += 1;
        report.rescans += 1;
        // Reads done in this round are kept; the racy rule still applies to them.
        prev = std::borrow::Cow::Owned(cache);
        report.unstable.clear();
    }
}

struct Scan {
    manifest: Manifest,
    dirs: Vec<(Vec<u8>, Stamp)>,
    cached: HashMap<Vec<u8>, CachedFile>,
    vanished: Vec<PathBuf>,
}

fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_owned()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// What a walk of the tree found: every entry with its `lstat`, paths that vanished while it
/// walked, and mount points it did not enter.
#[derive(Default)]
struct Listing {
    listed: Vec<(Vec<u8>, Metadata)>,
    /// Entries taken from an earlier capture without a look (see [`capture_changes`]), in path
    /// order; their files' chunks are in the cache that capture made.
    trusted: Vec<Entry>,
    vanished: Vec<PathBuf>,
    skipped: Vec<(PathBuf, &'static str)>,
}

/// Threads that list and `lstat` at once. A walk with cold caches waits on the disk for every
/// directory block and inode table; with several requests in flight it takes about half as long
/// on the virtio and NVMe disks we measured, even on two cores.
const WALK_THREADS: usize = 8;

/// Lists the tree under `root` (never following symlinks, never entering another filesystem)
/// with `ignore`'s parallel walker, its filters all off: every entry counts, hidden or not.
fn list_tree(root: &Path, root_dev: u64) -> Result<Listing, VolumeError> {
    let found = std::sync::Mutex::new(Listing::default());
    let failed: std::sync::Mutex<Option<VolumeError>> = std::sync::Mutex::new(None);
    /// One thread's findings, added to the shared listing when the thread is done with it.
    struct Local<'a> {
        part: Listing,
        into: &'a std::sync::Mutex<Listing>,
    }
    impl Drop for Local<'_> {
        fn drop(&mut self) {
            if let Ok(mut all) = self.into.lock() {
                all.listed.append(&mut self.part.listed);
                all.vanished.append(&mut self.part.vanished);
                all.skipped.append(&mut self.part.skipped);
            }
        }
    }
    ignore::WalkBuilder::new(root)
        .standard_filters(false)
        .follow_links(false)
        .threads(WALK_THREADS)
        .build_parallel()
        .run(|| {
            let mut local = Local {
                part: Listing::default(),
                into: &found,
            };
            let failed = &failed;
            Box::new(move |item| {
                use ignore::WalkState;
                let fail = |e: VolumeError| {
                    if let Ok(mut f) = failed.lock() {
                        f.get_or_insert(e);
                    }
                    WalkState::Quit
                };
                let item = match item {
                    Ok(item) => item,
                    Err(e) => {
                        let path = walk_error_path(&e).unwrap_or_else(|| root.to_owned());
                        return match e.io_error() {
                            // Deleted between listing its directory and looking at it: the
                            // directory check after the walk notices the change and it runs again.
                            Some(io) if io.kind() == io::ErrorKind::NotFound => {
                                local.part.vanished.push(path);
                                WalkState::Continue
                            }
                            Some(io) => fail(VolumeError::io(
                                "walking",
                                path,
                                io::Error::new(io.kind(), io.to_string()),
                            )),
                            None => fail(VolumeError::io(
                                "walking",
                                path,
                                io::Error::other(e.to_string()),
                            )),
                        };
                    }
                };
                let md = match item.metadata() {
                    Ok(md) => md,
                    Err(e) => {
                        return match e.io_error() {
                            Some(io) if io.kind() == io::ErrorKind::NotFound => {
                                local.part.vanished.push(item.path().to_owned());
                                WalkState::Continue
                            }
                            _ => fail(VolumeError::io(
                                "inspecting",
                                item.path(),
                                io::Error::other(e.to_string()),
                            )),
                        };
                    }
                };
                let rel = item
                    .path()
                    .strip_prefix(root)
                    .map(|p| p.as_os_str().as_bytes().to_vec())
                    .unwrap_or_default();
                if md.dev() != root_dev {
                    // Staying on one filesystem: a mount point below the root is neither
                    // recorded nor entered, and the caller hears about it.
                    local.part.skipped.push((
                        PathBuf::from(OsStr::from_bytes(&rel)),
                        "mount point of another filesystem",
                    ));
                    return WalkState::Skip;
                }
                local.part.listed.push((rel, md));
                WalkState::Continue
            })
        });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    found.into_inner().map_err(|_| {
        VolumeError::io(
            "walking",
            root,
            io::Error::other("a walker thread panicked"),
        )
    })
}

/// Lists what `changes` names and takes the rest of the tree from `changes.base` (see
/// [`capture_changes`]); `None` when the change set cannot vouch for the rest.
fn list_changes(
    root: &Path,
    root_dev: u64,
    changes: &mut Changes<'_>,
    prev: &CaptureCache,
) -> Result<Option<Listing>, VolumeError> {
    let base = changes.base;
    let base_dir = |rel: &[u8]| {
        base.entries
            .binary_search_by(|e| e.path.as_slice().cmp(rel))
            .is_ok_and(|i| base.entries[i].kind == EntryKind::Dir)
    };
    let rel_path = |rel: &[u8]| PathBuf::from(OsStr::from_bytes(rel));
    let mut listing = Listing::default();
    // Everything looked at, by path; the rest comes from the base.
    let mut fresh: BTreeMap<Vec<u8>, Metadata> = BTreeMap::new();
    // Directories listed from the disk: what the base says is in them is not used.
    let mut relisted: HashSet<Vec<u8>> = HashSet::new();
    // Directories new to the tree (or not watched since before their last listing): each is
    // watched first, then listed all through.
    let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
    let mut gone: HashSet<&[u8]> = HashSet::new();
    // With cold caches each `lstat` waits on the disk; several in flight are served faster.
    let paths: Vec<&Vec<u8>> = changes.paths.iter().collect();
    let stats = on_threads(STAT_THREADS, &paths, |p| {
        std::fs::symlink_metadata(join(root, p))
    });
    for (p, stat) in paths.into_iter().zip(stats) {
        let abs = join(root, p);
        match stat {
            Ok(md) if md.dev() == root_dev => {
                // A directory new to the tree (or not watched since before its last listing,
                // as one deleted and made again under the same name) is listed all through.
                if md.is_dir() && !(changes.watch.watched(p, md.ino()) && base_dir(p)) {
                    queue.push_back(p.clone());
                }
                fresh.insert(p.clone(), md);
            }
            // A mount point appeared: the walk says what to do with it.
            Ok(_) => return Ok(None),
            // Gone: it is left out, with all below it.
            Err(e) if gone_error(&e) => {
                gone.insert(p.as_slice());
            }
            Err(e) => return Err(VolumeError::io("inspecting", abs, e)),
        }
    }
    while let Some(d) = queue.pop_front() {
        if !relisted.insert(d.clone()) {
            continue;
        }
        // A directory the base does not hold, or one not watched since before its last
        // listing (deleted and made again under the same name), is new: watched first, then
        // listed all through.
        if changes.watch.watch(&d).is_err() {
            return Ok(None);
        }
        let abs = join(root, &d);
        let items = match std::fs::read_dir(&abs) {
            Ok(items) => items,
            Err(e) if gone_error(&e) => {
                listing.vanished.push(rel_path(&d));
                continue;
            }
            Err(e) => return Err(VolumeError::io("listing", abs, e)),
        };
        for item in items {
            let item = item.ctx("listing", &abs)?;
            let name = item.file_name();
            let rel = if d.is_empty() {
                name.as_bytes().to_vec()
            } else {
                [d.as_slice(), b"/", name.as_bytes()].concat()
            };
            let md = match std::fs::symlink_metadata(item.path()) {
                Ok(md) => md,
                Err(e) if gone_error(&e) => {
                    listing.vanished.push(rel_path(&rel));
                    continue;
                }
                Err(e) => return Err(VolumeError::io("inspecting", item.path(), e)),
            };
            if md.dev() != root_dev {
                listing
                    .skipped
                    .push((rel_path(&rel), "mount point of another filesystem"));
                continue;
            }
            if md.is_dir() && !(changes.watch.watched(&rel, md.ino()) && base_dir(&rel)) {
                queue.push_back(rel.clone());
            }
            fresh.insert(rel, md);
        }
    }
    // The directories of the new tree, so that an entry of the base is taken only when its
    // folder is still there (and was not listed again).
    let mut present: HashSet<&[u8]> = fresh
        .iter()
        .filter(|(_, md)| md.is_dir())
        .map(|(p, _)| p.as_slice())
        .collect();
    for e in &base.entries {
        if fresh.contains_key(&e.path) || gone.contains(e.path.as_slice()) {
            continue;
        }
        if !e.path.is_empty() {
            let parent = parent_of(&e.path);
            if relisted.contains(parent) || !present.contains(parent) {
                continue;
            }
        }
        match &e.kind {
            EntryKind::File { .. } if !prev.files.contains_key(&e.path) => return Ok(None),
            // Every name of a file with several names must be looked at (`Changes::paths`).
            EntryKind::HardLink { .. } => return Ok(None),
            EntryKind::Dir => {
                present.insert(&e.path);
            }
            _ => {}
        }
        listing.trusted.push(e.clone());
    }
    // An entry looked at must hang from a directory of the new tree.
    if fresh
        .keys()
        .any(|p| !p.is_empty() && !present.contains(parent_of(p)))
    {
        return Ok(None);
    }
    // A file with several names: all of them must have been looked at, or the ones not looked
    // at (elsewhere in the tree or outside it) may hold the name the manifest must describe.
    let mut names: HashMap<(u64, u64), u64> = HashMap::new();
    for md in fresh.values().filter(|md| md.is_file() && md.nlink() > 1) {
        *names.entry((md.dev(), md.ino())).or_default() += 1;
    }
    let short: HashSet<u64> = fresh
        .values()
        .filter(|md| md.is_file() && md.nlink() > 1)
        .filter(|md| names.get(&(md.dev(), md.ino())).copied().unwrap_or(0) < md.nlink())
        .map(|md| md.ino())
        .collect();
    // Names not looked at may lie outside the tree (fine: a walk would not see them either) or
    // be entries taken from the base, which the last capture's cache knows by inode number.
    if !short.is_empty()
        && prev
            .identities()
            .any(|(p, _, ino, ..)| short.contains(&ino) && !fresh.contains_key(p))
    {
        return Ok(None);
    }
    listing.listed = fresh.into_iter().collect();
    Ok(Some(listing))
}

/// An error that says the path no longer leads to anything: it was removed, or a folder on
/// the way was replaced by a file.
fn gone_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// The folder part of a relative path (empty for a top-level entry).
fn parent_of(rel: &[u8]) -> &[u8] {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => &rel[..i],
        None => b"",
    }
}

/// Adds an entry taken from an earlier capture, with its file's chunks from that capture's cache.
fn take_trusted(
    entry: Entry,
    prev: &CaptureCache,
    cached: &mut HashMap<Vec<u8>, CachedFile>,
    entries: &mut Vec<Entry>,
    report: &mut CaptureReport,
) {
    if matches!(entry.kind, EntryKind::File { .. }) {
        if let Some(c) = prev.files.get(&entry.path) {
            cached.insert(entry.path.clone(), c.clone());
        }
        report.files_reused += 1;
    }
    entries.push(entry);
}

/// The path an error of the walker is about, when it says.
fn walk_error_path(e: &ignore::Error) -> Option<PathBuf> {
    match e {
        ignore::Error::WithPath { path, .. } => Some(path.clone()),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            walk_error_path(err)
        }
        ignore::Error::Loop { child, .. } => Some(child.clone()),
        _ => None,
    }
}

fn scan_once(
    root: &Path,
    opts: &CaptureOptions,
    listing: Listing,
    prev: &CaptureCache,
    report: &mut CaptureReport,
    sink: &mut Option<Sink<'_>>,
) -> Result<Scan, VolumeError> {
    let Listing {
        mut listed,
        trusted,
        mut vanished,
        skipped,
    } = listing;
    report.skipped.extend(skipped);
    listed.sort_by(|a, b| a.0.cmp(&b.0));

    // Files to read, read ahead on several threads when nothing streams their data (the sink
    // wants each file's chunks in order); the loop below takes each read where it would have
    // made it, and reads itself whatever was not read ahead.
    let mut ahead = if sink.is_none() {
        read_ahead(root, opts, &listed, prev, report)
    } else {
        HashMap::new()
    };
    let mut entries = Vec::with_capacity(listed.len() + trusted.len());
    let mut dirs = Vec::new();
    let mut cached = HashMap::new();
    let mut first_name: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut trusted = trusted.into_iter().peekable();
    for (rel, md) in listed {
        // Entries taken from the earlier capture, in path order between the ones looked at.
        while let Some(t) = trusted.next_if(|t| t.path < rel) {
            take_trusted(t, prev, &mut cached, &mut entries, report);
        }
        let abs = join(root, &rel);
        let rel_path = || PathBuf::from(OsStr::from_bytes(&rel));
        let ft = md.file_type();
        let mut entry = Entry {
            path: rel.clone(),
            kind: EntryKind::Dir,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime_sec: md.mtime(),
            mtime_nsec: md.mtime_nsec() as u32,
            xattrs: Vec::new(),
        };
        if ft.is_file() {
            if md.nlink() > 1 {
                report.several_names.push(rel.clone());
            }
            if md.nlink() > 1
                && let Some(target) = first_name.get(&(md.dev(), md.ino()))
            {
                // The inode's metadata belongs to the first name; see the format doc.
                entry.kind = EntryKind::HardLink {
                    target: target.clone(),
                };
                entry.mode = 0;
                entry.uid = 0;
                entry.gid = 0;
                entry.mtime_sec = 0;
                entry.mtime_nsec = 0;
                entries.push(entry);
                continue;
            }
            let stamp = Stamp::for_cache(&md, opts);
            let read = if let Some(hit) = prev.lookup(&rel, &stamp, opts.chunking) {
                report.files_reused += 1;
                Some((md, hit.xattrs.clone(), hit.chunks.clone()))
            } else if let Some(read) = ahead.remove(&rel) {
                read?
            } else {
                read_stable(&abs, &rel, &md, opts, report, sink)?
            };
            let Some((md, xattrs, chunks)) = read else {
                vanished.push(rel_path());
                continue;
            };
            if md.nlink() > 1 {
                first_name.insert((md.dev(), md.ino()), rel.clone());
            }
            entry.mode = md.mode() & 0o7777;
            entry.uid = md.uid();
            entry.gid = md.gid();
            entry.mtime_sec = md.mtime();
            entry.mtime_nsec = md.mtime_nsec() as u32;
            entry.xattrs = xattrs.clone();
            entry.kind = EntryKind::File {
                size: md.size(),
                chunks: chunks.clone(),
            };
            cached.insert(
                rel.clone(),
                CachedFile {
                    stamp: Stamp::for_cache(&md, opts),
                    xattrs,
                    chunks,
                },
            );
            entries.push(entry);
            continue;
        }
        if ft.is_dir() {
            dirs.push((rel.clone(), Stamp::of(&md)));
        } else if ft.is_symlink() {
            let target = match std::fs::read_link(&abs) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    vanished.push(rel_path());
                    continue;
                }
                Err(e) => return Err(VolumeError::io("reading link", abs, e)),
            };
            entry.kind = EntryKind::Symlink {
                target: target.into_os_string().into_vec(),
            };
        } else if ft.is_fifo() {
            entry.kind = EntryKind::Fifo;
        } else if ft.is_char_device() || ft.is_block_device() {
            if !opts.allow_devices {
                return Err(VolumeError::Unsupported {
                    path: rel_path(),
                    what: "a device node (devices are refused unless allowed)",
                });
            }
            entry.kind = if ft.is_char_device() {
                EntryKind::CharDevice { rdev: md.rdev() }
            } else {
                EntryKind::BlockDevice { rdev: md.rdev() }
            };
        } else {
            // Sockets belong to a running process and cannot be recreated meaningfully.
            report.skipped.push((rel_path(), "socket"));
            continue;
        }
        entry.xattrs = match read_xattrs_path(&abs) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                vanished.push(rel_path());
                continue;
            }
            Err(e) => return Err(VolumeError::io("reading xattrs of", abs, e)),
        };
        entries.push(entry);
    }
    for t in trusted {
        take_trusted(t, prev, &mut cached, &mut entries, report);
    }
    Ok(Scan {
        manifest: Manifest {
            chunking: opts.chunking,
            entries,
        },
        dirs,
        cached,
        vanished,
    })
}

use std::os::unix::ffi::OsStringExt;

/// Threads that `lstat` the paths a change set names at once (as the walk's [`WALK_THREADS`]).
const STAT_THREADS: usize = WALK_THREADS;

/// Threads that read changed files at once: on the virtio disk we measured, reading 900 files
/// of 2 MB on average with caches dropped took 1.54 s one at a time, 0.94 s four at a time and
/// 1.08 s eight at a time (`xargs -P`; docs/benchmarks.md, session 8).
const READ_THREADS: usize = 4;

/// What [`read_stable`] returned, by path.
type ReadAhead =
    HashMap<Vec<u8>, Result<Option<(Metadata, Vec<Xattr>, Vec<ChunkRef>)>, VolumeError>>;

/// Reads, on [`READ_THREADS`] threads, every regular file of `listed` the cache cannot vouch
/// for and that is not a later name of a file listed before it (the scan's own rule), adding
/// what the reads did to `report`. Only worth it for more than a handful of files.
fn read_ahead(
    root: &Path,
    opts: &CaptureOptions,
    listed: &[(Vec<u8>, Metadata)],
    prev: &CaptureCache,
    report: &mut CaptureReport,
) -> ReadAhead {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let todo: Vec<&(Vec<u8>, Metadata)> = listed
        .iter()
        .filter(|(rel, md)| {
            md.is_file()
                && (md.nlink() <= 1 || seen.insert((md.dev(), md.ino())))
                && prev
                    .lookup(rel, &Stamp::for_cache(md, opts), opts.chunking)
                    .is_none()
        })
        .collect();
    if todo.len() < 2 * READ_THREADS {
        return HashMap::new();
    }
    let reads = on_threads(READ_THREADS, &todo, |(rel, md)| {
        let mut part = CaptureReport::default();
        let read = read_stable(&join(root, rel), rel, md, opts, &mut part, &mut None);
        (read, part)
    });
    let mut all = HashMap::new();
    for ((rel, _), (read, part)) in todo.iter().zip(reads) {
        all.insert(rel.clone(), read);
        report.files_read += part.files_read;
        report.bytes_read += part.bytes_read;
        report.retried.extend(part.retried);
        report.unstable.extend(part.unstable);
    }
    all
}

/// Reads a regular file until two stats around the read agree, up to the retry limit.
/// Returns `None` when the file disappeared (the walk is repeated in that case).
#[allow(clippy::type_complexity)]
fn read_stable(
    abs: &Path,
    rel: &[u8],
    listed: &Metadata,
    opts: &CaptureOptions,
    report: &mut CaptureReport,
    sink: &mut Option<Sink<'_>>,
) -> Result<Option<(Metadata, Vec<Xattr>, Vec<ChunkRef>)>, VolumeError> {
    let mut last = None;
    let rel_bytes = rel;
    let rel_path = PathBuf::from(OsStr::from_bytes(rel));
    let rel = &rel_path;
    for attempt in 0..=opts.max_retries {
        match read_once(abs, rel_bytes, listed, opts.chunking, report, sink)? {
            ReadOutcome::Gone => return Ok(None),
            ReadOutcome::Stable(md, x, c) => return Ok(Some((md, x, c))),
            ReadOutcome::Changed(md, x, c) => {
                if attempt == 0 {
                    report.retried.push(rel.to_owned());
                }
                last = Some((md, x, c));
            }
        }
    }
    report.unstable.push(rel.to_owned());
    Ok(last)
}

enum ReadOutcome {
    Gone,
    Stable(Metadata, Vec<Xattr>, Vec<ChunkRef>),
    Changed(Metadata, Vec<Xattr>, Vec<ChunkRef>),
}

fn read_once(
    abs: &Path,
    rel: &[u8],
    listed: &Metadata,
    params: ChunkParams,
    report: &mut CaptureReport,
    sink: &mut Option<Sink<'_>>,
) -> Result<ReadOutcome, VolumeError> {
    let fd = match rustix::fs::open(
        abs,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(ReadOutcome::Gone),
        // O_NOFOLLOW on a path that became a symlink: the walk sees the new kind next round.
        Err(rustix::io::Errno::LOOP) => return Ok(ReadOutcome::Gone),
        Err(e) => return Err(VolumeError::io("opening", abs, e.into())),
    };
    let mut file = File::from(fd);
    let before = file.metadata().ctx("inspecting", abs)?;
    if !before.is_file() || before.ino() != listed.ino() || before.dev() != listed.dev() {
        return Ok(ReadOutcome::Gone);
    }
    let xattrs = read_xattrs_fd(&file).ctx("reading xattrs of", abs)?;
    if let Some(sink) = sink.as_mut() {
        sink(Streamed::Begin { path: rel });
    }
    let size = before.size();
    let regions = data_regions(&file, size).ctx("finding holes in", abs)?;
    let mut chunks = Vec::new();
    let mut complete = true;
    for (start, end) in regions {
        file.seek(SeekFrom::Start(start)).ctx("reading", abs)?;
        let len = end - start;
        let mut got = 0u64;
        if len <= u64::from(params.min) {
            // Shorter than the smallest chunk: one chunk, no need to set up a chunker.
            let mut data = Vec::with_capacity(len as usize);
            (&mut file)
                .take(len)
                .read_to_end(&mut data)
                .ctx("reading", abs)?;
            got = data.len() as u64;
            if !data.is_empty() {
                let id = ChunkId::of(&data);
                if let Some(sink) = sink.as_mut() {
                    sink(Streamed::Chunk {
                        offset: start,
                        id,
                        data: &data,
                    });
                }
                chunks.push(ChunkRef {
                    offset: start,
                    len: data.len() as u32,
                    id,
                });
            }
        } else {
            let chunker = StreamCDC::new((&mut file).take(len), params.min, params.avg, params.max);
            for chunk in chunker {
                let chunk = chunk.map_err(|e| match e {
                    fastcdc::v2020::Error::IoError(io) => VolumeError::io("reading", abs, io),
                    other => VolumeError::io("chunking", abs, io::Error::other(other.to_string())),
                })?;
                got += chunk.length as u64;
                let id = ChunkId::of(&chunk.data);
                if let Some(sink) = sink.as_mut() {
                    sink(Streamed::Chunk {
                        offset: start + chunk.offset,
                        id,
                        data: &chunk.data,
                    });
                }
                chunks.push(ChunkRef {
                    offset: start + chunk.offset,
                    len: chunk.length as u32,
                    id,
                });
            }
        }
        report.bytes_read += got;
        if got != len {
            complete = false;
        }
    }
    report.files_read += 1;
    let after = file.metadata().ctx("inspecting", abs)?;
    if complete && Stamp::of(&before) == Stamp::of(&after) {
        Ok(ReadOutcome::Stable(after, xattrs, chunks))
    } else {
        Ok(ReadOutcome::Changed(after, xattrs, chunks))
    }
}

/// The data regions of a file as `(start, end)` pairs, found with `SEEK_DATA`/`SEEK_HOLE`.
/// Filesystems without hole reporting answer as if the whole file were data, which is correct
/// (holes are then stored as zero chunks, which deduplicate to one).
fn data_regions(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom as RSeek, seek};
    let mut regions = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(file, RSeek::Data(pos)) {
            Ok(s) => s,
            // No data at or after `pos`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = seek(file, RSeek::Hole(start))
            .map_err(io::Error::from)?
            .min(size);
        regions.push((start, end));
        pos = end;
    }
    Ok(regions)
}

fn sorted_xattrs(
    names: impl Iterator<Item = std::ffi::OsString>,
    mut get: impl FnMut(&OsStr) -> io::Result<Option<Vec<u8>>>,
) -> io::Result<Vec<Xattr>> {
    let mut out = Vec::new();
    for name in names {
        // An attribute removed between listing and reading is simply not there.
        if let Some(value) = get(&name)? {
            out.push(Xattr {
                name: name.into_vec(),
                value,
            });
        }
    }
    out.sort();
    Ok(out)
}

fn unsupported_is_empty(r: io::Result<Vec<Xattr>>) -> io::Result<Vec<Xattr>> {
    match r {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => {
            Ok(Vec::new())
        }
        other => other,
    }
}

fn read_xattrs_fd(file: &File) -> io::Result<Vec<Xattr>> {
    use xattr::FileExt;
    unsupported_is_empty(
        file.list_xattr()
            .and_then(|names| sorted_xattrs(names, |n| file.get_xattr(n))),
    )
}

fn read_xattrs_path(path: &Path) -> io::Result<Vec<Xattr>> {
    unsupported_is_empty(
        xattr::list(path).and_then(|names| sorted_xattrs(names, |n| xattr::get(path, n))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_racy_margin_follows_the_timestamp_granularity() {
        let cases = [
            (1_700_000_000_000_000_000i128, CaptureCache::RACY_MARGIN_NS),
            (1_700_000_000_000_000_001, CaptureCache::FINE_RACY_MARGIN_NS),
            (1_700_000_000_123_456_789, CaptureCache::FINE_RACY_MARGIN_NS),
            (0, CaptureCache::RACY_MARGIN_NS),
            (-1_500_000_000, CaptureCache::FINE_RACY_MARGIN_NS),
            (-2_000_000_000, CaptureCache::RACY_MARGIN_NS),
        ];
        for (ctime, want) in cases {
            assert_eq!(CaptureCache::racy_margin_ns(ctime), want, "ctime {ctime}");
        }
    }
}
