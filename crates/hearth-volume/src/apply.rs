//! Apply: build a manifest's tree beside the live copy from the chunk store, make it durable,
//! and swap it in with one `renameat2(RENAME_EXCHANGE)`, so the live path always holds one whole
//! tree. The tree it replaces is kept aside under a hidden name and only deleted later by
//! [`prune_previous`], and only when it still equals what was applied to it.
//!
//! Names used next to a live path `<parent>/<name>` (all in the same directory, so every rename
//! stays on one filesystem):
//! - `.<name>.hearth-staging`: the tree being built;
//! - `.<name>.hearth-staging.building`: present while the staging tree is a partial build of ours;
//! - `.<name>.hearth-next.manifest` / `.<name>.hearth-live.manifest`: the manifest being
//!   switched in / the manifest of the live tree;
//! - `.<name>.hearth-next.stamps` / `.<name>.hearth-live.stamps`: the identity (inode, size,
//!   mtime, ctime) of every regular file of that tree as apply left it, so the next apply can
//!   reuse the files that did not change instead of rebuilding them from chunks;
//! - `.<name>.hearth-prev.<ns>` (+ `.manifest`): a replaced tree and the manifest it was applied
//!   from, `<ns>` being nanoseconds since the epoch when it was replaced;
//! - `.<name>.hearth-incoming`: files a first sync streamed before their manifest
//!   ([`crate::incoming`]); apply moves the ones that are whole into the new tree;
//! - `.<name>.hearth-diverged.<ns>`: a replaced tree that no longer matched its manifest (changed
//!   on the standby) or whose history is unknown; never deleted by hearth;
//! - `.<name>.hearth-patch`: an in-place apply's staged files and commit record ([`crate::patch`]);
//!   `.<name>.hearth-prev.<ns>.partial` marks a `prev` tree that holds only what such an apply
//!   replaced or removed.
//!
//! When the live tree is exactly as the last apply left it and the new tree changes few of its
//! entries, [`crate::patch`] applies the change in place instead of building a whole tree: the
//! cost of a sync then follows the size of the change, not the size of the volume.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, CWD, FileType, Mode, RenameFlags, Timespec, Timestamps, UTIME_OMIT};

use crate::capture::{CaptureOptions, UnstablePolicy, capture};
use crate::error::{IoContext, VolumeError};
use crate::incoming::Incoming;
use crate::manifest::{ChunkId, Entry, EntryKind, Manifest, TreeHash};
use crate::reuse::{AppliedStamps, Attempt, FileStamp, LiveFiles, Reused, wait_until};
use crate::store::ChunkStore;
use crate::watch::LiveWatch;

/// The hidden names that belong to one live path; see the module documentation.
#[derive(Clone, Debug)]
pub struct TreeNames {
    parent: PathBuf,
    name: OsString,
}

impl TreeNames {
    /// The names for `live`, which must have a parent directory and a plain final component.
    pub fn of(live: &Path) -> Result<Self, VolumeError> {
        let bad = |reason: &str| VolumeError::BadTarget {
            path: live.to_owned(),
            reason: reason.to_owned(),
        };
        let name = live
            .file_name()
            .ok_or_else(|| bad("the path has no final component"))?;
        let parent = match live.parent() {
            Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
            Some(p) => p.to_owned(),
            None => return Err(bad("the path has no parent directory")),
        };
        Ok(TreeNames {
            parent,
            name: name.to_owned(),
        })
    }

    fn hidden(&self, suffix: &str) -> PathBuf {
        let mut n = OsString::from(".");
        n.push(&self.name);
        n.push(".hearth-");
        n.push(suffix);
        self.parent.join(n)
    }

    /// Where an in-place apply stages its files and keeps its commit record ([`crate::patch`]).
    pub fn patch_dir(&self) -> PathBuf {
        self.hidden("patch")
    }

    /// Present beside [`previous`](Self::previous) when that tree holds only the entries an
    /// in-place apply replaced or removed (it shares no inodes with the live tree).
    pub fn previous_partial_marker(&self, ns: u128) -> PathBuf {
        self.hidden(&format!("prev.{ns}.partial"))
    }

    /// The directory holding the live path and its hidden companions.
    pub(crate) fn parent_dir(&self) -> PathBuf {
        self.parent.clone()
    }

    /// The live path.
    pub fn live(&self) -> PathBuf {
        self.parent.join(&self.name)
    }
    /// Where the next tree is built.
    pub fn staging(&self) -> PathBuf {
        self.hidden("staging")
    }
    /// Where files streamed before their manifest are received.
    pub fn incoming(&self) -> PathBuf {
        self.hidden("incoming")
    }
    /// Marks the staging tree as a partial build of ours, safe to discard.
    pub fn building_marker(&self) -> PathBuf {
        self.hidden("staging.building")
    }
    /// The manifest of the live tree.
    pub fn live_manifest(&self) -> PathBuf {
        self.hidden("live.manifest")
    }
    /// The manifest about to become live.
    pub fn next_manifest(&self) -> PathBuf {
        self.hidden("next.manifest")
    }
    /// The stamps of the live tree's files (see `docs/formats/volume-tree.md`).
    pub fn live_stamps(&self) -> PathBuf {
        self.hidden("live.stamps")
    }
    /// The stamps of the tree about to become live.
    pub fn next_stamps(&self) -> PathBuf {
        self.hidden("next.stamps")
    }
    /// A replaced tree.
    pub fn previous(&self, ns: u128) -> PathBuf {
        self.hidden(&format!("prev.{ns}"))
    }
    /// A replaced tree's manifest.
    pub fn previous_manifest(&self, ns: u128) -> PathBuf {
        self.hidden(&format!("prev.{ns}.manifest"))
    }
    /// A tree kept aside because it diverged or its history is unknown.
    pub fn diverged(&self, ns: u128) -> PathBuf {
        self.hidden(&format!("diverged.{ns}"))
    }

    /// A tree kept aside by the standby when a sender's history did not include it, named with
    /// the sender's epoch and the time.
    pub fn diverged_at(&self, epoch: u64, ns: u128) -> PathBuf {
        self.hidden(&format!("diverged.e{epoch}.{ns}"))
    }

    /// The `<ns>` of every replaced tree still kept under a `prev` name.
    pub fn list_previous(&self) -> Result<Vec<u128>, VolumeError> {
        let mut prefix = b".".to_vec();
        prefix.extend_from_slice(self.name.as_bytes());
        prefix.extend_from_slice(b".hearth-prev.");
        let mut out = Vec::new();
        for item in fs::read_dir(&self.parent).ctx("listing", &self.parent)? {
            let item = item.ctx("listing", &self.parent)?;
            let name = item.file_name();
            let Some(rest) = name.as_bytes().strip_prefix(prefix.as_slice()) else {
                continue;
            };
            if let Some(ns) = std::str::from_utf8(rest).ok().and_then(|s| s.parse().ok()) {
                out.push(ns);
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyReport {
    /// The tree hash of the tree now live.
    pub tree_hash: TreeHash,
    /// The live tree was already applied from an identical manifest, so nothing was done.
    pub unchanged: bool,
    /// Where the tree it replaced was put, if there was one.
    pub previous: Option<PathBuf>,
    /// A leftover staging tree of unknown state that was moved aside (see [`TreeNames::diverged`]).
    pub set_aside: Option<PathBuf>,
    /// Whether a partial build left by an interrupted apply was discarded first.
    pub discarded_partial: bool,
    /// Regular files created in the new tree (built from chunks or reused).
    pub files: u64,
    /// Bytes of file data written from the chunk store.
    pub bytes: u64,
    /// Regular files whose data was taken from an unchanged file of the live tree (cloned or
    /// copied) instead of being built from chunks.
    pub reused: u64,
    /// How many of the [`reused`](Self::reused) files were cloned (`FICLONE`, sharing extents).
    pub cloned: u64,
    /// How many of the [`reused`](Self::reused) files were hard-linked (content and metadata
    /// unchanged, on a filesystem that cannot clone); the rest of the reused files were copied.
    pub linked: u64,
    /// Bytes of file data taken from the live tree.
    pub reused_bytes: u64,
    /// Live files (absolute paths) that were found unchanged by the check before the build but
    /// had changed by the time they were to be reused (someone wrote to the standby during the
    /// apply); the new tree got those files from chunks, and the changed copies stay in the
    /// replaced tree. Files changed before the apply make the whole live tree count as changed
    /// instead ([`ApplyReport::set_aside`]).
    pub changed_live: Vec<PathBuf>,
    /// The change was applied in place ([`crate::patch`]) instead of by building a whole tree;
    /// [`previous`](Self::previous) then holds only what it replaced or removed.
    pub in_place: bool,
    /// The live tree was walked to check that it is as applied; `false` when a [`LiveWatch`]
    /// vouched for it (or there was no live tree).
    pub walked_live: bool,
    /// [`apply_and_prune`] left pruning to its caller: only kept trees of in-place applies were
    /// due, which share no inodes with the live tree, so `prune_previous(live, keep)` may run once
    /// the apply has been acknowledged.
    pub prune_later: bool,
    /// The files a first sync received before the manifest became the new tree whole, with one
    /// rename ([`Incoming::fits`]), instead of being moved into it one by one.
    pub received_whole: bool,
}

impl ApplyReport {
    /// The report of an apply of the tree `tree_hash` that has done nothing yet.
    pub(crate) fn nothing_yet(tree_hash: TreeHash) -> Self {
        ApplyReport {
            tree_hash,
            unchanged: false,
            previous: None,
            set_aside: None,
            discarded_partial: false,
            files: 0,
            bytes: 0,
            reused: 0,
            cloned: 0,
            linked: 0,
            reused_bytes: 0,
            changed_live: Vec::new(),
            in_place: false,
            walked_live: false,
            prune_later: false,
            received_whole: false,
        }
    }
}

pub(crate) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), VolumeError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("syncing directory", dir)
}

pub(crate) fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Makes the tree at `live` equal to `manifest`, reading file contents from `store`.
///
/// When the live tree was applied from a manifest with the same tree hash, nothing is done
/// ([`ApplyReport::unchanged`]). Otherwise every chunk must be in the store (checked before
/// anything is touched). The tree is built
/// under [`TreeNames::staging`], flushed with `syncfs`, and swapped with the live tree in one
/// atomic exchange; the old tree goes to [`TreeNames::previous`]. If this is interrupted at any
/// point the live path holds either the old or the new tree, whole, and the next call picks up
/// (discarding a partial build, which costs only local copying since the chunks stay stored).
pub fn apply(
    store: &ChunkStore,
    manifest: &Manifest,
    live: &Path,
) -> Result<ApplyReport, VolumeError> {
    apply_inner(store, manifest, live, None, None, None, true, None).map(|(report, _)| report)
}

/// [`apply`] without the in-place path: always builds the whole tree beside the live one and
/// swaps, so that the replaced tree is kept whole.
pub fn apply_whole(
    store: &ChunkStore,
    manifest: &Manifest,
    live: &Path,
) -> Result<ApplyReport, VolumeError> {
    apply_inner(store, manifest, live, None, None, None, false, None).map(|(report, _)| report)
}

/// [`apply`], and [`prune_previous`] so that `keep` replaced trees remain once the new tree is
/// live. Pruning happens before the new tree's stamps are taken: deleting an old tree unlinks
/// inodes it shares with the live tree (hard links on filesystems without clones), which moves
/// their ctimes; done later, the next apply would have to read those files again to trust them.
///
/// Files in `incoming` that hold exactly an entry's chunks are moved into the new tree, and its
/// other verified chunks are read from there like chunks of the store. With `in_place` false
/// the change is never applied in place ([`apply_whole`]).
///
/// `watch` holds the [`LiveWatch`] the previous apply left for this tree, if any: when it saw
/// nothing since, the live tree is trusted without walking it. On success it holds the watch of
/// the tree now live (or nothing, if watching failed); on failure it is left empty.
#[allow(clippy::too_many_arguments)]
pub fn apply_and_prune(
    store: &ChunkStore,
    manifest: &Manifest,
    live: &Path,
    keep: usize,
    keep_live_aside: Option<SetAside>,
    incoming: Option<&mut Incoming>,
    in_place: bool,
    watch: Option<&mut Option<LiveWatch>>,
) -> Result<(ApplyReport, PruneReport), VolumeError> {
    apply_inner(
        store,
        manifest,
        live,
        Some(keep),
        keep_live_aside,
        incoming,
        in_place,
        watch,
    )
}

/// Why the live tree must be kept aside at the switch even if it is unchanged (the standby
/// decided it is not part of the sender's history), and the sender's epoch for its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetAside {
    /// The sender's epoch: the kept tree is named `.<name>.hearth-diverged.e<epoch>.<ns>`.
    pub epoch: u64,
    /// Why, for the log.
    pub reason: String,
}

#[allow(clippy::too_many_arguments)]
fn apply_inner(
    store: &ChunkStore,
    manifest: &Manifest,
    live: &Path,
    keep: Option<usize>,
    keep_live_aside: Option<SetAside>,
    incoming: Option<&mut Incoming>,
    in_place: bool,
    mut watch: Option<&mut Option<LiveWatch>>,
) -> Result<(ApplyReport, PruneReport), VolumeError> {
    manifest.validate()?;
    let names = TreeNames::of(live)?;
    let live = names.live();
    match fs::symlink_metadata(&live) {
        Ok(md) if !md.is_dir() => {
            return Err(VolumeError::BadTarget {
                path: live,
                reason: "exists and is not a directory".into(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(VolumeError::io("inspecting", live, e)),
    }
    // An in-place apply a crash interrupted is completed first: until then the live manifest
    // does not say what the live tree holds.
    crate::patch::finish_interrupted(&live)?;
    let staging = names.staging();
    let marker = names.building_marker();
    // One encoding serves the tree hash and the manifest file written for the new tree.
    let (encoded, tree_hash) = manifest.encode_and_hash()?;
    let mut report = ApplyReport::nothing_yet(tree_hash);
    // The same tree again (a sync with no change on the primary): rebuilding would rewrite the
    // whole volume for nothing. Whether the standby changed its copy locally is `verify`'s and
    // `prune_previous`'s business, not a reason to rewrite it here.
    // A watch that saw the tree changed by someone else says the manifest no longer describes it:
    // then the same tree is applied again (the changed one is kept aside).
    let seen_change = watch
        .as_deref_mut()
        .and_then(Option::as_mut)
        .is_some_and(LiveWatch::seen_change);
    if exists(&live)
        && !exists(&staging)
        && !seen_change
        && let Ok(Some((_, current))) = read_live_manifest_hashed(&live)
        && current == report.tree_hash
    {
        report.unchanged = true;
        return Ok((report, PruneReport::default()));
    }
    // From here on the slot is empty unless this apply succeeds and leaves a watch in it.
    let (mut prior, slot) = match watch {
        Some(slot) => (slot.take(), Some(slot)),
        None => (None, None),
    };
    if exists(&staging) {
        if exists(&marker) {
            // Our own partial build: nothing in it exists anywhere else only there.
            fs::remove_dir_all(&staging).ctx("removing partial build", &staging)?;
            report.discarded_partial = true;
        } else {
            // A finished build that was never switched in, or the old live tree after an
            // exchange whose clean-up was interrupted. It might be the only copy of data the
            // standby had, so it is kept.
            let aside = names.diverged(now_ns());
            fs::rename(&staging, &aside).ctx("moving aside", &staging)?;
            tracing::warn!(path = %aside.display(), "kept a leftover tree of unknown state aside");
            report.set_aside = Some(aside);
        }
    }
    // Whether the live tree is exactly as the last apply left it decides where it goes after the
    // switch (a `prev` tree, or kept aside as diverged) and whether its files may be linked. It is
    // checked now, before linking changes the shared inodes' ctimes.
    let mut phases = Phases::start();
    let LiveState {
        files: live_files,
        check: live_clean,
        manifest: live_manifest,
        stamps: live_stamps,
        walked,
        only,
    } = reusable_files(&names, prior.as_mut(), manifest)?;
    report.walked_live = walked;
    // A tree from another history is kept aside like a changed one: at the switch, so the live
    // path is never empty, and without hard links into it.
    let (live_files, live_clean) = match &keep_live_aside {
        Some(aside) if exists(&live) => (
            live_files.map(LiveFiles::without_links),
            LiveCheck::Changed(aside.reason.clone()),
        ),
        _ => (live_files, live_clean),
    };
    let patch_plan = match &live_manifest {
        Some((old, _))
            if in_place
                && keep_live_aside.is_none()
                && live_clean == LiveCheck::Clean
                && incoming.as_ref().is_none_or(|i| !i.exists()) =>
        {
            crate::patch::plan(old, manifest)
        }
        _ => None,
    };
    // An index of the live files made for an in-place apply's few files does not serve a build
    // of the whole tree.
    let mut live_files = live_files;
    if patch_plan.is_none()
        && only.is_some()
        && let (Some((old, _)), Some(st)) = (&live_manifest, &live_stamps)
    {
        let full = LiveFiles::new_for(&live, old, st.tree_hash(), st, None)?;
        // As above: no hard links into a tree that is kept aside.
        live_files = Some(match live_clean {
            LiveCheck::Clean => full,
            LiveCheck::Changed(_) => full.without_links(),
        });
    }
    let needed = match (&patch_plan, &only) {
        (Some(_), Some(only)) => only,
        _ => manifest,
    };
    // Every chunk must come from the store or from a live file that holds it (checked now, before
    // anything is built; each is verified again when it is read).
    let missing: Vec<_> = store
        .missing(needed)
        .into_iter()
        .filter(|id| !live_files.as_ref().is_some_and(|l| l.has_chunk(id)))
        .filter(|id| !incoming.as_ref().is_some_and(|i| i.has_chunk(id)))
        .collect();
    if !missing.is_empty() {
        // Nothing was touched: the watch goes back as it was (the caller asks for the chunks and
        // applies again, and what the watch saw still counts then).
        if let Some(slot) = slot {
            *slot = prior;
        }
        return Err(VolumeError::MissingChunks { ids: missing });
    }
    // A small change to a tree that is exactly as applied goes in place.
    if let (Some(plan), Some((old, old_hash))) = (patch_plan, &live_manifest) {
        phases.mark("check live");
        // The watch that vouched for the tree goes on watching it through the change; after a
        // walk, a new one starts now, before anything else can change it unnoticed.
        let mut watch = match prior.take().filter(|_| !walked) {
            Some(w) => Some(w),
            None if slot.is_some() => start_watch(&live, old, *old_hash),
            None => None,
        };
        // No hard links from live files: the file linked stays in the tree (unless the change
        // also moves it out), and two names of one inode are a hard link the manifest does not
        // have, which the next check would take for a change on the standby. Data is cloned or
        // copied instead.
        let live_files = live_files.map(LiveFiles::without_links);
        let pruned = crate::patch::apply_in_place(
            store,
            &names,
            (old, *old_hash),
            (manifest, &encoded),
            &plan,
            live_files.as_ref(),
            live_stamps.as_ref(),
            keep,
            &mut report,
            &mut phases,
            watch.as_mut(),
        )?;
        if let Some(slot) = slot {
            *slot = watch;
        }
        tracing::debug!(phases = %phases, entries = plan.size(), "applied in place");
        return Ok((report, pruned));
    }
    // Files received before the manifest (a first sync) that are exactly the new tree's become
    // it whole, with one rename: moving 100,000 of them one by one took a second.
    let mut incoming = incoming;
    let over_received = incoming.as_deref().is_some_and(|i| i.fits(manifest));
    report.received_whole = over_received;
    File::create(&marker).ctx("creating", &marker)?;
    match incoming.as_deref_mut() {
        Some(inc) if over_received => inc.move_to(&staging)?,
        _ => fs::create_dir(&staging).ctx("creating", &staging)?,
    }
    sync_dir(&names.parent)?;

    phases.mark("check live");
    build(
        store,
        manifest,
        &staging,
        live_files.as_ref(),
        incoming,
        over_received,
        &mut report,
    )?;
    report.changed_live.sort();
    report.changed_live.dedup();
    // Stamps are taken after the whole tree is built, because creating a hard link or setting
    // metadata changes a file's ctime.
    phases.mark("build");
    let pruned = match keep {
        // The live tree becomes a replaced tree at the switch: keep one fewer now.
        Some(keep) => prune_previous(&live, keep.saturating_sub(1))?,
        None => PruneReport::default(),
    };
    phases.mark("prune");
    // The new tree is watched from before its stamps are taken; the old one's watch goes.
    drop(prior);
    let mut watch = match slot.is_some() {
        true => start_watch(&staging, manifest, report.tree_hash),
        false => None,
    };
    let mut stamps = Vec::new();
    for entry in &manifest.entries {
        if let EntryKind::File { .. } = entry.kind {
            let path = join(&staging, &entry.path);
            let md = fs::symlink_metadata(&path).ctx("inspecting", &path)?;
            stamps.push((entry.path.clone(), FileStamp::of(&md)));
        }
    }
    let stamps = AppliedStamps::new(report.tree_hash, stamps);
    let staging_dir = File::open(&staging).ctx("opening", &staging)?;
    // One syncfs instead of an fsync per file: it flushes every file and directory of the
    // staging tree (and whatever else is dirty on that filesystem) at a fraction of the cost.
    phases.mark("stamps");
    rustix::fs::syncfs(&staging_dir).ctx("syncing", &staging)?;
    drop(staging_dir);

    let next = names.next_manifest();
    {
        let mut f = File::create(&next).ctx("creating", &next)?;
        std::io::Write::write_all(&mut f, &encoded).ctx("writing", &next)?;
        f.sync_all().ctx("syncing", &next)?;
    }
    let next_stamps = names.next_stamps();
    {
        let mut f = File::create(&next_stamps).ctx("creating", &next_stamps)?;
        std::io::Write::write_all(&mut f, &stamps.encode()?).ctx("writing", &next_stamps)?;
        f.sync_all().ctx("syncing", &next_stamps)?;
    }
    fs::remove_file(&marker).ctx("removing", &marker)?;
    sync_dir(&names.parent)?;
    // A change to a live file after the switch must get a ctime other than the recorded one,
    // or the next apply could reuse a changed file; see `reuse::CTIME_MARGIN`.
    phases.mark("sync");
    wait_until(stamps.switch_not_before());

    if exists(&live) {
        rustix::fs::renameat_with(CWD, &staging, CWD, &live, RenameFlags::EXCHANGE)
            .ctx("exchanging the new tree with", &live)?;
        let ns = now_ns();
        let live_manifest = names.live_manifest();
        match &live_clean {
            LiveCheck::Clean => {
                let prev = names.previous(ns);
                fs::rename(&staging, &prev).ctx("moving the old tree to", &prev)?;
                if exists(&live_manifest) {
                    fs::rename(&live_manifest, names.previous_manifest(ns))
                        .ctx("moving aside", &live_manifest)?;
                }
                report.previous = Some(prev);
            }
            LiveCheck::Changed(reason) => {
                // Data the primary never had: kept under a name pruning never deletes, with its
                // top directory read-only so nothing is added to it by mistake.
                let aside = match &keep_live_aside {
                    Some(a) => names.diverged_at(a.epoch, ns),
                    None => names.diverged(ns),
                };
                fs::rename(&staging, &aside).ctx("moving the old tree to", &aside)?;
                let mode = fs::symlink_metadata(&aside)
                    .ctx("inspecting", &aside)?
                    .mode();
                fs::set_permissions(&aside, fs::Permissions::from_mode(mode & 0o7555))
                    .ctx("making read-only", &aside)?;
                if exists(&live_manifest) {
                    let mut to = aside.clone().into_os_string();
                    to.push(".manifest");
                    fs::rename(&live_manifest, &to).ctx("moving aside", &live_manifest)?;
                }
                tracing::warn!(path = %aside.display(), %reason, "the replaced tree had changed on the standby; kept aside");
                report.set_aside = Some(aside);
            }
        }
    } else {
        rustix::fs::renameat_with(CWD, &staging, CWD, &live, RenameFlags::NOREPLACE)
            .ctx("moving the new tree to", &live)?;
    }
    fs::rename(&next, names.live_manifest()).ctx("renaming", &next)?;
    // Until this rename the live stamps are the old tree's; they name the old tree hash, so
    // they are never used with the new manifest even if a crash stops us here.
    fs::rename(&next_stamps, names.live_stamps()).ctx("renaming", &next_stamps)?;
    sync_dir(&names.parent)?;
    phases.mark("switch");
    tracing::debug!(phases = %phases, "applied");
    if let Some(w) = watch.as_mut() {
        // The exchange moved the watched root itself; anything else is someone else's doing.
        w.drain(&std::collections::HashSet::from([&b""[..]]));
    }
    if let Some(slot) = slot {
        *slot = watch;
    }
    Ok((report, pruned))
}

/// How long each phase of an apply took, for the debug log.
pub(crate) struct Phases {
    last: std::time::Instant,
    done: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    pub(crate) fn start() -> Self {
        Phases {
            last: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    pub(crate) fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((name, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, d)) in self.done.iter().enumerate() {
            write!(
                f,
                "{}{name} {} ms",
                if i > 0 { ", " } else { "" },
                d.as_millis()
            )?;
        }
        Ok(())
    }
}

/// Starts watching the tree at `root` applied from `manifest` (tree hash `tree`); `None` (logged)
/// when it cannot.
fn start_watch(root: &Path, manifest: &Manifest, tree: TreeHash) -> Option<LiveWatch> {
    match LiveWatch::start(root, manifest, tree) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::info!(path = %root.display(), error = %e, "cannot watch the live tree; the next apply walks it to check it");
            None
        }
    }
}

/// What the check of the live tree found.
struct LiveState {
    /// Its files that may be reused.
    files: Option<LiveFiles>,
    /// Whether it is exactly as the last apply left it.
    check: LiveCheck,
    /// The manifest it was applied from, with its tree hash.
    manifest: Option<(Arc<Manifest>, TreeHash)>,
    /// Its files' stamps as the check saw them (valid for the unchanged files of a clean tree).
    stamps: Option<AppliedStamps>,
    /// Whether the tree was walked to check it (rather than trusted by a watch).
    walked: bool,
    /// When `files` indexes only the live files an in-place apply may take data from: the new
    /// tree's regular files that are new or changed at their path (the ones it builds).
    only: Option<Manifest>,
}

/// Whether the live tree is exactly as the last apply left it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LiveCheck {
    /// Yes (or there is no live tree).
    Clean,
    /// No, or it cannot be told; the reason.
    Changed(String),
}

/// The live tree's files that apply may reuse, and whether the live tree is unchanged since the
/// last apply. The check captures the live tree with a cache made from the recorded stamps, so
/// only files changed since apply are read, and compares tree hashes: anything that differs (a
/// file, a directory's mode, an entry added or removed) makes the tree changed. Without usable
/// stamps every file is read. A tree that changed gives nothing to reuse.
fn reusable_files(
    names: &TreeNames,
    watch: Option<&mut LiveWatch>,
    new: &Manifest,
) -> Result<LiveState, VolumeError> {
    let state = |files, check, manifest, stamps| LiveState {
        files,
        check,
        manifest,
        stamps,
        walked: true,
        only: None,
    };
    let live = names.live();
    if !exists(&live) {
        return Ok(LiveState {
            walked: false,
            ..state(None, LiveCheck::Clean, None, None)
        });
    }
    let Ok(Some((manifest, hash))) = read_live_manifest_hashed(&live) else {
        return Ok(state(
            None,
            LiveCheck::Changed("the tree has no manifest (not written by hearth)".into()),
            None,
            None,
        ));
    };
    let path = names.live_stamps();
    let stamps = match fs::read(&path) {
        Ok(bytes) => AppliedStamps::decode(&bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(VolumeError::io("reading", path, e)),
    };
    // A watch that saw nothing but apply's own changes since this tree was applied vouches for
    // it, together with its stamps: no walk.
    if let (Some(w), Some(st)) = (watch, &stamps) {
        match w.trusts(&live, hash) {
            Ok(()) if st.tree_hash() == hash => {
                let (files, only) = index_live(&live, &manifest, hash, st, new)?;
                return Ok(LiveState {
                    files: Some(files),
                    check: LiveCheck::Clean,
                    manifest: Some((manifest, hash)),
                    stamps,
                    walked: false,
                    only,
                });
            }
            Ok(()) => {}
            Err(why) => {
                tracing::debug!(path = %live.display(), %why, "the watch does not vouch for the live tree; walking it");
            }
        }
    }
    let cache = match &stamps {
        Some(st) => crate::reuse::cache_for(&manifest, st)?,
        None => None,
    };
    let opts = CaptureOptions {
        chunking: manifest.chunking,
        max_retries: 0,
        unstable: UnstablePolicy::Fail,
        allow_devices: true,
        ignore_device: false,
    };
    let now = match capture(&live, &opts, cache.as_ref()) {
        Ok(now) => now,
        Err(e) => {
            return Ok(state(
                None,
                LiveCheck::Changed(format!("could not be read whole: {e}")),
                Some((manifest, hash)),
                None,
            ));
        }
    };
    let now_hash = now.manifest.tree_hash()?;
    if stamps.is_none() {
        tracing::info!(path = %path.display(), "no usable stamps for the live tree; it was read whole to check it");
    }
    // Reuse goes by what this capture saw: the tree as it is now, each file with the identity it
    // has now. A file whose ctime moved without a change of content (our own links and unlinks
    // of shared inodes move it) was read again above and proved unchanged, so it stays reusable.
    let current = AppliedStamps::from_capture(now_hash, &now.cache);
    if now_hash == hash {
        let (files, only) = index_live(&live, &manifest, hash, &current, new)?;
        Ok(LiveState {
            only,
            ..state(
                Some(files),
                LiveCheck::Clean,
                Some((manifest, hash)),
                Some(current),
            )
        })
    } else {
        let files = LiveFiles::new_for(&live, &now.manifest, now_hash, &current, None)?;
        // Unchanged files of a changed tree may still be cloned or copied (each is checked
        // again when it is taken), but not hard-linked: the tree is kept aside as diverged and
        // must not share inodes with the new live tree.
        Ok(state(
            Some(files.without_links()),
            LiveCheck::Changed(format!(
                "changed on the standby since it was applied ({} file(s) read again)",
                now.report.files_read
            )),
            Some((manifest, hash)),
            None,
        ))
    }
}

/// The index of the live files of a clean tree (applied from `manifest`, with hash `hash` and
/// stamps `stamps`) for applying `new`. A small change (at most half of the entries new or changed
/// regular files) gets an index of only the live files that share chunks with the files it
/// builds, and those files as a manifest of their own; anything else an index of every file.
fn index_live(
    live: &Path,
    manifest: &Manifest,
    hash: TreeHash,
    stamps: &AppliedStamps,
    new: &Manifest,
) -> Result<(LiveFiles, Option<Manifest>), VolumeError> {
    let changed = crate::patch::changed_files(manifest, new);
    if changed.len() * 2 > new.entries.len() {
        return Ok((
            LiveFiles::new_for(live, manifest, hash, stamps, None)?,
            None,
        ));
    }
    let wanted: HashSet<ChunkId> = changed
        .iter()
        .flat_map(|e| match &e.kind {
            EntryKind::File { chunks, .. } => chunks.as_slice(),
            _ => &[],
        })
        .map(|c| c.id)
        .collect();
    let only = Manifest {
        chunking: new.chunking,
        entries: changed.into_iter().cloned().collect(),
    };
    let files = LiveFiles::new_for(live, manifest, hash, stamps, Some(&wanted))?;
    Ok((files, Some(only)))
}

/// The manifest of the tree last applied at `live`, if any.
pub fn read_live_manifest(live: &Path) -> Result<Option<Manifest>, VolumeError> {
    Ok(read_live_manifest_hashed(live)?.map(|(m, _)| Manifest::clone(&m)))
}

/// What identifies one version of a live manifest file: it is only ever replaced by a rename
/// (a new inode), and any write in place moves its ctime.
type FileIdentity = (u64, u64, u64, i64, i64, i64, i64);

/// Live manifests already decoded, by live path, each with the identity of the file it was
/// decoded from. A standby reads its live manifest several times per sync (to tell the primary
/// what it holds, to work out wanted chunks, to decide between replace and keep aside, to check
/// the tree); for 100,000 files each decode costs about a tenth of a second.
type LiveManifests = HashMap<PathBuf, (FileIdentity, Arc<Manifest>, TreeHash)>;
static LIVE_MANIFESTS: std::sync::LazyLock<Mutex<LiveManifests>> =
    std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));

/// Volumes a process serves are few; tests make many. Past this the cache starts over.
const LIVE_MANIFESTS_MAX: usize = 64;

/// [`read_live_manifest`] without a copy, with its tree hash.
pub fn read_live_manifest_hashed(
    live: &Path,
) -> Result<Option<(Arc<Manifest>, TreeHash)>, VolumeError> {
    let path = TreeNames::of(live)?.live_manifest();
    // A manifest beside a live directory that is gone (deleted by hand, or by `nomad volume
    // delete`) describes nothing: the tree must be sent again, not reported as in sync.
    match fs::symlink_metadata(live) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if path.exists() {
                tracing::warn!(live = %live.display(), "the live directory is gone; its manifest no longer counts");
            }
            return Ok(None);
        }
        Err(e) => return Err(VolumeError::io("inspecting", live, e)),
    }
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VolumeError::io("reading", path, e)),
    };
    let md = file.metadata().ctx("inspecting", &path)?;
    let id = identity(&md);
    if let Ok(cache) = LIVE_MANIFESTS.lock()
        && let Some((known, m, hash)) = cache.get(&path)
        && *known == id
    {
        return Ok(Some((m.clone(), *hash)));
    }
    let mut bytes = Vec::with_capacity(md.size() as usize);
    std::io::Read::read_to_end(&mut file, &mut bytes).ctx("reading", &path)?;
    let (m, hash) = Manifest::decode_hashed(&bytes)?;
    let m = Arc::new(m);
    cache_live_manifest(path, id, m.clone(), hash);
    Ok(Some((m, hash)))
}

fn identity(md: &fs::Metadata) -> FileIdentity {
    (
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec(),
    )
}

fn cache_live_manifest(path: PathBuf, id: FileIdentity, m: Arc<Manifest>, hash: TreeHash) {
    if let Ok(mut cache) = LIVE_MANIFESTS.lock() {
        if cache.len() >= LIVE_MANIFESTS_MAX {
            cache.clear();
        }
        cache.insert(path, (id, m, hash));
    }
}

/// Tells the cache of live manifests that the manifest `m` (with tree hash `hash`) was just made
/// live at `live` by this process, so that the next sync does not read and decode it again (a
/// tenth of a second for 100,000 files). The file on disk is only taken for it when its trailer,
/// the BLAKE3 of its body, is that tree hash; anything else leaves the cache to decode it.
pub fn remember_live_manifest(live: &Path, m: Arc<Manifest>, hash: TreeHash) {
    let Ok(path) = TreeNames::of(live).map(|n| n.live_manifest()) else {
        return;
    };
    let Ok(file) = File::open(&path) else { return };
    let mut trailer = [0u8; 32];
    if let Ok(md) = file.metadata()
        && md.size() >= 32
        && file.read_exact_at(&mut trailer, md.size() - 32).is_ok()
        && trailer == hash.0
    {
        cache_live_manifest(path, identity(&md), m, hash);
    }
}

pub(crate) fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_owned()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

pub(crate) fn times(entry: &Entry) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: entry.mtime_sec,
            tv_nsec: i64::from(entry.mtime_nsec) as _,
        },
    }
}

/// Owner, mode and xattrs by path, for everything but regular files (which use their
/// descriptor) and symlinks (which have no mode of their own).
pub(crate) fn set_path_meta(path: &Path, entry: &Entry, symlink: bool) -> Result<(), VolumeError> {
    std::os::unix::fs::lchown(path, Some(entry.uid), Some(entry.gid))
        .ctx("changing owner of", path)?;
    if !symlink {
        // After chown, which clears set-uid and set-gid bits.
        fs::set_permissions(path, fs::Permissions::from_mode(entry.mode))
            .ctx("changing mode of", path)?;
    }
    for x in &entry.xattrs {
        xattr::set(path, OsStr::from_bytes(&x.name), &x.value).ctx("setting xattr on", path)?;
    }
    set_times(path, entry)
}

/// Sets `entry`'s mtime on `path` (not following a symlink there).
pub(crate) fn set_times(path: &Path, entry: &Entry) -> Result<(), VolumeError> {
    rustix::fs::utimensat(CWD, path, &times(entry), AtFlags::SYMLINK_NOFOLLOW)
        .ctx("setting times of", path)
}

/// Threads that build regular files at once. Apply is mostly waiting on the filesystem (links,
/// creates, metadata, reads of cold inodes), which overlaps well even on two cores.
const BUILD_THREADS: usize = 4;

/// What building the regular files did, per thread, added to the report at the end.
#[derive(Default)]
struct Tally {
    files: u64,
    bytes: u64,
    reused: u64,
    cloned: u64,
    linked: u64,
    reused_bytes: u64,
    changed_live: Vec<PathBuf>,
}

fn build(
    store: &ChunkStore,
    manifest: &Manifest,
    staging: &Path,
    live_files: Option<&LiveFiles>,
    incoming: Option<&mut Incoming>,
    over_received: bool,
    report: &mut ApplyReport,
) -> Result<(), VolumeError> {
    // Directories first, in order (parents before children); their metadata comes last, deepest
    // first, so creating their children does not disturb their mtimes. Built over the received
    // files ([`Incoming::fits`]), the folders they needed are there already.
    let mut dirs: Vec<&Entry> = Vec::new();
    let mut files: Vec<(&Entry, PathBuf)> = Vec::new();
    for entry in &manifest.entries {
        match &entry.kind {
            EntryKind::Dir => {
                if !entry.path.is_empty() {
                    let path = join(staging, &entry.path);
                    match fs::create_dir(&path) {
                        Err(e)
                            if over_received && e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        r => r.ctx("creating directory", &path)?,
                    }
                }
                dirs.push(entry);
            }
            EntryKind::File { .. } => files.push((entry, join(staging, &entry.path))),
            _ => {}
        }
    }
    build_regular(store, &files, staging, live_files, incoming, report)?;
    // Everything else in manifest order: hard links after the files they name.
    for entry in &manifest.entries {
        let path = join(staging, &entry.path);
        match &entry.kind {
            EntryKind::Dir | EntryKind::File { .. } => {}
            EntryKind::HardLink { target } => {
                let original = join(staging, target);
                fs::hard_link(&original, &path).ctx("creating hard link", &path)?;
            }
            _ => create_special(&path, entry)?,
        }
    }
    for entry in dirs.iter().rev() {
        set_path_meta(&join(staging, &entry.path), entry, false)?;
    }
    Ok(())
}

/// Creates a symlink, fifo or device node at `path` with `entry`'s metadata.
pub(crate) fn create_special(path: &Path, entry: &Entry) -> Result<(), VolumeError> {
    match &entry.kind {
        EntryKind::Symlink { target } => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), path)
                .ctx("creating symlink", path)?;
            set_path_meta(path, entry, true)
        }
        EntryKind::Fifo | EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => {
            let (ft, rdev) = match entry.kind {
                EntryKind::CharDevice { rdev } => (FileType::CharacterDevice, rdev),
                EntryKind::BlockDevice { rdev } => (FileType::BlockDevice, rdev),
                _ => (FileType::Fifo, 0),
            };
            rustix::fs::mknodat(CWD, path, ft, Mode::from_raw_mode(entry.mode), rdev)
                .ctx("creating special file", path)?;
            set_path_meta(path, entry, false)
        }
        EntryKind::Dir | EntryKind::File { .. } | EntryKind::HardLink { .. } => {
            Err(VolumeError::InvalidManifest(format!(
                "{} is not a symlink or special file",
                String::from_utf8_lossy(&entry.path)
            )))
        }
    }
}

/// Builds the regular files `files` (each entry with the path to create it at) on several
/// threads; `root` names the tree in errors.
pub(crate) fn build_regular(
    store: &ChunkStore,
    files: &[(&Entry, PathBuf)],
    root: &Path,
    live_files: Option<&LiveFiles>,
    incoming: Option<&mut Incoming>,
    report: &mut ApplyReport,
) -> Result<(), VolumeError> {
    if let Some(l) = live_files {
        l.probe_clone(root);
    }
    let incoming = incoming.map(std::sync::Mutex::new);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<Result<Tally, VolumeError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..BUILD_THREADS.min(files.len().max(1)))
            .map(|_| {
                scope.spawn(|| {
                    let mut tally = Tally::default();
                    loop {
                        if failed.load(std::sync::atomic::Ordering::Relaxed) {
                            return Ok(tally);
                        }
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((entry, path)) = files.get(i) else {
                            return Ok(tally);
                        };
                        if let Err(e) = build_file(
                            store,
                            root,
                            entry,
                            path,
                            live_files,
                            incoming.as_ref(),
                            &mut tally,
                        ) {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(VolumeError::io(
                        "building",
                        root,
                        std::io::Error::other("a build thread panicked"),
                    ))
                })
            })
            .collect()
    });
    for r in results {
        let t = r?;
        report.files += t.files;
        report.bytes += t.bytes;
        report.reused += t.reused;
        report.cloned += t.cloned;
        report.linked += t.linked;
        report.reused_bytes += t.reused_bytes;
        report.changed_live.extend(t.changed_live);
    }
    Ok(())
}

/// The received files, for one build thread at a time.
fn locked<'a, 'b>(
    m: &'a std::sync::Mutex<&'b mut Incoming>,
    staging: &Path,
) -> Result<std::sync::MutexGuard<'a, &'b mut Incoming>, VolumeError> {
    m.lock().map_err(|_| {
        VolumeError::io(
            "building",
            staging,
            std::io::Error::other("a build thread panicked"),
        )
    })
}

/// Builds one regular file of the new tree at `path` (under `staging`, which names the tree in
/// errors): moved in whole from the received files, linked or copied from an unchanged live file,
/// or written from chunks.
fn build_file(
    store: &ChunkStore,
    staging: &Path,
    entry: &Entry,
    path: &Path,
    live_files: Option<&LiveFiles>,
    incoming: Option<&std::sync::Mutex<&mut Incoming>>,
    report: &mut Tally,
) -> Result<(), VolumeError> {
    let EntryKind::File { size, chunks } = &entry.kind else {
        return Ok(());
    };
    let lock = |m| locked(m, staging);
    // A file received whole before its manifest is moved in, not copied (or is in place already,
    // when the received files became the new tree whole).
    let claimed = match incoming {
        Some(m) => lock(m)?.claim(&entry.path, chunks),
        None => None,
    };
    let received = claimed.is_some();
    if let (Some(from), Some(m)) = (claimed, incoming) {
        if from != path {
            rustix::fs::renameat_with(CWD, &from, CWD, path, RenameFlags::NOREPLACE)
                .ctx("moving a received file to", path)?;
            lock(m)?.relocate(&entry.path, path);
        }
        report.bytes += chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
    } else if let Some(l) = live_files.filter(|l| l.prefers_links()) {
        match l.link(entry, *size, chunks, path)? {
            Attempt::Done(_) => {
                // Content and metadata are the live file's: nothing else to set.
                report.files += 1;
                report.reused += 1;
                report.linked += 1;
                report.reused_bytes += chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
                return Ok(());
            }
            Attempt::Changed(live_path) => {
                tracing::warn!(path = %live_path.display(), "a live file changed on the standby; building it from chunks, the changed copy stays in the replaced tree");
                report.changed_live.push(live_path);
            }
            Attempt::NoCandidate => {}
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(!received)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .ctx("creating", path)?;
    // An unchanged file of the live tree is cloned or copied rather than rebuilt.
    let attempt = match live_files {
        _ if received => None,
        Some(l) => Some(l.fill(*size, chunks, &file)?),
        None => Some(Attempt::NoCandidate),
    };
    match attempt {
        None => {}
        Some(Attempt::Done(how)) => {
            report.reused += 1;
            report.cloned += u64::from(how == Reused::Cloned);
            report.reused_bytes += chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
        }
        Some(attempt @ (Attempt::NoCandidate | Attempt::Changed(_))) => {
            if let Attempt::Changed(live_path) = attempt {
                tracing::warn!(path = %live_path.display(), "a live file changed on the standby; building it from chunks, the changed copy stays in the replaced tree");
                report.changed_live.push(live_path);
            }
            for chunk in chunks {
                let data = match store.get(&chunk.id) {
                    Ok(d) => d,
                    // Not stored (the store keeps no chunks between syncs) or damaged: an
                    // unchanged live file, or a received file, may hold it.
                    Err(
                        e @ (VolumeError::MissingChunks { .. } | VolumeError::ChunkMismatch { .. }),
                    ) => {
                        let from_live = live_files.and_then(|l| l.read_chunk(&chunk.id));
                        let found = match (from_live, incoming) {
                            (Some(d), _) => Some(d),
                            (None, Some(m)) => lock(m)?.read_chunk(&chunk.id),
                            (None, None) => None,
                        };
                        match found {
                            Some(d) => d,
                            None => return Err(e),
                        }
                    }
                    Err(e) => return Err(e),
                };
                file.write_all_at(&data, chunk.offset)
                    .ctx("writing", path)?;
                report.bytes += data.len() as u64;
            }
        }
    }
    // Every metadata change is a journal transaction on most filesystems, so the ones that would
    // change nothing (a clone already has the size, a new file usually already has the wanted
    // owner and mode) are skipped.
    let md = file.metadata().ctx("inspecting", path)?;
    if md.len() != *size {
        // Extending the length leaves every range no chunk covered as a hole.
        file.set_len(*size).ctx("sizing", path)?;
    }
    if (md.uid(), md.gid()) != (entry.uid, entry.gid) {
        std::os::unix::fs::fchown(&file, Some(entry.uid), Some(entry.gid))
            .ctx("changing owner of", path)?;
    }
    // After chown, which clears set-uid and set-gid bits; a new file has none, so when chown was
    // skipped the mode read above is still the file's.
    if md.uid() != entry.uid || md.gid() != entry.gid || md.mode() & 0o7777 != entry.mode {
        file.set_permissions(fs::Permissions::from_mode(entry.mode))
            .ctx("changing mode of", path)?;
    }
    for x in &entry.xattrs {
        xattr::FileExt::set_xattr(&file, OsStr::from_bytes(&x.name), &x.value)
            .ctx("setting xattr on", path)?;
    }
    rustix::fs::futimens(&file, &times(entry)).ctx("setting times of", path)?;
    report.files += 1;
    Ok(())
}

/// Whether the tree at `root` has exactly the entries of `manifest`, each of the same kind, size
/// (regular files), symlink target, mode, owner and mtime. File contents are not read.
fn matches_by_metadata(root: &Path, manifest: &Manifest, dirs_meta: bool) -> bool {
    let mut seen = 0usize;
    for entry in &manifest.entries {
        let path = join(root, &entry.path);
        let Ok(md) = fs::symlink_metadata(&path) else {
            return false;
        };
        let ft = md.file_type();
        let kind_ok = match &entry.kind {
            EntryKind::Dir => ft.is_dir(),
            EntryKind::File { size, .. } => ft.is_file() && md.len() == *size,
            EntryKind::HardLink { target } => {
                ft.is_file()
                    && fs::symlink_metadata(join(root, target)).is_ok_and(|t| t.ino() == md.ino())
            }
            EntryKind::Symlink { target } => {
                ft.is_symlink()
                    && fs::read_link(&path)
                        .is_ok_and(|t| t.as_os_str().as_bytes() == target.as_slice())
            }
            EntryKind::Fifo | EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => {
                !ft.is_dir() && !ft.is_file() && !ft.is_symlink()
            }
        };
        let meta_ok = matches!(entry.kind, EntryKind::HardLink { .. })
            || (entry.kind == EntryKind::Dir && !dirs_meta)
            || (md.uid() == entry.uid
                && md.gid() == entry.gid
                && (ft.is_symlink() || md.mode() & 0o7777 == entry.mode)
                && md.mtime() == entry.mtime_sec
                && md.mtime_nsec() == i64::from(entry.mtime_nsec));
        if !kind_ok || !meta_ok {
            return false;
        }
        seen += 1;
    }
    // Nothing added: the tree has as many entries as the manifest.
    let count = walkdir::WalkDir::new(root)
        .into_iter()
        .filter(|e| e.is_ok())
        .count();
    count == seen
}

/// What [`prune_previous`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Replaced trees deleted because they still equalled the manifest they were applied from.
    pub removed: Vec<PathBuf>,
    /// Whether a deleted tree was a whole tree (built beside and swapped out), whose files
    /// shared inodes with the live tree: deleting it moved those files' ctimes.
    pub removed_shared: bool,
    /// Replaced trees that had changed (or had no manifest) and were renamed to a `diverged`
    /// name instead of being deleted.
    pub diverged: Vec<PathBuf>,
}

/// Pure part of pruning: given the `<ns>` of the replaced trees, which ones are beyond the
/// newest `keep` and so due for clean-up.
pub fn select_for_prune(previous: &[u128], keep: usize) -> Vec<u128> {
    let mut sorted = previous.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.into_iter().skip(keep).collect()
}

/// Cleans up replaced trees beyond the newest `keep`. A tree is only ever replaced (and named
/// `prev`) when it was exactly as applied; here each is compared again with the manifest it was
/// applied from, by metadata (see `matches_by_metadata`), and only an unchanged tree is deleted.
/// One that changed since is renamed to a `diverged` name and reported, never deleted.
pub fn prune_previous(live: &Path, keep: usize) -> Result<PruneReport, VolumeError> {
    let names = TreeNames::of(live)?;
    let mut report = PruneReport::default();
    for ns in select_for_prune(&names.list_previous()?, keep) {
        let tree = names.previous(ns);
        let manifest_path = names.previous_manifest(ns);
        let recorded = match fs::read(&manifest_path) {
            Ok(bytes) => Manifest::decode(&bytes).ok(),
            Err(_) => None,
        };
        // Replaced trees were checked to be exactly as applied when they were replaced (a changed
        // one is kept aside at once), so a walk comparing names, kinds, sizes, modes, owners and
        // mtimes with the manifest suffices to notice later edits without reading every file.
        // The folders of a partial tree are scaffolding made to hold what was moved into it;
        // only their names and kinds count.
        let marker = names.previous_partial_marker(ns);
        let partial = exists(&marker);
        let unchanged = match &recorded {
            Some(m) => matches_by_metadata(&tree, m, !partial),
            None => false,
        };
        if unchanged {
            fs::remove_dir_all(&tree).ctx("removing", &tree)?;
            report.removed.push(tree);
            report.removed_shared |= !partial;
        } else {
            let aside = names.diverged(ns);
            fs::rename(&tree, &aside).ctx("moving aside", &tree)?;
            tracing::warn!(path = %aside.display(), "a replaced tree had changed on the standby; kept aside");
            report.diverged.push(aside);
        }
        if exists(&manifest_path) {
            fs::remove_file(&manifest_path).ctx("removing", &manifest_path)?;
        }
        if partial {
            fs::remove_file(&marker).ctx("removing", &marker)?;
        }
    }
    sync_dir(&names.parent)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_selection_keeps_the_newest() {
        let cases: Vec<(Vec<u128>, usize, Vec<u128>)> = vec![
            (vec![], 2, vec![]),
            (vec![1, 2], 2, vec![]),
            (vec![3, 1, 2], 1, vec![2, 1]),
            (vec![5, 9, 7], 0, vec![9, 7, 5]),
        ];
        for (have, keep, want) in cases {
            assert_eq!(select_for_prune(&have, keep), want, "{have:?} keep {keep}");
        }
    }

    #[test]
    fn names_live_beside_the_volume() {
        let n = TreeNames::of(Path::new("/srv/vol/data")).unwrap();
        assert_eq!(n.staging(), Path::new("/srv/vol/.data.hearth-staging"));
        assert_eq!(n.previous(7), Path::new("/srv/vol/.data.hearth-prev.7"));
        assert!(TreeNames::of(Path::new("/")).is_err());
    }
}
