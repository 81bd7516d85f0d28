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
use std::time::{Duration, Instant};

use inotify::EventMask;

use crate::capture::{
    Capture, CaptureCache, CaptureOptions, CaptureReport, Changes, DirWatch, Sink, capture_changes,
    capture_streaming,
};
use crate::error::VolumeError;
use crate::manifest::{EntryKind, Manifest};
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
    /// Device and inode of the root directory when the watch started.
    root_id: (u64, u64),
    /// When the walk the watch started with began.
    walked_at: Instant,
    /// Entries (and the directories they are in) changed since the last capture looked.
    changed: BTreeSet<Vec<u8>>,
    /// Why changes may have been missed, once they may have.
    lost: Option<String>,
    /// The last capture's tree and cache: what a pass that looks only at changes starts from.
    base: Manifest,
    cache: CaptureCache,
    /// Every name of each file with several names in `base`.
    linked: BTreeSet<Vec<u8>>,
    /// Whether processes with unreadable mappings were warned about.
    told_unreadable: bool,
}

impl SourceWatch {
    /// A watch for the volume at `root` that walks it at least every `walk_every`. Nothing is
    /// watched until the first [`SourceWatch::capture`].
    pub fn new(root: &Path, walk_every: Duration) -> Self {
        SourceWatch {
            root: root.to_owned(),
            walk_every,
            on: None,
        }
    }

    /// The watched volume's directory.
    pub fn root(&self) -> &Path {
        &self.root
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
        let mut reason = match &mut self.on {
            None => Some(WalkReason::NotWatching),
            Some(w) => {
                w.drain();
                let mapped = shared_writable_inodes();
                let reason = decide(
                    true,
                    w.lost.as_deref(),
                    w.root_id == root_id,
                    w.walked_at.elapsed(),
                    self.walk_every,
                    mapped.as_ref().map(|_| ()).map_err(|e| e.as_str()),
                );
                if reason.is_none() {
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
                        None => Some(WalkReason::ChangesNotEnough),
                    }
                } else {
                    reason
                }
            }
        };
        let reason = reason.take().unwrap_or(WalkReason::NotWatching);
        let cache = match self.on.take() {
            Some(w) => Some(w.cache),
            None => load_cache(),
        };
        let walked_at = Instant::now();
        // The watches are in place before the walk lists anything, so that a change made
        // after the walk looked at a directory is heard of.
        let watches = match DirWatches::new().and_then(|mut w| {
            watch_all(&self.root, &mut w)?;
            Ok(w)
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(root = %self.root.display(), error = %e, "cannot watch the volume; every push walks it (raise fs.inotify.max_user_watches if the limit was reached)");
                None
            }
        };
        let cap = capture_streaming(&self.root, opts, cache.as_ref(), sink)?;
        let watching = watches.is_some();
        if let Some(watches) = watches {
            self.on = Some(Watching {
                watches,
                root_id,
                walked_at,
                changed: BTreeSet::new(),
                lost: None,
                linked: linked_names(&cap.manifest),
                told_unreadable: false,
                base: cap.manifest.clone(),
                cache: cap.cache.clone(),
            });
        }
        Ok((cap, Pass::Walked { reason, watching }))
    }
}

impl Watching {
    /// Reads the pending events into `changed` and `lost`.
    fn drain(&mut self) {
        let (changed, lost) = (&mut self.changed, &mut self.lost);
        self.watches.drain(|seen| match seen {
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
        });
    }

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
                manifest: self.base.clone(),
                cache: self.cache.clone(),
                report,
            };
            return Ok(Some((cap, Pass::Changes { paths: 0 })));
        }
        let dirs = BTreeSet::new();
        let mut watch = WatchAdapter {
            watches: &mut self.watches,
            root,
        };
        let mut changes = Changes {
            base: &self.base,
            dirs: &dirs,
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
        self.linked = linked_names(&cap.manifest);
        self.base = cap.manifest.clone();
        self.cache = cap.cache.clone();
        let pass = Pass::Changes { paths: paths.len() };
        Ok(Some((cap, pass)))
    }
}

/// The [`DirWatch`] a change capture adds watches through.
struct WatchAdapter<'a> {
    watches: &'a mut DirWatches,
    root: &'a Path,
}

impl DirWatch for WatchAdapter<'_> {
    fn watched(&self, rel: &[u8]) -> bool {
        self.watches.contains(rel)
    }

    fn watch(&mut self, rel: &[u8]) -> io::Result<()> {
        self.watches.add(self.root, rel)
    }
}

/// Every name of each file with several names: each `HardLink` entry and the file it names.
fn linked_names(m: &Manifest) -> BTreeSet<Vec<u8>> {
    let mut out = BTreeSet::new();
    for e in &m.entries {
        if let EntryKind::HardLink { target } = &e.kind {
            out.insert(e.path.clone());
            out.insert(target.clone());
        }
    }
    out
}

/// Watches every directory under `root` on its filesystem, each before it is listed.
fn watch_all(root: &Path, watches: &mut DirWatches) -> io::Result<()> {
    let root_dev = std::fs::symlink_metadata(root)?.dev();
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        watches.add(root, &rel)?;
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
        use std::io::{BufRead, Write};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vol");
        std::fs::create_dir_all(root.join("db")).unwrap();
        std::fs::write(root.join("db/data"), vec![b'a'; 8192]).unwrap();
        let mut w = SourceWatch::new(&root, Duration::from_secs(3600));
        let (first, _) = pass(&mut w);
        // Let the racy margin pass, so the file's stamp from the walk is trusted as such.
        std::thread::sleep(Duration::from_millis(250));
        // A process maps the file shared and writable and writes through the mapping: the
        // kernel moves the file's mtime but tells no inotify watch.
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import mmap, sys\n\
                 f = open(sys.argv[1], 'r+b')\n\
                 m = mmap.mmap(f.fileno(), 8192)\n\
                 m[100:105] = b'MAPPD'\n\
                 print('written', flush=True)\n\
                 sys.stdin.read()",
            ])
            .arg(root.join("db/data"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "written");
        let (cap, p) = pass(&mut w);
        child.stdin.take().unwrap().flush().unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(p, Pass::Changes { paths: 1 });
        assert_eq!(cap.report.files_read, 1);
        assert_ne!(cap.manifest, first.manifest);
        assert_eq!(cap.manifest, walk(&root));
    }

    #[test]
    fn a_moved_folder_makes_the_next_pass_walk_and_the_one_after_look_at_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vol");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"f").unwrap();
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
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vol");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(root.join("b")).unwrap();
        std::fs::write(root.join("a/x"), b"x").unwrap();
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
        use std::io::{BufRead, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapped");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        assert!(!shared_writable_inodes().unwrap().inodes.contains(&ino));
        // A real process holding a shared writable mapping, as a database with a mapped
        // file would, until its stdin closes.
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import mmap, sys\n\
                 f = open(sys.argv[1], 'r+b')\n\
                 m = mmap.mmap(f.fileno(), 4096)\n\
                 m[0:1] = b'x'\n\
                 print('mapped', flush=True)\n\
                 sys.stdin.read()",
            ])
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "mapped");
        assert!(shared_writable_inodes().unwrap().inodes.contains(&ino));
        child.stdin.take().unwrap().flush().unwrap();
        assert!(child.wait().unwrap().success());
        assert!(!shared_writable_inodes().unwrap().inodes.contains(&ino));
    }
}
