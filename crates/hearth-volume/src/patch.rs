//! In-place apply: when the live tree is exactly as the last apply left it and the new tree
//! changes few of its entries, move the replaced and removed entries out and the new ones in,
//! instead of building a whole new tree beside the live one.
//!
//! A whole-tree build costs a hard link (or clone) per file, a `stat` per file for the stamps
//! and, when the replaced tree is pruned, an unlink per file: on a 100,000-file volume that is
//! seconds for a change of a few files. Here the cost follows the change.
//!
//! The standby must still never be left holding a mix of two trees. That is kept with a redo
//! record instead of a swap:
//! 1. every new or changed entry is built under `.<name>.hearth-patch/new/<index>` (its index in
//!    the new manifest) and flushed with `syncfs`; nothing live is touched yet;
//! 2. the new manifest is written as `.<name>.hearth-next.manifest` and the commit record
//!    `.<name>.hearth-patch/commit` (old and new tree hashes, the `prev` name) is written and
//!    synced: from here on the apply is decided;
//! 3. [`roll_forward`] moves each replaced or removed entry to `.<name>.hearth-prev.<ns>` (so
//!    nothing is deleted: pruning later deletes it only if it is still as applied), renames the
//!    staged entries into place, sets changed metadata and flushes;
//! 4. the new manifest and stamps replace the live ones and the patch folder is removed.
//!
//! Every step of 3 and 4 can run again after a crash: [`finish_interrupted`] (called before
//! anything reads the live tree) works the plan out again from the two manifests (it is a pure
//! function of them) and completes it. A patch folder without a commit record is our own
//! partial staging and is removed. The only window in which the live path shows a mix is while
//! step 3 runs, to a reader looking at the standby's copy at that moment; after a crash the next
//! start completes the change before anything else.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, OFlags, RenameFlags, ResolveFlags};

use crate::apply::{
    ApplyReport, Phases, PruneReport, TreeNames, build_regular, create_special, exists, join,
    now_ns, prune_previous, read_live_manifest_hashed, sync_dir,
};
use crate::error::{IoContext, VolumeError};
use crate::manifest::{Entry, EntryKind, Manifest, TreeHash};
use crate::reuse::{AppliedStamps, FileStamp, LiveFiles, wait_until};
use crate::store::ChunkStore;
use crate::threads::on_threads;
use crate::watch::LiveWatch;

/// What an in-place apply changes, worked out from the old and the new manifest alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Paths of the old tree moved to the kept tree: replaced or removed entries, only the top
    /// one of a removed directory (its contents go with it). In old-manifest order.
    pub out: Vec<Vec<u8>>,
    /// New directories (indexes into the new manifest), parents first.
    pub dirs: Vec<usize>,
    /// New or changed entries other than directories, built in the patch folder and renamed
    /// into place (indexes into the new manifest).
    pub place: Vec<usize>,
    /// Entries whose content stays and whose metadata changes in place: (new index, old index).
    pub meta: Vec<(usize, usize)>,
    /// Directories of the new tree whose metadata is set at the end, deepest first: new ones,
    /// changed ones and every parent of something moved (moving an entry changes its parent's
    /// mtime).
    pub touched_dirs: Vec<usize>,
    /// The old entries that end up in the kept tree (the moved ones, everything under them and
    /// their parents): the manifest that tree is checked against before it is pruned.
    pub kept: Vec<usize>,
}

impl Plan {
    /// How many entries the change touches.
    pub fn size(&self) -> usize {
        self.out.len() + self.dirs.len() + self.place.len() + self.meta.len()
    }
}

fn parent_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

/// Ancestors of `path`, nearest first, ending with the root (the empty path).
fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut cur = Some(path);
    std::iter::from_fn(move || {
        let p = cur?;
        if p.is_empty() {
            cur = None;
            return None;
        }
        let parent = parent_of(p);
        cur = Some(parent);
        Some(parent)
    })
}

fn same_meta(a: &Entry, b: &Entry) -> bool {
    (a.mode, a.uid, a.gid, a.mtime_sec, a.mtime_nsec)
        == (b.mode, b.uid, b.gid, b.mtime_sec, b.mtime_nsec)
        && a.xattrs == b.xattrs
}

/// The indexes of the entry at `top` and of everything under it, in manifest order. Paths with
/// a common prefix are contiguous in a sorted manifest, so this is one binary search and a scan
/// (which skips siblings such as `a/b!` that sort between `a/b` and `a/b/c`).
fn subtree<'a>(m: &'a Manifest, top: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    let from = m.entries.partition_point(|e| e.path.as_slice() < top);
    m.entries[from..]
        .iter()
        .take_while(move |e| e.path.starts_with(top))
        .enumerate()
        .filter(move |(_, e)| crate::manifest::is_under(&e.path, top))
        .map(move |(k, _)| from + k)
}

/// The plan to turn the tree of `old` into the tree of `new` in place, or `None` when a whole
/// build is the better (or the only safe) way: when hard links take part in the change (a
/// replaced inode's other names would keep the old content), or when the change touches more
/// than half of the entries (then building beside costs about the same and keeps whole trees).
///
/// Both manifests are sorted by path, so the two are compared in one merge; hashing every path of
/// both (as an earlier version did) was a large part of a standby's time on a small change.
pub(crate) fn plan(old: &Manifest, new: &Manifest) -> Option<Plan> {
    let is_link = |e: &Entry| matches!(e.kind, EntryKind::HardLink { .. });
    let mut plan = Plan::default();
    // Old paths replaced or removed, in old-manifest order (the merge visits them in order).
    let mut moved: Vec<&[u8]> = Vec::new();
    let mut touched: HashSet<&[u8]> = HashSet::new();
    let mut olds = old.entries.iter().peekable();
    for (i, n) in new.entries.iter().enumerate() {
        while let Some(o) = olds.next_if(|o| o.path < n.path) {
            if is_link(o) {
                return None;
            }
            moved.push(&o.path);
        }
        match olds.next_if(|o| o.path == n.path) {
            Some(o) if o.kind == n.kind => {
                if same_meta(o, n) {
                    continue;
                }
                if is_link(n) {
                    return None;
                }
                if n.kind == EntryKind::Dir {
                    touched.insert(&n.path);
                } else {
                    // Its index in the old manifest, found only for the few that change.
                    let j = old.entries.binary_search_by(|e| e.path.cmp(&n.path)).ok()?;
                    plan.meta.push((i, j));
                }
            }
            // New at its path, or of another kind or content than the entry it replaces.
            replaced => {
                if is_link(n) || replaced.is_some_and(is_link) {
                    return None;
                }
                if let Some(o) = replaced {
                    moved.push(&o.path);
                }
                if n.kind == EntryKind::Dir {
                    plan.dirs.push(i);
                    touched.insert(&n.path);
                } else {
                    plan.place.push(i);
                }
                touched.insert(parent_of(&n.path));
            }
        }
    }
    for o in olds {
        if is_link(o) {
            return None;
        }
        moved.push(&o.path);
    }
    let moved_set: HashSet<&[u8]> = moved.iter().copied().collect();
    let restamped: HashSet<&[u8]> = plan
        .meta
        .iter()
        .map(|&(i, _)| new.entries[i].path.as_slice())
        .collect();
    // Replaced files that other names link to would leave those names with the old content.
    for e in old.entries.iter().chain(&new.entries) {
        if let EntryKind::HardLink { target } = &e.kind
            && (moved_set.contains(target.as_slice()) || restamped.contains(target.as_slice()))
        {
            return None;
        }
    }
    // Only the top of a moved subtree moves; its parent stays a directory in both trees.
    for path in &moved {
        if ancestors(path).any(|a| moved_set.contains(a)) {
            continue;
        }
        plan.out.push(path.to_vec());
        touched.insert(parent_of(path));
    }
    if plan.size() * 2 > new.entries.len() {
        return None;
    }
    plan.touched_dirs = new
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == EntryKind::Dir && touched.contains(e.path.as_slice()))
        .map(|(i, _)| i)
        .rev()
        .collect();
    // The root always: the kept tree is a folder even when nothing was moved into it.
    let mut keep_dirs: HashSet<&[u8]> = HashSet::from([&b""[..]]);
    for top in &plan.out {
        keep_dirs.extend(ancestors(top));
    }
    let mut kept: Vec<usize> = keep_dirs
        .iter()
        .filter_map(|d| {
            old.entries
                .binary_search_by(|e| e.path.as_slice().cmp(d))
                .ok()
        })
        .collect();
    for top in &plan.out {
        kept.extend(subtree(old, top));
    }
    kept.sort_unstable();
    kept.dedup();
    plan.kept = kept;
    Some(plan)
}

/// The regular files of `new` that an in-place apply from `old` builds: new at their path, or
/// different there (in content, kind or metadata). Both manifests are sorted by path, so this is
/// one merge, without an index of either.
pub(crate) fn changed_files<'a>(old: &Manifest, new: &'a Manifest) -> Vec<&'a Entry> {
    let mut out = Vec::new();
    let mut olds = old.entries.iter().peekable();
    for n in &new.entries {
        if !matches!(n.kind, EntryKind::File { .. }) {
            continue;
        }
        while olds.next_if(|o| o.path < n.path).is_some() {}
        if olds.peek().is_none_or(|o| *o != n) {
            out.push(n);
        }
    }
    out
}

/// Reads ahead, without changing anything, what an in-place apply of `new` over the live tree
/// of `old` at `live` will touch: the folders on the way to every entry it moves out or places,
/// and the data of the live files it replaces (new versions reuse their unchanged chunks). A
/// standby runs this while the chunks arrive, so that the apply finds them in the cache: with
/// cold caches the moves spent most of their time waiting for those reads, many of them under
/// the kernel's lock for renames across folders. Everything is opened beneath the live root
/// without following symlinks, read-only; what cannot be opened is skipped.
pub(crate) fn warm(live: &Path, old: &Manifest, new: &Manifest) {
    let Some(plan) = plan(old, new) else { return };
    let Ok(tree) = Beneath::open(live) else {
        return;
    };
    let paths: Vec<&[u8]> = plan
        .out
        .iter()
        .map(Vec::as_slice)
        .chain(plan.place.iter().map(|&i| new.entries[i].path.as_slice()))
        .collect();
    on_threads(MOVE_THREADS, &paths, |rel| {
        let Ok((dir, name)) = tree.parent(rel) else {
            return;
        };
        let Ok(fd) = rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) else {
            return;
        };
        if rustix::fs::fstat(&fd)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
        {
            let _ = rustix::fs::fadvise(&fd, 0, None, rustix::fs::Advice::WillNeed);
        }
    });
}

/// The commit record: written once everything is staged, it decides the apply.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Commit {
    old: TreeHash,
    new: TreeHash,
    prev_ns: u128,
}

const COMMIT_MAGIC: &str = "hearth-patch 1";

impl Commit {
    fn encode(&self) -> String {
        format!(
            "{COMMIT_MAGIC}\nold {}\nnew {}\nprev {}\n",
            self.old, self.new, self.prev_ns
        )
    }

    fn decode(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != COMMIT_MAGIC {
            return None;
        }
        let mut field = |name: &str| lines.next()?.strip_prefix(name)?.strip_prefix(' ');
        let old = TreeHash::from_hex(field("old")?)?;
        let new = TreeHash::from_hex(field("new")?)?;
        let prev_ns = field("prev")?.parse().ok()?;
        Some(Commit { old, new, prev_ns })
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), VolumeError> {
    let mut f = File::create(path).ctx("creating", path)?;
    std::io::Write::write_all(&mut f, bytes).ctx("writing", path)?;
    f.sync_all().ctx("syncing", path)
}

fn staged(names: &TreeNames, index: usize) -> PathBuf {
    names.patch_dir().join("new").join(index.to_string())
}

/// Applies `plan` (from [`plan`] on the live tree's manifest `old` and `new`) in place. The
/// caller has checked that the live tree is exactly as applied from `old` and that every chunk
/// is at hand; `current` are the live files' stamps as that check found them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_in_place(
    store: &ChunkStore,
    names: &TreeNames,
    (old, old_hash): (&Manifest, TreeHash),
    (new, encoded): (&Manifest, &[u8]),
    plan: &Plan,
    live_files: Option<&LiveFiles>,
    current: Option<&AppliedStamps>,
    keep: Option<usize>,
    report: &mut ApplyReport,
    phases: &mut Phases,
    watch: Option<&mut LiveWatch>,
) -> Result<PruneReport, VolumeError> {
    let (commit, pruned) = stage_and_commit(
        store,
        names,
        old_hash,
        (new, encoded),
        plan,
        live_files,
        keep,
        report,
        phases,
    )?;
    let current = current.filter(|_| !pruned.removed_shared);
    let decided = Decided {
        old,
        new,
        plan,
        commit: &commit,
    };
    roll_forward(names, decided, current, watch, Some(phases))?;
    report.previous = Some(names.previous(commit.prev_ns));
    report.in_place = true;
    Ok(pruned)
}

/// Steps 1 and 2 of the module documentation (and the pruning of older kept trees).
#[allow(clippy::too_many_arguments)]
fn stage_and_commit(
    store: &ChunkStore,
    names: &TreeNames,
    old_hash: TreeHash,
    (new, encoded): (&Manifest, &[u8]),
    plan: &Plan,
    live_files: Option<&LiveFiles>,
    keep: Option<usize>,
    report: &mut ApplyReport,
    phases: &mut Phases,
) -> Result<(Commit, PruneReport), VolumeError> {
    let work = names.patch_dir();
    if exists(&work) {
        fs::remove_dir_all(&work).ctx("removing partial staging", &work)?;
    }
    let new_dir = work.join("new");
    fs::create_dir_all(&new_dir).ctx("creating", &new_dir)?;
    let mut files: Vec<(&Entry, PathBuf)> = Vec::new();
    for &i in &plan.place {
        let entry = &new.entries[i];
        let path = staged(names, i);
        match entry.kind {
            EntryKind::File { .. } => files.push((entry, path)),
            _ => create_special(&path, entry)?,
        }
    }
    build_regular(store, &files, &new_dir, live_files, None, report)?;
    phases.mark("stage");
    // Pruning older kept trees before the stamps are taken: a whole-tree `prev` shares inodes
    // with the live tree, and unlinking them moves their ctimes.
    // Kept trees of earlier in-place applies share nothing with the live tree: their pruning can
    // wait until the apply is acknowledged (`ApplyReport::prune_later`).
    let pruned = match keep {
        Some(keep) => {
            let due =
                crate::apply::select_for_prune(&names.list_previous()?, keep.saturating_sub(1));
            if due
                .iter()
                .all(|&ns| exists(&names.previous_partial_marker(ns)))
            {
                report.prune_later = !due.is_empty();
                PruneReport::default()
            } else {
                prune_previous(&names.live(), keep.saturating_sub(1))?
            }
        }
        None => PruneReport::default(),
    };
    phases.mark("prune");
    rustix::fs::syncfs(File::open(&new_dir).ctx("opening", &new_dir)?).ctx("syncing", &new_dir)?;
    let commit = Commit {
        old: old_hash,
        new: report.tree_hash,
        prev_ns: now_ns(),
    };
    write_synced(&names.next_manifest(), encoded)?;
    write_synced(&work.join("commit"), commit.encode().as_bytes())?;
    sync_dir(&work)?;
    sync_dir(&names.parent_dir())?;
    phases.mark("commit");
    Ok((commit, pruned))
}

/// A decided in-place apply: the two trees, the plan between them and its commit record.
#[derive(Clone, Copy)]
struct Decided<'a> {
    old: &'a Manifest,
    new: &'a Manifest,
    plan: &'a Plan,
    commit: &'a Commit,
}

/// Step 3 and 4 of the module documentation; every part may already have been done by an
/// interrupted run. `current` are stamps of the live files still valid for the unchanged ones;
/// without them every file of the new tree is stat'ed. `watch`, when the tree is watched, is
/// kept watching exactly the new tree's directories, and told which changes were apply's own.
fn roll_forward(
    names: &TreeNames,
    decided: Decided<'_>,
    current: Option<&AppliedStamps>,
    mut watch: Option<&mut LiveWatch>,
    mut phases: Option<&mut Phases>,
) -> Result<(), VolumeError> {
    let Decided {
        old,
        new,
        plan,
        commit,
    } = decided;
    let mut mark = |name| {
        if let Some(p) = phases.as_deref_mut() {
            p.mark(name);
        }
    };
    let live = names.live();
    let prev = names.previous(commit.prev_ns);
    let marker = names.previous_partial_marker(commit.prev_ns);
    if !exists(&marker) {
        File::create(&marker).ctx("creating", &marker)?;
    }
    if !exists(&prev) {
        fs::create_dir(&prev).ctx("creating", &prev)?;
    }
    let tree = Beneath::open(&live)?;
    // The moves out, the moves in and the metadata changes are each independent of one another
    // (no moved entry is under another), so each group runs on several threads: with cold
    // caches most of their time is spent waiting for the folders on the way to be read, and
    // one at a time that was a third of a 1 % pass on 100,000 files.
    all_ok(on_threads(MOVE_THREADS, &plan.out, |path| {
        let to = join(&prev, path);
        // Moved already by an interrupted run (the prev folder is this apply's own), or gone.
        let (from_dir, name) = tree.parent(path)?;
        if exists(&to) || !tree.has(&from_dir, name) {
            return Ok(());
        }
        // Safe to race with another thread making the same folder: it counts as made.
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).ctx("creating", parent)?;
        }
        rustix::fs::renameat_with(&from_dir, name, CWD, &to, RenameFlags::NOREPLACE)
            .ctx("moving the replaced entry to", &to)
    }))?;
    mark("moves out");
    if let Some(w) = watch.as_deref_mut() {
        for top in &plan.out {
            for j in subtree(old, top) {
                if old.entries[j].kind == EntryKind::Dir {
                    w.remove_dir(&old.entries[j].path);
                }
            }
        }
    }
    for &i in &plan.dirs {
        let rel = &new.entries[i].path;
        let (dir, name) = tree.parent(rel)?;
        // Private until its metadata is set with the other touched folders.
        match rustix::fs::mkdirat(&dir, name, rustix::fs::Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) if tree.is_dir(&dir, name) => {}
            Err(e) => {
                return Err(VolumeError::io(
                    "creating directory",
                    join(&live, rel),
                    e.into(),
                ));
            }
        }
        if let Some(w) = watch.as_deref_mut()
            && let Err(e) = w.add_dir(&live, &new.entries[i].path)
        {
            w.spoil(format!("a new directory could not be watched: {e}"));
        }
    }
    all_ok(on_threads(MOVE_THREADS, &plan.place, |&i| {
        let rel = &new.entries[i].path;
        let to = join(&live, rel);
        let from = staged(names, i);
        let (dir, name) = tree.parent(rel)?;
        if exists(&from) {
            rustix::fs::renameat_with(CWD, &from, &dir, name, RenameFlags::NOREPLACE)
                .ctx("moving the new entry to", &to)
        } else if !tree.has(&dir, name) {
            Err(VolumeError::io(
                "finishing an in-place apply at",
                from,
                std::io::Error::other("a staged entry is missing and not in place either"),
            ))
        } else {
            Ok(())
        }
    }))?;
    all_ok(on_threads(MOVE_THREADS, &plan.meta, |&(i, j)| {
        let (n, o) = (&new.entries[i], &old.entries[j]);
        tree.set_meta(&n.path, Some(o), n)
    }))?;
    mark("moves in");
    // The live directories whose entries changed get their recorded metadata back last, deepest
    // first. (The kept tree's folders above what was moved into it are scaffolding: pruning
    // compares only their names and kinds.)
    for &i in &plan.touched_dirs {
        let n = &new.entries[i];
        let o = old
            .entries
            .binary_search_by(|e| e.path.cmp(&n.path))
            .ok()
            .map(|j| &old.entries[j]);
        tree.set_meta(&n.path, o.filter(|o| o.kind == EntryKind::Dir), n)?;
    }
    mark("folders");
    rustix::fs::syncfs(File::open(&live).ctx("opening", &live)?).ctx("syncing", &live)?;
    mark("sync");

    let kept = Manifest {
        chunking: old.chunking,
        entries: plan.kept.iter().map(|&j| old.entries[j].clone()).collect(),
    };
    let prev_manifest = names.previous_manifest(commit.prev_ns);
    write_synced(&prev_manifest, &kept.encode()?)?;

    // Stamps: the unchanged files keep theirs (renames elsewhere do not touch them), the placed
    // and re-stamped ones are stat'ed now, after their rename (which moves a ctime).
    let fresh: HashSet<&[u8]> = plan
        .place
        .iter()
        .chain(plan.meta.iter().map(|(i, _)| i))
        .map(|&i| new.entries[i].path.as_slice())
        .collect();
    let known: HashMap<&[u8], &FileStamp> = current
        .filter(|c| c.tree_hash() == commit.old)
        .map(|c| c.files().iter().map(|(p, s)| (p.as_slice(), s)).collect())
        .unwrap_or_default();
    let mut stamps = Vec::new();
    let mut newest = None;
    for e in &new.entries {
        if !matches!(e.kind, EntryKind::File { .. }) {
            continue;
        }
        let stamp = match known.get(e.path.as_slice()) {
            Some(s) if !fresh.contains(e.path.as_slice()) => **s,
            _ => {
                let path = join(&live, &e.path);
                let s = FileStamp::of(&fs::symlink_metadata(&path).ctx("inspecting", &path)?);
                newest = Some(s);
                s
            }
        };
        stamps.push((e.path.clone(), stamp));
    }
    let stamps = AppliedStamps::new(commit.new, stamps);
    // As with a swap, a later change must get a ctime other than the one recorded.
    if newest.is_some() {
        wait_until(stamps.switch_not_before());
    }
    mark("stamps");
    write_synced(&names.next_stamps(), &stamps.encode()?)?;
    fs::rename(names.next_manifest(), names.live_manifest())
        .ctx("renaming", &names.next_manifest())?;
    fs::rename(names.next_stamps(), names.live_stamps()).ctx("renaming", &names.next_stamps())?;
    sync_dir(&names.parent_dir())?;
    let work = names.patch_dir();
    fs::remove_dir_all(&work).ctx("removing", &work)?;
    sync_dir(&names.parent_dir())?;
    mark("finish");
    if let Some(w) = watch {
        let mut expected: HashSet<&[u8]> = plan.out.iter().map(Vec::as_slice).collect();
        expected.extend(
            plan.dirs
                .iter()
                .chain(&plan.place)
                .chain(plan.meta.iter().map(|(i, _)| i))
                .chain(&plan.touched_dirs)
                .map(|&i| new.entries[i].path.as_slice()),
        );
        w.drain(&expected);
        w.now_watches(commit.new);
        mark("watch");
    }
    Ok(())
}

/// How many threads move entries in and out of the live tree at once (see [`on_threads`]).
const MOVE_THREADS: usize = 8;

/// The first error of a group of steps run on several threads, if any.
fn all_ok(results: Vec<Result<(), VolumeError>>) -> Result<(), VolumeError> {
    results.into_iter().collect()
}

/// The live tree, reached without following any symlink and without leaving it (`openat2` with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`). Others can write to the live tree while an in-place
/// apply runs (they should not, but it is theirs to edit): a folder swapped for a symlink must not
/// lead a rename, a new folder or a metadata change of this root-run process outside the tree.
struct Beneath {
    root: std::os::fd::OwnedFd,
    path: PathBuf,
}

impl Beneath {
    fn open(root: &Path) -> Result<Self, VolumeError> {
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| VolumeError::io("opening", root, e.into()))?;
        Ok(Beneath {
            root: fd,
            path: root.to_owned(),
        })
    }

    /// The folder holding `rel` (opened as a path handle) and `rel`'s last component.
    fn parent<'a>(
        &self,
        rel: &'a [u8],
    ) -> Result<(std::os::fd::OwnedFd, &'a std::ffi::OsStr), VolumeError> {
        // The root is its own folder's `.`.
        let (dir, name) = match rel.iter().rposition(|b| *b == b'/') {
            Some(k) => (&rel[..k], &rel[k + 1..]),
            None if rel.is_empty() => (&b""[..], &b"."[..]),
            None => (&b""[..], rel),
        };
        let dir_path: &[u8] = if dir.is_empty() { b"." } else { dir };
        let fd = rustix::fs::openat2(
            &self.root,
            std::ffi::OsStr::from_bytes(dir_path),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| {
            VolumeError::io(
                "opening without following symlinks",
                join(&self.path, dir),
                e.into(),
            )
        })?;
        Ok((fd, std::ffi::OsStr::from_bytes(name)))
    }

    fn stat(&self, dir: &std::os::fd::OwnedFd, name: &std::ffi::OsStr) -> Option<rustix::fs::Stat> {
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).ok()
    }

    fn has(&self, dir: &std::os::fd::OwnedFd, name: &std::ffi::OsStr) -> bool {
        self.stat(dir, name).is_some()
    }

    fn is_dir(&self, dir: &std::os::fd::OwnedFd, name: &std::ffi::OsStr) -> bool {
        self.stat(dir, name)
            .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
    }

    /// Sets `new`'s metadata on the entry at `rel`, which has `old`'s (if known): only what
    /// differs (each change is a journal transaction), and the mtime always (moving entries in
    /// and out of a folder moves its mtime). Nothing follows a symlink: owner, times and xattrs
    /// go by name in the opened folder without following, the mode through a handle on the
    /// entry checked to be of its kind (`chmod` has no no-follow form on older kernels).
    fn set_meta(&self, rel: &[u8], old: Option<&Entry>, new: &Entry) -> Result<(), VolumeError> {
        let path = join(&self.path, rel);
        let (dir, name) = self.parent(rel)?;
        let symlink = matches!(new.kind, EntryKind::Symlink { .. });
        let owner = old.is_none_or(|o| (o.uid, o.gid) != (new.uid, new.gid));
        if owner {
            rustix::fs::chownat(
                &dir,
                name,
                Some(rustix::fs::Uid::from_raw(new.uid)),
                Some(rustix::fs::Gid::from_raw(new.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| VolumeError::io("changing owner of", &path, e.into()))?;
        }
        // After chown, which clears set-uid and set-gid bits.
        if !symlink && (owner || old.is_none_or(|o| o.mode != new.mode)) {
            let entry = rustix::fs::openat(
                &dir,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| VolumeError::io("opening", &path, e.into()))?;
            let st = rustix::fs::fstat(&entry)
                .map_err(|e| VolumeError::io("inspecting", &path, e.into()))?;
            if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                return Err(VolumeError::io(
                    "changing mode of",
                    &path,
                    std::io::Error::other("it became a symlink while the apply ran"),
                ));
            }
            fs::set_permissions(
                format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&entry)),
                std::os::unix::fs::PermissionsExt::from_mode(new.mode),
            )
            .ctx("changing mode of", &path)?;
        }
        // By name in the opened folder; the `xattr` crate's calls do not follow a symlink.
        let by_name = Path::new("/proc/self/fd")
            .join(std::os::fd::AsRawFd::as_raw_fd(&dir).to_string())
            .join(name);
        let old_xattrs = old.map_or(&[][..], |o| o.xattrs.as_slice());
        for x in old_xattrs {
            if !new.xattrs.iter().any(|n| n.name == x.name) {
                xattr::remove(&by_name, std::ffi::OsStr::from_bytes(&x.name))
                    .ctx("removing xattr of", &path)?;
            }
        }
        for x in &new.xattrs {
            if !old_xattrs.contains(x) {
                xattr::set(&by_name, std::ffi::OsStr::from_bytes(&x.name), &x.value)
                    .ctx("setting xattr on", &path)?;
            }
        }
        rustix::fs::utimensat(
            &dir,
            name,
            &crate::apply::times(new),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| VolumeError::io("setting times of", &path, e.into()))
    }
}

/// Completes an in-place apply that a crash interrupted after its commit record was written, or
/// removes the partial staging of one interrupted before. Called before anything reads the live
/// tree or its manifest. Returns whether a committed apply was completed.
pub fn finish_interrupted(live: &Path) -> Result<bool, VolumeError> {
    let names = TreeNames::of(live)?;
    let work = names.patch_dir();
    if !exists(&work) {
        return Ok(false);
    }
    let commit_path = work.join("commit");
    let commit = match fs::read_to_string(&commit_path) {
        Ok(text) => Commit::decode(&text).ok_or_else(|| VolumeError::BadTarget {
            path: commit_path.clone(),
            reason: "is not a commit record this version of hearth can read; move the folder away after checking the live tree".into(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Staged before the decision: nothing live was touched.
            fs::remove_dir_all(&work).ctx("removing partial staging", &work)?;
            sync_dir(&names.parent_dir())?;
            return Ok(false);
        }
        Err(e) => return Err(VolumeError::io("reading", commit_path, e)),
    };
    let live_manifest = read_live_manifest_hashed(live)?;
    let live_hash = live_manifest.as_ref().map(|(_, h)| *h);
    if live_hash == Some(commit.new) {
        // Only the last renames and the clean-up were left.
        if exists(&names.next_stamps()) {
            fs::rename(names.next_stamps(), names.live_stamps())
                .ctx("renaming", &names.next_stamps())?;
        }
        fs::remove_dir_all(&work).ctx("removing", &work)?;
        sync_dir(&names.parent_dir())?;
        return Ok(true);
    }
    let bad = |reason: &str| VolumeError::BadTarget {
        path: work.clone(),
        reason: format!(
            "holds an interrupted in-place apply that cannot be completed: {reason}; check the live tree and move the folder away"
        ),
    };
    let Some((old, _)) = live_manifest.filter(|_| live_hash == Some(commit.old)) else {
        return Err(bad("the live manifest is neither the old nor the new tree"));
    };
    let next = fs::read(names.next_manifest()).ctx("reading", &names.next_manifest())?;
    let (new, new_hash) = Manifest::decode_hashed(&next)?;
    if new_hash != commit.new {
        return Err(bad("the next manifest is not the committed tree"));
    }
    let Some(plan) = plan(&old, &new) else {
        return Err(bad("its plan cannot be worked out again"));
    };
    tracing::warn!(path = %live.display(), tree = %commit.new, "completing an in-place apply interrupted by a crash");
    let decided = Decided {
        old: &old,
        new: &new,
        plan: &plan,
        commit: &commit,
    };
    roll_forward(&names, decided, None, None, None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChunkId, ChunkParams, ChunkRef};
    use std::os::unix::fs::PermissionsExt;

    fn entry(path: &str, kind: EntryKind, mode: u32) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime_sec: 1,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }

    fn file(path: &str, content: u8) -> Entry {
        let id = ChunkId::of(&[content]);
        entry(
            path,
            EntryKind::File {
                size: 1,
                chunks: vec![ChunkRef {
                    offset: 0,
                    len: 1,
                    id,
                }],
            },
            0o644,
        )
    }

    fn dir(path: &str) -> Entry {
        entry(path, EntryKind::Dir, 0o755)
    }

    fn manifest(mut entries: Vec<Entry>) -> Manifest {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let m = Manifest {
            chunking: ChunkParams::default(),
            entries,
        };
        m.validate().unwrap();
        m
    }

    fn paths(m: &Manifest, idx: &[usize]) -> Vec<String> {
        idx.iter()
            .map(|&i| String::from_utf8_lossy(&m.entries[i].path).into_owned())
            .collect()
    }

    /// A base tree of twelve entries, so that a change of a few stays under half.
    fn base() -> Vec<Entry> {
        let mut v = vec![dir(""), dir("a"), dir("a/b"), dir("c")];
        for i in 0..8 {
            v.push(file(&format!("f{i}"), i));
        }
        v.push(file("a/x", 10));
        v.push(file("a/b/y", 11));
        v
    }

    #[test]
    fn plans_follow_the_change() {
        struct Case {
            name: &'static str,
            change: fn(&mut Vec<Entry>),
            out: &'static [&'static str],
            dirs: &'static [&'static str],
            place: &'static [&'static str],
            meta: &'static [&'static str],
            touched: &'static [&'static str],
            kept: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "nothing",
                change: |_| {},
                out: &[],
                dirs: &[],
                place: &[],
                meta: &[],
                touched: &[],
                kept: &[""],
            },
            Case {
                name: "one file's content",
                change: |v| {
                    v.iter_mut()
                        .find(|e| e.path == b"a/b/y")
                        .into_iter()
                        .for_each(|e| *e = file("a/b/y", 99))
                },
                out: &["a/b/y"],
                dirs: &[],
                place: &["a/b/y"],
                meta: &[],
                touched: &["a/b"],
                kept: &["", "a", "a/b", "a/b/y"],
            },
            Case {
                name: "a mode only",
                change: |v| {
                    v.iter_mut()
                        .filter(|e| e.path == b"f1")
                        .for_each(|e| e.mode = 0o600)
                },
                out: &[],
                dirs: &[],
                place: &[],
                meta: &["f1"],
                touched: &[],
                kept: &[""],
            },
            Case {
                name: "a directory removed with its contents",
                change: |v| v.retain(|e| !e.path.starts_with(b"a")),
                out: &["a"],
                dirs: &[],
                place: &[],
                meta: &[],
                touched: &[""],
                kept: &["", "a", "a/b", "a/b/y", "a/x"],
            },
            Case {
                name: "a new directory with a file",
                change: |v| {
                    v.push(dir("d"));
                    v.push(file("d/z", 50));
                },
                out: &[],
                dirs: &["d"],
                place: &["d/z"],
                meta: &[],
                touched: &["d", ""],
                kept: &[""],
            },
            Case {
                name: "a file becomes a directory",
                change: |v| {
                    v.retain(|e| e.path != b"f2");
                    v.push(dir("f2"));
                },
                out: &["f2"],
                dirs: &["f2"],
                place: &[],
                meta: &[],
                touched: &["f2", ""],
                kept: &["", "f2"],
            },
            Case {
                name: "a directory's mtime",
                change: |v| {
                    v.iter_mut()
                        .filter(|e| e.path == b"c")
                        .for_each(|e| e.mtime_sec = 7)
                },
                out: &[],
                dirs: &[],
                place: &[],
                meta: &[],
                touched: &["c"],
                kept: &[""],
            },
        ];
        for c in cases {
            let old = manifest(base());
            let mut v = base();
            (c.change)(&mut v);
            let new = manifest(v);
            let p = plan(&old, &new).unwrap_or_else(|| panic!("{}: no plan", c.name));
            let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            let out: Vec<String> = p
                .out
                .iter()
                .map(|o| String::from_utf8_lossy(o).into_owned())
                .collect();
            assert_eq!(out, s(c.out), "{}: out", c.name);
            assert_eq!(paths(&new, &p.dirs), s(c.dirs), "{}: dirs", c.name);
            assert_eq!(paths(&new, &p.place), s(c.place), "{}: place", c.name);
            let meta: Vec<usize> = p.meta.iter().map(|(i, _)| *i).collect();
            assert_eq!(paths(&new, &meta), s(c.meta), "{}: meta", c.name);
            assert_eq!(
                paths(&new, &p.touched_dirs),
                s(c.touched),
                "{}: touched",
                c.name
            );
            assert_eq!(paths(&old, &p.kept), s(c.kept), "{}: kept", c.name);
            Manifest {
                chunking: old.chunking,
                entries: p.kept.iter().map(|&j| old.entries[j].clone()).collect(),
            }
            .validate()
            .unwrap_or_else(|e| panic!("{}: kept manifest invalid: {e}", c.name));
        }
    }

    #[test]
    fn a_subtree_is_its_top_and_what_is_under_it_not_its_look_alike_siblings() {
        let m = manifest(vec![
            dir(""),
            dir("a"),
            dir("a/b"),
            file("a/b!", 1),
            file("a/b/c", 2),
            dir("a/b/d"),
            file("a/b/d/e", 3),
            file("a/bc", 4),
            file("z", 5),
        ]);
        assert_eq!(
            paths(&m, &subtree(&m, b"a/b").collect::<Vec<_>>()),
            ["a/b", "a/b/c", "a/b/d", "a/b/d/e"]
        );
        assert_eq!(paths(&m, &subtree(&m, b"z").collect::<Vec<_>>()), ["z"]);
        assert!(subtree(&m, b"y").next().is_none());
    }

    #[test]
    fn changed_files_are_the_new_or_different_regular_files() {
        let old = manifest(base());
        let mut v = base();
        v.retain(|e| e.path != b"f0");
        v.iter_mut()
            .filter(|e| e.path == b"f1")
            .for_each(|e| *e = file("f1", 42));
        v.iter_mut()
            .filter(|e| e.path == b"f2")
            .for_each(|e| e.mtime_sec = 9);
        v.push(file("a/new", 43));
        v.push(dir("z"));
        let new = manifest(v);
        let got: Vec<String> = changed_files(&old, &new)
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert_eq!(got, ["a/new", "f1", "f2"]);
        assert!(changed_files(&old, &old).is_empty());
    }

    #[test]
    fn no_plan_for_large_changes_or_hard_links() {
        let old = manifest(base());
        let mut v = base();
        for (i, e) in v.iter_mut().enumerate() {
            if matches!(e.kind, EntryKind::File { .. }) {
                *e = file(&String::from_utf8_lossy(&e.path), 100 + i as u8);
            }
        }
        assert_eq!(plan(&old, &manifest(v)), None, "most files changed");

        let mut with_link = base();
        with_link.push(entry(
            "g",
            EntryKind::HardLink {
                target: b"f0".to_vec(),
            },
            0,
        ));
        let old = manifest(with_link.clone());
        let mut changed = with_link.clone();
        changed
            .iter_mut()
            .filter(|e| e.path == b"f0")
            .for_each(|e| *e = file("f0", 77));
        assert_eq!(
            plan(&old, &manifest(changed)),
            None,
            "a linked file replaced"
        );
        let mut other = with_link;
        other
            .iter_mut()
            .filter(|e| e.path == b"f5")
            .for_each(|e| *e = file("f5", 77));
        assert!(
            plan(&old, &manifest(other)).is_some(),
            "a change beside an unchanged link"
        );
    }

    #[test]
    fn commit_records_round_trip_and_reject_garbage() {
        let c = Commit {
            old: TreeHash([1; 32]),
            new: TreeHash([2; 32]),
            prev_ns: 1_700_000_000_123_456_789,
        };
        assert_eq!(Commit::decode(&c.encode()), Some(c.clone()));
        assert_eq!(Commit::decode(""), None);
        assert_eq!(Commit::decode(&c.encode().replace("old", "odl")), None);
        assert_eq!(
            Commit::decode(&c.encode().replace(COMMIT_MAGIC, "hearth-patch 2")),
            None
        );
    }

    /// A standby tree applied from `src`, then `src` changed by `change`: the store holds every
    /// chunk of both versions. Returns the old and new manifests.
    fn two_versions(
        tmp: &Path,
        change: impl FnOnce(&Path),
    ) -> (ChunkStore, PathBuf, Manifest, Manifest) {
        use crate::capture::{CaptureOptions, capture};
        let src = tmp.join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        for i in 0..10 {
            fs::write(src.join(format!("f{i}")), format!("file {i}")).unwrap();
        }
        fs::write(src.join("d/x"), b"x").unwrap();
        let store = ChunkStore::open(&tmp.join("store")).unwrap();
        let put = |m: &Manifest| {
            for w in crate::diff::missing_chunks(m, &store.index().unwrap()).wants {
                store
                    .put(&w.id, &crate::diff::read_chunk(&src, &w).unwrap())
                    .unwrap();
            }
        };
        let old = capture(&src, &CaptureOptions::default(), None)
            .unwrap()
            .manifest;
        put(&old);
        fs::create_dir(tmp.join("standby")).unwrap();
        let live = tmp.join("standby/live");
        crate::apply::apply(&store, &old, &live).unwrap();
        change(&src);
        let new = capture(&src, &CaptureOptions::default(), None)
            .unwrap()
            .manifest;
        put(&new);
        (store, live, old, new)
    }

    fn live_hash(live: &Path) -> TreeHash {
        use crate::capture::{CaptureOptions, capture};
        capture(live, &CaptureOptions::default(), None)
            .unwrap()
            .manifest
            .tree_hash()
            .unwrap()
    }

    /// [`two_versions`], then the in-place apply between them staged and committed (not rolled
    /// forward): what a crash right after the commit leaves.
    fn committed(
        tmp: &Path,
        change: impl FnOnce(&Path),
    ) -> (
        ChunkStore,
        PathBuf,
        Manifest,
        Manifest,
        TreeNames,
        Plan,
        Commit,
    ) {
        let (store, live, old, new) = two_versions(tmp, change);
        let names = TreeNames::of(&live).unwrap();
        let plan = super::plan(&old, &new).unwrap();
        let (encoded, new_hash) = new.encode_and_hash().unwrap();
        let mut report = ApplyReport::nothing_yet(new_hash);
        let (commit, _) = stage_and_commit(
            &store,
            &names,
            old.tree_hash().unwrap(),
            (&new, &encoded),
            &plan,
            None,
            None,
            &mut report,
            &mut Phases::start(),
        )
        .unwrap();
        (store, live, old, new, names, plan, commit)
    }

    #[test]
    fn a_crash_after_the_commit_is_completed_and_one_before_it_leaves_the_old_tree() {
        let change = |src: &Path| {
            fs::write(src.join("f1"), b"changed").unwrap();
            fs::remove_file(src.join("f2")).unwrap();
            fs::write(src.join("d/y"), b"new").unwrap();
        };
        // Cut after the commit and after the first entry was moved out.
        let tmp = tempfile::tempdir().unwrap();
        let (store, live, _, new, names, plan, commit) = committed(tmp.path(), change);
        let prev = names.previous(commit.prev_ns);
        fs::create_dir(&prev).unwrap();
        fs::rename(join(&live, &plan.out[0]), join(&prev, &plan.out[0])).unwrap();
        assert!(
            finish_interrupted(&live).unwrap(),
            "a committed apply is completed"
        );
        assert_eq!(live_hash(&live), new.tree_hash().unwrap());
        assert_eq!(
            crate::apply::read_live_manifest(&live).unwrap().unwrap(),
            new
        );
        assert!(!exists(&names.patch_dir()));
        assert_eq!(fs::read(prev.join("f1")).unwrap(), b"file 1");
        assert_eq!(fs::read(prev.join("f2")).unwrap(), b"file 2");
        assert!(!finish_interrupted(&live).unwrap(), "nothing left to do");
        // The next apply trusts the completed tree: the stamps were written.
        let again = crate::apply::apply(&store, &new, &live).unwrap();
        assert!(again.unchanged);

        // Cut while staging, before the commit: the live tree is the old one, untouched.
        let tmp = tempfile::tempdir().unwrap();
        let (store, live, old, new, names, ..) = committed(tmp.path(), change);
        fs::remove_file(names.patch_dir().join("commit")).unwrap();
        assert!(!finish_interrupted(&live).unwrap());
        assert!(!exists(&names.patch_dir()));
        assert_eq!(live_hash(&live), old.tree_hash().unwrap());
        let applied = crate::apply::apply(&store, &new, &live).unwrap();
        assert!(applied.in_place);
        assert_eq!(live_hash(&live), new.tree_hash().unwrap());
    }

    #[test]
    fn a_folder_swapped_for_a_symlink_does_not_lead_the_apply_outside_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, live, _, _, _, _, _) = committed(tmp.path(), |src| {
            fs::write(src.join("d/y"), b"new").unwrap();
            fs::set_permissions(src.join("d"), fs::Permissions::from_mode(0o700)).unwrap();
        });
        // Someone on the standby replaces folder `d` with a symlink to a folder elsewhere.
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(live.join("d"), live.join("d.moved")).unwrap();
        std::os::unix::fs::symlink(&outside, live.join("d")).unwrap();
        let err = finish_interrupted(&live).unwrap_err();
        assert!(
            err.to_string().contains("without following symlinks"),
            "{err}"
        );
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing written outside"
        );
        assert_eq!(
            fs::metadata(&outside).unwrap().permissions().mode() & 0o7777,
            0o755,
            "no metadata changed outside"
        );
    }

    #[test]
    fn warming_up_reads_only_and_skips_what_it_cannot_open() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, live, old, new) = two_versions(tmp.path(), |src| {
            fs::write(src.join("d/x"), b"changed").unwrap();
            fs::remove_file(src.join("f3")).unwrap();
            fs::write(src.join("g"), b"new").unwrap();
        });
        assert!(plan(&old, &new).is_some());
        let before = live_hash(&live);
        // A folder on the way swapped for a symlink to elsewhere: skipped, never followed.
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::rename(live.join("d"), tmp.path().join("d.moved")).unwrap();
        std::os::unix::fs::symlink(&outside, live.join("d")).unwrap();
        warm(&live, &old, &new);
        fs::remove_file(live.join("d")).unwrap();
        fs::rename(tmp.path().join("d.moved"), live.join("d")).unwrap();
        // The swap above moved the root's mtime; what is compared is what warm might change.
        let root_mtime = std::time::UNIX_EPOCH
            + std::time::Duration::new(old.entries[0].mtime_sec as u64, old.entries[0].mtime_nsec);
        File::open(&live).unwrap().set_modified(root_mtime).unwrap();
        warm(&live, &old, &new);
        assert_eq!(live_hash(&live), before, "the live tree is as it was");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn a_commit_record_that_does_not_fit_stops_with_a_clear_error_and_touches_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, live, old, new, names, ..) = committed(tmp.path(), |src| {
            fs::write(src.join("f1"), b"changed").unwrap();
        });
        let commit = names.patch_dir().join("commit");
        for bad in [
            "garbage".to_string(),
            Commit {
                old: TreeHash([9; 32]),
                new: new.tree_hash().unwrap(),
                prev_ns: 1,
            }
            .encode(),
        ] {
            fs::write(&commit, &bad).unwrap();
            let err = finish_interrupted(&live).unwrap_err();
            assert!(matches!(err, VolumeError::BadTarget { .. }), "{err}");
            assert!(err.to_string().contains("move the folder away"), "{err}");
            assert_eq!(live_hash(&live), old.tree_hash().unwrap());
            let err = crate::apply::apply(&store, &new, &live).unwrap_err();
            assert!(
                matches!(err, VolumeError::BadTarget { .. }),
                "apply refuses too: {err}"
            );
        }
    }
}
