//! Watching a live tree for changes made by anyone but apply (inotify on each of its
//! directories), so that the next apply can trust the tree as the last one left it instead of
//! walking all of it to check.
//!
//! Checking by walking costs a `stat` of every entry; with cold caches that is over a second for
//! 100,000 files, every sync, even when the change is a few files. `hearth volume serve` runs for
//! a long time, so it can instead watch each directory of the tree it applied and hear of every
//! entry created, removed, renamed, written or re-stamped in it. An apply then trusts the tree
//! when the watch saw nothing but its own changes since the tree was applied.
//!
//! What a watch cannot see, and why the walk stays: a change made while `serve` was not running
//! (the first apply after a start walks), events lost to a queue overflow (they make the tree
//! untrusted), and writes through a shared memory mapping, which the kernel does not report.
//! The last is why a watch is trusted for [`TRUST_FOR`] at most; after that the next apply walks
//! again and starts a new watch.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::apply::join;
use crate::manifest::{EntryKind, Manifest, TreeHash};

/// How long a watch may vouch for a tree before the next apply walks it anyway (writes through
/// a shared mapping are not reported; this bounds how long one can go unnoticed).
pub const TRUST_FOR: Duration = Duration::from_secs(3600);

pub(crate) fn mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DONT_FOLLOW
        | WatchMask::ONLYDIR
}

/// Watches on directories of one tree, each known by its path relative to the tree's root (the
/// root is the empty path). The standby's [`LiveWatch`] and the primary's source watch
/// (`source_watch.rs`) are both built on it.
pub(crate) struct DirWatches {
    inotify: Inotify,
    /// Relative path of each watched directory.
    dirs: HashMap<WatchDescriptor, Vec<u8>>,
    /// The watch and the directory's inode number, by path.
    by_path: HashMap<Vec<u8>, (WatchDescriptor, u64)>,
    /// Watches removed on purpose: their `IGNORED` events are expected.
    removed: HashSet<WatchDescriptor>,
}

/// What [`DirWatches::drain`] hands on.
pub(crate) enum Seen<'a> {
    /// Something changed in the watched directory `dir`: the entry `name`, or with no name the
    /// directory itself (including its deletion, after which it is no longer watched).
    Change {
        dir: &'a [u8],
        name: Option<&'a OsStr>,
        mask: EventMask,
    },
    /// Changes may have been missed, for this reason.
    Lost(String),
}

impl DirWatches {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(DirWatches {
            inotify: Inotify::init()?,
            dirs: HashMap::new(),
            by_path: HashMap::new(),
            removed: HashSet::new(),
        })
    }

    /// Watches directory `rel` under `root`. Fails when the watch limit is reached
    /// (`fs.inotify.max_user_watches`), the path is not a directory, it was replaced while the
    /// watch was added, or it is a directory already watched under another path (a bind mount
    /// inside the tree), whose events could not be told apart.
    pub(crate) fn add(&mut self, root: &Path, rel: &[u8]) -> io::Result<()> {
        let path = join(root, rel);
        let before = std::fs::symlink_metadata(&path)?;
        let wd = self.inotify.watches().add(&path, mask())?;
        let after = std::fs::symlink_metadata(&path)?;
        if (before.dev(), before.ino()) != (after.dev(), after.ino()) {
            return Err(io::Error::other(format!(
                "{} was replaced while a watch was added to it",
                path.display()
            )));
        }
        if let Some(other) = self.dirs.get(&wd).filter(|other| other.as_slice() != rel) {
            return Err(io::Error::other(format!(
                "{} is the directory already watched as {} (a bind mount?)",
                path.display(),
                OsStr::from_bytes(other).to_string_lossy()
            )));
        }
        self.dirs.insert(wd.clone(), rel.to_vec());
        self.by_path.insert(rel.to_vec(), (wd, after.ino()));
        Ok(())
    }

    /// Stops watching a directory.
    pub(crate) fn remove(&mut self, rel: &[u8]) {
        if let Some((wd, _)) = self.by_path.remove(rel) {
            self.dirs.remove(&wd);
            // A watch on a directory already deleted is gone by itself; nothing to undo.
            let _ = self.inotify.watches().remove(wd.clone());
            self.removed.insert(wd);
        }
    }

    /// Whether directory `rel` is watched as the directory with inode number `ino`.
    pub(crate) fn contains(&self, rel: &[u8], ino: u64) -> bool {
        self.by_path.get(rel).is_some_and(|(_, i)| *i == ino)
    }

    /// How many directories are watched.
    pub(crate) fn len(&self) -> usize {
        self.dirs.len()
    }

    /// Reads the pending events without waiting and hands each on.
    pub(crate) fn drain(&mut self, mut seen: impl FnMut(Seen<'_>)) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let events = match self.inotify.read_events(&mut buf) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    seen(Seen::Lost(format!("reading its events failed: {e}")));
                    return;
                }
            };
            let mut any = false;
            for ev in events {
                any = true;
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    seen(Seen::Lost("too many changes to follow".into()));
                    continue;
                }
                if self.removed.contains(&ev.wd) {
                    // An event still queued for a watch removed on purpose.
                    continue;
                }
                if ev.mask.contains(EventMask::IGNORED) {
                    // The directory is gone (or its filesystem was unmounted): the watch ended.
                    if let Some(dir) = self.dirs.remove(&ev.wd) {
                        // Unless the path is watched anew already (a folder made again).
                        if self.by_path.get(&dir).is_some_and(|(wd, _)| *wd == ev.wd) {
                            self.by_path.remove(&dir);
                        }
                        seen(Seen::Change {
                            dir: &dir,
                            name: None,
                            mask: ev.mask,
                        });
                    }
                    continue;
                }
                match self.dirs.get(&ev.wd) {
                    Some(dir) => seen(Seen::Change {
                        dir,
                        name: ev.name,
                        mask: ev.mask,
                    }),
                    None => seen(Seen::Lost("an event for an unknown watch".into())),
                }
            }
            if !any {
                return;
            }
        }
    }
}

/// A watch on every directory of one applied tree.
pub struct LiveWatch {
    watches: DirWatches,
    /// The tree hash of the manifest the watched tree was applied from.
    tree: TreeHash,
    /// Device and inode of the tree's root directory.
    root: (u64, u64),
    since: Instant,
    /// Why the tree can no longer be trusted, once something was seen.
    dirty: Option<String>,
    /// Whether [`LiveWatch::newly_changed`] has told of `dirty` already.
    told: bool,
}

impl std::fmt::Debug for LiveWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveWatch")
            .field("tree", &self.tree)
            .field("dirs", &self.watches.len())
            .field("dirty", &self.dirty)
            .finish()
    }
}

impl LiveWatch {
    /// Watches every directory of `manifest` under `root` (the tree applied from it, as apply
    /// left it). Fails when inotify is unavailable or the watch limit is reached
    /// (`fs.inotify.max_user_watches`); apply then walks the tree to check it, as without a watch.
    pub fn start(root: &Path, manifest: &Manifest, tree: TreeHash) -> io::Result<Self> {
        let md = std::fs::symlink_metadata(root)?;
        let mut w = LiveWatch {
            watches: DirWatches::new()?,
            tree,
            root: (md.dev(), md.ino()),
            since: Instant::now(),
            dirty: None,
            told: false,
        };
        for e in &manifest.entries {
            if e.kind == EntryKind::Dir {
                w.add_dir(root, &e.path)?;
            }
        }
        Ok(w)
    }

    /// Watches one more directory of the tree (one apply just created).
    pub(crate) fn add_dir(&mut self, root: &Path, rel: &[u8]) -> io::Result<()> {
        self.watches.add(root, rel)
    }

    /// Stops watching a directory apply moved out of the tree.
    pub(crate) fn remove_dir(&mut self, rel: &[u8]) {
        self.watches.remove(rel);
    }

    /// Reads the pending events. Any event on a path outside `expected` (the paths apply itself
    /// changed; the root is the empty path) makes the tree untrusted.
    pub(crate) fn drain(&mut self, expected: &HashSet<&[u8]>) {
        let dirty = &mut self.dirty;
        self.watches.drain(|seen| match seen {
            Seen::Lost(why) => {
                dirty.get_or_insert(why);
            }
            Seen::Change { dir, name, mask } => {
                let path = match name {
                    Some(name) if dir.is_empty() => name.as_bytes().to_vec(),
                    Some(name) => [dir, b"/", name.as_bytes()].concat(),
                    None => dir.to_vec(),
                };
                if !expected.contains(path.as_slice()) {
                    dirty.get_or_insert(format!(
                        "{} changed ({mask:?})",
                        OsStr::from_bytes(&path).to_string_lossy(),
                    ));
                }
            }
        });
    }

    /// Whether the tree at `live` can be trusted to be exactly as it was applied from the
    /// manifest with hash `tree`: watched for that tree, for less than [`TRUST_FOR`], the same
    /// root directory, and nothing seen but apply's own changes. `Err` says why not.
    pub fn trusts(&mut self, live: &Path, tree: TreeHash) -> Result<(), String> {
        if tree != self.tree {
            return Err("it watches another tree".into());
        }
        if self.since.elapsed() > TRUST_FOR {
            return Err(format!(
                "it has vouched for the tree for {} s, the most it may",
                TRUST_FOR.as_secs()
            ));
        }
        self.drain(&HashSet::new());
        if let Some(why) = &self.dirty {
            return Err(why.clone());
        }
        match std::fs::symlink_metadata(live) {
            Ok(md) if (md.dev(), md.ino()) == self.root => Ok(()),
            Ok(_) => Err("the live path is another directory now".into()),
            Err(e) => Err(format!("the live path cannot be read: {e}")),
        }
    }

    /// Reads the pending events; whether they (or earlier ones) show a change by someone else.
    pub fn seen_change(&mut self) -> bool {
        self.drain(&HashSet::new());
        self.dirty.is_some()
    }

    /// Between syncs: reads the pending events and, the first time they show a change by someone
    /// else, says what it was (once per watch, so a busy intruder is reported once).
    pub fn newly_changed(&mut self) -> Option<String> {
        self.drain(&HashSet::new());
        match (&self.dirty, self.told) {
            (Some(why), false) => {
                self.told = true;
                Some(why.clone())
            }
            _ => None,
        }
    }

    /// Makes the tree untrusted (apply could not keep the watch complete).
    pub(crate) fn spoil(&mut self, why: String) {
        self.dirty.get_or_insert(why);
    }

    /// After apply changed the watched tree in place into the tree `tree`.
    pub(crate) fn now_watches(&mut self, tree: TreeHash) {
        self.tree = tree;
    }
}
