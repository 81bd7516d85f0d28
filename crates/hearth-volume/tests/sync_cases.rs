//! Scenario tests for the failure paths of capture and apply: interrupted applies, leftover
//! trees, pruning that never deletes diverged data, files changing during capture, the capture
//! cache, device nodes, and the checker itself.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hearth_volume::{
    CaptureOptions, ChunkStore, EntryKind, LiveWatch, Manifest, UnstablePolicy, VolumeError, apply,
    apply_and_prune, apply_whole, capture, missing_chunks, prune_previous, read_chunk,
};
use rand::{RngCore, SeedableRng, rngs::StdRng};

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

struct Setup {
    _tmp: tempfile::TempDir,
    src: std::path::PathBuf,
    live: std::path::PathBuf,
    store: ChunkStore,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d/e")).unwrap();
    fs::write(src.join("d/small"), b"hello").unwrap();
    fs::write(src.join("d/e/big"), random(1, 2_000_000)).unwrap();
    fs::create_dir(tmp.path().join("standby")).unwrap();
    let live = tmp.path().join("standby/live");
    let store = ChunkStore::open(&tmp.path().join("store")).unwrap();
    Setup {
        _tmp: tmp,
        src,
        live,
        store,
    }
}

fn hidden(live: &Path, part: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(live.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect();
    v.sort();
    v
}

type Mutation = Box<dyn Fn(&Path)>;

#[test]
fn checker_notices_differences() {
    let s = setup();
    let mutations: Vec<Mutation> = vec![
        Box::new(|p| fs::write(p.join("d/small"), b"hellO").unwrap()),
        Box::new(|p| std::os::unix::fs::lchown(p.join("d/small"), Some(7), None).unwrap()),
        Box::new(|p| xattr::set(p.join("d"), "user.x", b"1").unwrap()),
        Box::new(|p| fs::hard_link(p.join("d/small"), p.join("d/link")).unwrap()),
        Box::new(|p| {
            let f = OpenOptions::new()
                .write(true)
                .open(p.join("d/e/big"))
                .unwrap();
            // Same bytes (zeros over a hole) but a different allocation.
            f.set_len(3_000_000).unwrap();
            f.write_all_at(&[0u8; 4096], 2_500_000).unwrap();
        }),
    ];
    for (i, mutate) in mutations.iter().enumerate() {
        // A fresh copy for each mutation, so each one alone must be noticed.
        let live = s.live.with_file_name(format!("copy{i}"));
        common::sync(&s.src, &s.store, &live, None);
        common::assert_same_tree(&s.src, &live);
        mutate(&live);
        let r = std::panic::catch_unwind(|| common::assert_same_tree(&s.src, &live));
        assert!(r.is_err(), "mutation {i} went unnoticed");
    }
}

#[test]
fn small_edit_sends_few_chunks_and_moves_send_nothing() {
    let s = setup();
    let (_, _, first) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(first >= 2_000_000);
    let f = OpenOptions::new()
        .write(true)
        .open(s.src.join("d/e/big"))
        .unwrap();
    f.write_all_at(b"XYZ", 1_000_000).unwrap();
    let (_, _, edit) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(
        edit > 0 && edit <= 2 * 256 * 1024,
        "sent {edit} bytes for a 3-byte edit"
    );
    fs::rename(s.src.join("d/e/big"), s.src.join("moved")).unwrap();
    let (_, _, moved) = common::sync(&s.src, &s.store, &s.live, None);
    assert_eq!(moved, 0);
    common::assert_same_tree(&s.src, &s.live);
}

#[test]
fn interrupted_apply_leaves_live_untouched_and_resumes() {
    let s = setup();
    common::sync_whole(&s.src, &s.store, &s.live, None);
    let before = common::snapshot(&s.live);

    // A second version whose apply fails half-way: one of its chunks rots in the store after
    // the up-front presence check, so the build stops in the middle.
    fs::write(s.src.join("a-first"), random(2, 300_000)).unwrap();
    fs::write(s.src.join("z-last"), random(3, 300_000)).unwrap();
    let cap = capture(&s.src, &CaptureOptions::default(), None).unwrap();
    for want in missing_chunks(&cap.manifest, &s.store.index().unwrap()).wants {
        s.store
            .put(&want.id, &read_chunk(&s.src, &want).unwrap())
            .unwrap();
    }
    let last = cap
        .manifest
        .entries
        .iter()
        .find(|e| e.path == b"z-last")
        .unwrap();
    let EntryKind::File { chunks, .. } = &last.kind else {
        panic!("not a file")
    };
    let victim = chunks[0].id;
    let path = s
        .store
        .dir()
        .join("chunks")
        .join(&victim.to_hex()[..2])
        .join(victim.to_hex());
    fs::write(&path, b"rotten").unwrap();
    let err = apply_whole(&s.store, &cap.manifest, &s.live).unwrap_err();
    assert!(matches!(err, VolumeError::ChunkMismatch { .. }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(common::snapshot(&s.live), before, "live tree changed");
    assert_eq!(
        hidden(&s.live, "staging").len(),
        2,
        "partial build and its marker remain"
    );

    // The rotten chunk was moved out; once it is sent again the apply completes, discarding
    // the partial build and reusing every other stored chunk.
    let plan = missing_chunks(&cap.manifest, &s.store.index().unwrap());
    assert_eq!(plan.wants.len(), 1);
    for want in plan.wants {
        s.store
            .put(&want.id, &read_chunk(&s.src, &want).unwrap())
            .unwrap();
    }
    let report = apply_whole(&s.store, &cap.manifest, &s.live).unwrap();
    assert!(report.discarded_partial);
    common::assert_same_tree(&s.src, &s.live);
    assert!(hidden(&s.live, "staging").is_empty());
}

#[test]
fn the_same_tree_again_is_not_rebuilt() {
    let s = setup();
    let (_, first, _) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(!first.unchanged);
    let (_, again, sent) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(again.unchanged && again.previous.is_none() && again.files == 0);
    assert_eq!(sent, 0);
    assert!(hidden(&s.live, "prev").is_empty());
    fs::write(s.src.join("d/small"), b"changed").unwrap();
    let (_, third, _) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(!third.unchanged && third.previous.is_some());
    common::assert_same_tree(&s.src, &s.live);
}

#[test]
fn missing_chunks_are_refused_before_anything_is_touched() {
    let s = setup();
    let cap = capture(&s.src, &CaptureOptions::default(), None).unwrap();
    let err = apply(&s.store, &cap.manifest, &s.live).unwrap_err();
    assert!(matches!(err, VolumeError::MissingChunks { .. }));
    assert!(!s.live.exists());
    assert!(hidden(&s.live, "hearth").is_empty());
}

#[test]
fn leftover_tree_of_unknown_state_is_kept_aside() {
    let s = setup();
    common::sync(&s.src, &s.store, &s.live, None);
    // What an interrupted exchange leaves: the old tree under the staging name, no marker.
    let staging = s.live.parent().unwrap().join(".live.hearth-staging");
    fs::create_dir(&staging).unwrap();
    fs::write(staging.join("precious"), b"only copy").unwrap();
    let (_, report, _) = common::sync(&s.src, &s.store, &s.live, None);
    let aside = report.set_aside.unwrap();
    assert_eq!(fs::read(aside.join("precious")).unwrap(), b"only copy");
    assert!(hidden(&s.live, "diverged").len() == 1);
}

#[test]
fn prune_deletes_only_unchanged_old_trees() {
    let s = setup();
    common::sync_whole(&s.src, &s.store, &s.live, None);
    fs::write(s.src.join("v2"), b"2").unwrap();
    let (_, r2, _) = common::sync_whole(&s.src, &s.store, &s.live, None);
    fs::write(s.src.join("v3"), b"3").unwrap();
    let (_, r3, _) = common::sync_whole(&s.src, &s.store, &s.live, None);
    fs::write(s.src.join("v4"), b"4").unwrap();
    common::sync_whole(&s.src, &s.store, &s.live, None);
    // Someone added a file to the first replaced tree (v1) after it was replaced. (Writing into
    // one of its files would, on a filesystem without clones, also change the live tree, whose
    // unchanged files are hard links to the same inodes; the next apply would notice that.)
    let v1 = r2.previous.unwrap();
    fs::write(v1.join("d/local-note"), b"local edit").unwrap();
    let v2 = r3.previous.unwrap();

    let report = prune_previous(&s.live, 1).unwrap();
    assert_eq!(report.removed, vec![v2.clone()]);
    assert_eq!(report.diverged.len(), 1);
    assert!(!v2.exists() && !v1.exists());
    assert_eq!(
        fs::read(report.diverged[0].join("d/local-note")).unwrap(),
        b"local edit"
    );
    assert_eq!(
        hidden(&s.live, "prev").len(),
        2,
        "the newest old tree and its manifest stay"
    );
    common::assert_same_tree(&s.src, &s.live);
    // Chunks no longer referenced by the live tree can go.
    let keep: HashSet<_> = hearth_volume::read_live_manifest(&s.live)
        .unwrap()
        .unwrap()
        .chunk_ids();
    s.store.retain(&keep).unwrap();
    assert_eq!(s.store.index().unwrap(), keep);
}

#[test]
fn files_changing_during_capture_are_retried_then_reported() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("busy"), random(4, 16_000_000)).unwrap();
    fs::write(tmp.path().join("calm"), b"calm").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let path = tmp.path().join("busy");
        std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(path).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all_at(&i.to_le_bytes(), (i * 7919) % 15_000_000)
                    .unwrap();
                i += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    let opts = CaptureOptions {
        max_retries: 2,
        ..CaptureOptions::default()
    };
    let err = capture(tmp.path(), &opts, None).unwrap_err();
    let include = capture(
        tmp.path(),
        &CaptureOptions {
            unstable: UnstablePolicy::Include,
            ..opts
        },
        None,
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    match err {
        VolumeError::Unstable { paths } => assert_eq!(paths, vec![Path::new("busy")]),
        other => panic!("expected Unstable, got {other}"),
    }
    let include = include.unwrap();
    assert_eq!(include.report.unstable, vec![Path::new("busy")]);
    assert_eq!(include.report.retried, vec![Path::new("busy")]);
    // Once quiet, the same tree captures cleanly.
    let calm = capture(tmp.path(), &CaptureOptions::default(), None).unwrap();
    assert!(calm.report.unstable.is_empty() && calm.report.retried.is_empty());
}

#[test]
fn cache_skips_unchanged_files_but_not_changed_ones() {
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..20 {
        fs::write(tmp.path().join(format!("f{i}")), random(i, 10_000)).unwrap();
    }
    // The cache trusts only files whose ctime is safely older than the capture's start: 100 ms
    // on a filesystem with sub-second timestamps (ext4 and tmpfs, where tests run), else 2 s.
    std::thread::sleep(Duration::from_millis(150));
    let first = capture(tmp.path(), &CaptureOptions::default(), None).unwrap();
    assert_eq!(first.report.files_read, 20);
    fs::write(tmp.path().join("f3"), random(99, 10_000)).unwrap();
    let second = capture(tmp.path(), &CaptureOptions::default(), Some(&first.cache)).unwrap();
    assert_eq!(second.report.files_reused, 19);
    assert_eq!(second.report.files_read, 1);
    // f3 changed just before `second` read it: the next capture reads it again, and once it was
    // read more than the margin after its change, it is trusted.
    std::thread::sleep(Duration::from_millis(150));
    let third = capture(tmp.path(), &CaptureOptions::default(), Some(&second.cache)).unwrap();
    assert_eq!(third.report.files_read, 1);
    let fourth = capture(tmp.path(), &CaptureOptions::default(), Some(&third.cache)).unwrap();
    assert_eq!(fourth.report.files_read, 0);
    let fresh = capture(tmp.path(), &CaptureOptions::default(), None).unwrap();
    assert_eq!(
        fresh.manifest.tree_hash().unwrap(),
        second.manifest.tree_hash().unwrap()
    );
}

#[test]
fn devices_are_refused_unless_allowed_and_then_replicated() {
    let s = setup();
    let dev = rustix::fs::makedev(1, 3);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        s.src.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        dev,
    )
    .unwrap();
    let err = capture(&s.src, &CaptureOptions::default(), None).unwrap_err();
    assert!(matches!(err, VolumeError::Unsupported { .. }), "{err}");
    assert!(!err.is_retryable());
    let opts = CaptureOptions {
        allow_devices: true,
        ..CaptureOptions::default()
    };
    let cap = capture(&s.src, &opts, None).unwrap();
    for want in missing_chunks(&cap.manifest, &HashSet::new()).wants {
        s.store
            .put(&want.id, &read_chunk(&s.src, &want).unwrap())
            .unwrap();
    }
    apply(&s.store, &cap.manifest, &s.live).unwrap();
    common::assert_same_tree(&s.src, &s.live);
}

#[test]
fn source_changed_after_capture_is_detected_on_read() {
    let s = setup();
    let cap = capture(&s.src, &CaptureOptions::default(), None).unwrap();
    fs::write(s.src.join("d/small"), b"HELLO").unwrap();
    let plan = missing_chunks(&cap.manifest, &HashSet::new());
    let want = plan.wants.iter().find(|w| w.path == b"d/small").unwrap();
    let err = read_chunk(&s.src, want).unwrap_err();
    assert!(matches!(err, VolumeError::SourceChanged { .. }) && err.is_retryable());
}

#[test]
fn mount_points_and_sockets_are_skipped_and_reported() {
    let s = setup();
    let sock = s.src.join("d/sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // A filesystem mounted below the root is neither recorded nor entered. Tests run as root
    // (CI too), so a tmpfs can be mounted.
    let mnt = s.src.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "none"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs needs root");
    fs::write(mnt.join("elsewhere"), b"x").unwrap();
    let cap = capture(&s.src, &CaptureOptions::default(), None);
    let unmounted = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .unwrap();
    let cap = cap.unwrap();
    assert!(unmounted.success());
    assert_eq!(
        cap.report.skipped,
        vec![
            (Path::new("d/sock").to_owned(), "socket"),
            (
                Path::new("mnt").to_owned(),
                "mount point of another filesystem"
            ),
        ]
    );
    assert!(
        !cap.manifest
            .entries
            .iter()
            .any(|e| e.path.starts_with(b"mnt") || e.path == b"d/sock")
    );
}

#[test]
fn standby_capture_has_the_primary_tree_hash() {
    // `verify` compares the two sides by one hash: capture of the standby's live tree must hash
    // like the primary's manifest.
    let s = setup();
    std::os::unix::fs::symlink("d/small", s.src.join("ln")).unwrap();
    fs::hard_link(s.src.join("d/small"), s.src.join("hl")).unwrap();
    let (cap, _, _) = common::sync(&s.src, &s.store, &s.live, None);
    let standby = capture(&s.live, &CaptureOptions::default(), None).unwrap();
    assert_eq!(
        standby.manifest.tree_hash().unwrap(),
        cap.manifest.tree_hash().unwrap()
    );
    let decoded = Manifest::decode(&cap.manifest.encode().unwrap()).unwrap();
    assert_eq!(decoded, cap.manifest);
}

#[test]
fn unchanged_files_are_reused_from_the_live_tree() {
    let s = setup();
    fs::write(s.src.join("d/sparse"), b"").unwrap();
    let sparse = OpenOptions::new()
        .write(true)
        .open(s.src.join("d/sparse"))
        .unwrap();
    sparse.write_all_at(&random(4, 100_000), 3_000_000).unwrap();
    sparse.set_len(5_000_000).unwrap();
    drop(sparse);
    let (_, first, _) = common::sync(&s.src, &s.store, &s.live, None);
    assert_eq!((first.files, first.reused), (3, 0), "nothing to reuse yet");

    // One file changes, one is renamed: the other two keep their content and are reused, the
    // renamed one from its old path.
    fs::write(s.src.join("d/small"), b"changed").unwrap();
    fs::rename(s.src.join("d/e/big"), s.src.join("big-moved")).unwrap();
    let (cap, second, _) = common::sync(&s.src, &s.store, &s.live, None);
    common::assert_same_tree(&s.src, &s.live);
    assert_eq!((second.files, second.reused), (3, 2), "{second:?}");
    // The sparse file's data region as the filesystem reports it (whole blocks), no holes.
    let sparse_data: u64 = cap
        .manifest
        .entries
        .iter()
        .find(|e| e.path == b"d/sparse")
        .map(|e| match &e.kind {
            EntryKind::File { chunks, .. } => chunks.iter().map(|c| u64::from(c.len)).sum(),
            _ => 0,
        })
        .unwrap();
    assert!((100_000..200_000).contains(&sparse_data), "{sparse_data}");
    assert_eq!(second.reused_bytes, 2_000_000 + sparse_data);
    assert_eq!(second.bytes, 7, "only the changed file came from chunks");
    // Cloned where the filesystem can (run with TMPDIR on XFS or btrfs to cover that path),
    // copied elsewhere.
    let probe = s.live.parent().unwrap().join("clone-probe");
    fs::write(&probe, b"probe").unwrap();
    let copy = fs::File::create(probe.with_extension("copy")).unwrap();
    let can_clone = rustix::fs::ioctl_ficlone(&copy, fs::File::open(&probe).unwrap()).is_ok();
    // Without clones (apply probes the filesystem once before it builds), both files whose
    // content and metadata are unchanged are hard-linked, the renamed one from its old path.
    assert_eq!(
        (second.cloned, second.linked),
        if can_clone { (2, 0) } else { (0, 2) },
        "can clone: {can_clone}"
    );
    assert!(second.changed_live.is_empty());
    let prev = second.previous.unwrap();
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    assert_eq!(
        ino(&prev.join("d/sparse")) == ino(&s.live.join("d/sparse")),
        !can_clone,
        "a clone is a new inode; a link shares it"
    );
}

#[test]
fn live_files_changed_on_the_standby_are_not_reused_and_not_lost() {
    let s = setup();
    fs::write(s.src.join("d/other"), random(5, 200_000)).unwrap();
    common::sync(&s.src, &s.store, &s.live, None);
    let big = s.live.join("d/e/big");
    let other = s.live.join("d/other");
    let small = s.live.join("d/small");
    // Behind hearth's back: an in-place edit of the same size with the mtime put back (only
    // the ctime gives it away), and a file replaced by another one of the same size.
    let before = fs::metadata(&big).unwrap();
    let f = OpenOptions::new().write(true).open(&big).unwrap();
    f.write_all_at(b"local edit", 1000).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(before.modified().unwrap()))
        .unwrap();
    drop(f);
    assert_eq!(
        fs::metadata(&big).unwrap().modified().unwrap(),
        before.modified().unwrap()
    );
    let replacement = s.live.join("d/replacement");
    fs::write(&replacement, random(6, 200_000)).unwrap();
    fs::rename(&replacement, &other).unwrap();

    fs::write(s.src.join("d/small"), b"changed").unwrap();
    let (_, report, _) = common::sync(&s.src, &s.store, &s.live, None);
    common::assert_same_tree(&s.src, &s.live);
    // The check before the build read the two changed files again (their stamps moved) and
    // found the tree changed: nothing of it is reused, and it is kept aside whole.
    assert_eq!(report.reused, 0, "{report:?}");
    assert_eq!(report.bytes, 2_000_000 + 200_000 + 7);
    // The standby's own changes are in the replaced tree, kept aside as diverged, not lost.
    assert!(report.previous.is_none());
    let prev = report.set_aside.unwrap();
    assert!(
        prev.to_string_lossy().contains("hearth-diverged."),
        "{prev:?}"
    );
    assert_eq!(
        &fs::read(prev.join("d/e/big")).unwrap()[1000..1010],
        b"local edit"
    );
    assert_eq!(fs::read(prev.join("d/other")).unwrap(), random(6, 200_000));
    assert_eq!(fs::read(prev.join("d/small")).unwrap(), b"hello");
    assert!(!small.exists() || fs::read(&small).unwrap() == b"changed");

    // A file removed on the standby cannot be reused either; the tree is still rebuilt whole,
    // and the changed tree is kept aside again.
    fs::remove_file(s.live.join("d/e/big")).unwrap();
    fs::write(s.src.join("d/small"), b"changed again").unwrap();
    let (_, report, _) = common::sync(&s.src, &s.store, &s.live, None);
    common::assert_same_tree(&s.src, &s.live);
    assert!(
        report.set_aside.is_some() && report.previous.is_none(),
        "{report:?}"
    );
    assert!(!big.exists() || fs::read(&big).unwrap().len() == 2_000_000);
    assert_eq!(
        report.reused, 1,
        "d/other is unchanged since the last apply"
    );
}

#[test]
fn damaged_or_missing_stamps_only_cost_speed() {
    let s = setup();
    common::sync_whole(&s.src, &s.store, &s.live, None);
    let stamps = s.live.parent().unwrap().join(".live.hearth-live.stamps");
    let mut bytes = fs::read(&stamps).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&stamps, &bytes).unwrap();
    // Without usable stamps the live tree is read whole to check it, and then its unchanged file
    // is reused as usual: damaged stamps cost a read, nothing else.
    fs::write(s.src.join("d/small"), b"changed").unwrap();
    let (_, report, _) = common::sync_whole(&s.src, &s.store, &s.live, None);
    common::assert_same_tree(&s.src, &s.live);
    assert_eq!(report.reused, 1);
    assert!(
        report.previous.is_some() && report.set_aside.is_none(),
        "{report:?}"
    );

    fs::write(s.src.join("d/small"), b"changed again").unwrap();
    let (_, report, _) = common::sync_whole(&s.src, &s.store, &s.live, None);
    assert_eq!(report.reused, 1);
    fs::remove_file(&stamps).unwrap();
    fs::write(s.src.join("d/small"), b"third").unwrap();
    let (_, report, _) = common::sync_whole(&s.src, &s.store, &s.live, None);
    common::assert_same_tree(&s.src, &s.live);
    assert_eq!(report.reused, 1);
    assert!(
        report.previous.is_some() && report.set_aside.is_none(),
        "{report:?}"
    );
}

#[test]
fn small_changes_go_in_place_and_keep_only_what_they_replaced() {
    let s = setup();
    for i in 0..10 {
        fs::write(s.src.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    let (_, first, _) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(!first.in_place, "a first sync builds the whole tree");
    let big_ino = fs::metadata(s.live.join("d/e/big")).unwrap().ino();

    fs::write(s.src.join("d/small"), b"changed").unwrap();
    fs::remove_file(s.src.join("f3")).unwrap();
    fs::create_dir(s.src.join("n")).unwrap();
    fs::write(s.src.join("n/new"), b"new").unwrap();
    let (_, second, _) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(second.in_place, "{second:?}");
    common::assert_same_tree(&s.src, &s.live);
    // Unchanged files were not touched at all: the same inode, no link, no copy.
    assert_eq!(fs::metadata(s.live.join("d/e/big")).unwrap().ino(), big_ino);
    assert_eq!((second.files, second.reused, second.linked), (2, 0, 0));
    // The kept tree holds exactly what the change replaced or removed, with its parents.
    let prev = second.previous.clone().unwrap();
    assert_eq!(fs::read(prev.join("d/small")).unwrap(), b"hello");
    assert_eq!(fs::read(prev.join("f3")).unwrap(), b"file 3");
    assert!(!prev.join("d/e").exists() && !prev.join("f4").exists() && !prev.join("n").exists());
    assert_eq!(hidden(&s.live, "partial").len(), 1);
    assert!(
        hidden(&s.live, "patch").is_empty(),
        "the patch folder is cleaned up"
    );

    // A metadata change alone is applied in place too, and the next check still trusts the tree.
    fs::set_permissions(s.src.join("f5"), fs::Permissions::from_mode(0o600)).unwrap();
    let (_, third, _) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(third.in_place && third.set_aside.is_none(), "{third:?}");
    common::assert_same_tree(&s.src, &s.live);

    // Kept trees of in-place applies are pruned like whole ones: deleted while they are as
    // applied, kept aside once edited. Deleting them does not touch the live tree's inodes.
    fs::write(third.previous.clone().unwrap().join("note"), b"local").unwrap();
    let pruned = prune_previous(&s.live, 0).unwrap();
    assert_eq!(pruned.removed, vec![prev]);
    assert_eq!(pruned.diverged.len(), 1);
    assert!(!pruned.removed_shared);
    assert!(hidden(&s.live, "partial").is_empty());
    fs::write(s.src.join("f6"), b"six").unwrap();
    let (_, fourth, _) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(fourth.in_place && fourth.set_aside.is_none(), "{fourth:?}");
    common::assert_same_tree(&s.src, &s.live);
}

#[test]
fn a_standby_edit_before_a_small_change_still_sets_the_whole_tree_aside() {
    let s = setup();
    for i in 0..10 {
        fs::write(s.src.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    common::sync(&s.src, &s.store, &s.live, None);
    fs::write(s.live.join("f1"), b"edited on the standby").unwrap();
    fs::write(s.src.join("f2"), b"changed on the primary").unwrap();
    let (_, report, _) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(!report.in_place, "{report:?}");
    let aside = report.set_aside.unwrap();
    assert_eq!(
        fs::read(aside.join("f1")).unwrap(),
        b"edited on the standby"
    );
    common::assert_same_tree(&s.src, &s.live);
}

/// One sync with a watch slot, as `serve` does it: returns the report.
fn sync_watched(s: &Setup, watch: &mut Option<LiveWatch>) -> hearth_volume::ApplyReport {
    let cap = capture(&s.src, &CaptureOptions::default(), None).unwrap();
    for want in missing_chunks(&cap.manifest, &s.store.index().unwrap()).wants {
        s.store
            .put(&want.id, &read_chunk(&s.src, &want).unwrap())
            .unwrap();
    }
    let (report, _) = apply_and_prune(
        &s.store,
        &cap.manifest,
        &s.live,
        2,
        None,
        None,
        true,
        Some(watch),
    )
    .unwrap();
    common::assert_same_tree(&s.src, &s.live);
    report
}

#[test]
fn a_watched_standby_is_trusted_without_a_walk_until_someone_else_touches_it() {
    let s = setup();
    for i in 0..20 {
        fs::write(s.src.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    let mut watch = None;
    let first = sync_watched(&s, &mut watch);
    assert!(!first.in_place && watch.is_some(), "{first:?}");
    let mut round = 0;
    let mut primary_change = |s: &Setup| {
        round += 1;
        fs::write(
            s.src.join(format!("f{}", round % 20)),
            format!("round {round}"),
        )
        .unwrap();
    };
    primary_change(&s);
    let r = sync_watched(&s, &mut watch);
    assert!(r.in_place && !r.walked_live, "{r:?}");
    // A new folder made by apply is watched too.
    fs::create_dir(s.src.join("new")).unwrap();
    fs::write(s.src.join("new/x"), b"x").unwrap();
    let r = sync_watched(&s, &mut watch);
    assert!(r.in_place && !r.walked_live, "{r:?}");

    // Each change made on the standby behind apply's back makes the next apply walk, find the
    // tree changed and keep it aside; the apply after that is trusted again.
    type Edit = (&'static str, fn(&Path), &'static str);
    let edits: [Edit; 6] = [
        (
            "write",
            |l| fs::write(l.join("f7"), b"edited").unwrap(),
            "f7",
        ),
        (
            "chmod",
            |l| fs::set_permissions(l.join("d/small"), fs::Permissions::from_mode(0o600)).unwrap(),
            "d/small",
        ),
        (
            "create in a subfolder",
            |l| fs::write(l.join("d/e/local"), b"mine").unwrap(),
            "d/e/local",
        ),
        (
            "create in a new folder",
            |l| fs::write(l.join("new/local"), b"mine").unwrap(),
            "new/local",
        ),
        ("remove", |l| fs::remove_file(l.join("f9")).unwrap(), ""),
        (
            "rename",
            |l| fs::rename(l.join("f11"), l.join("f11.bak")).unwrap(),
            "f11.bak",
        ),
    ];
    for (name, edit, kept) in edits {
        edit(&s.live);
        primary_change(&s);
        let r = sync_watched(&s, &mut watch);
        assert!(r.walked_live && !r.in_place, "{name}: {r:?}");
        let aside = r
            .set_aside
            .clone()
            .unwrap_or_else(|| panic!("{name}: not kept aside"));
        if !kept.is_empty() {
            assert!(
                aside.join(kept).exists(),
                "{name}: {kept} is in the kept tree"
            );
        }
        primary_change(&s);
        let r = sync_watched(&s, &mut watch);
        assert!(
            r.in_place && !r.walked_live && r.set_aside.is_none(),
            "{name}, after: {r:?}"
        );
    }
    // A change of most files, on a trusted tree, builds the whole tree beside it (with every
    // unchanged live file at hand), and the tree after it is trusted again.
    for i in 0..20 {
        fs::write(s.src.join(format!("f{i}")), format!("all changed {i}")).unwrap();
    }
    let r = sync_watched(&s, &mut watch);
    assert!(!r.in_place && !r.walked_live && r.reused >= 1, "{r:?}");
    primary_change(&s);
    let r = sync_watched(&s, &mut watch);
    assert!(r.in_place && !r.walked_live, "{r:?}");
}

#[test]
fn a_copy_with_the_same_content_and_metadata_stays_a_separate_file_on_the_standby() {
    let s = setup();
    for i in 0..10 {
        fs::write(s.src.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    common::sync(&s.src, &s.store, &s.live, None);
    // `cp -a d/e/big copy`: the same bytes, mode and mtime at a new path.
    fs::copy(s.src.join("d/e/big"), s.src.join("copy")).unwrap();
    let md = fs::metadata(s.src.join("d/e/big")).unwrap();
    fs::File::options()
        .write(true)
        .open(s.src.join("copy"))
        .unwrap()
        .set_modified(md.modified().unwrap())
        .unwrap();
    let (_, r, _) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(r.in_place, "{r:?}");
    common::assert_same_tree(&s.src, &s.live);
    assert_ne!(
        fs::metadata(s.live.join("copy")).unwrap().ino(),
        fs::metadata(s.live.join("d/e/big")).unwrap().ino(),
        "two names of one inode would be a hard link the primary does not have"
    );
    // The next apply walks the tree (no watch here) and finds it exactly as applied.
    fs::write(s.src.join("f1"), b"next").unwrap();
    let (_, r, _) = common::sync(&s.src, &s.store, &s.live, None);
    assert!(
        r.in_place && r.walked_live && r.set_aside.is_none(),
        "{r:?}"
    );
    common::assert_same_tree(&s.src, &s.live);
}

/// Streams `src` into received files as a first sync does, returning its manifest.
fn stream_into(src: &Path, inc: &mut hearth_volume::Incoming) -> Manifest {
    let mut sink = |s: hearth_volume::Streamed<'_>| match s {
        hearth_volume::Streamed::Begin { path } => inc.begin(path).unwrap(),
        hearth_volume::Streamed::Chunk { offset, id, data } => {
            inc.write(offset, id, data.to_vec()).unwrap()
        }
    };
    let c =
        hearth_volume::capture_streaming(src, &CaptureOptions::default(), None, Some(&mut sink))
            .unwrap();
    inc.flush().unwrap();
    c.manifest
}

#[test]
fn received_files_become_the_tree_whole_only_when_they_are_exactly_it() {
    let s = setup();
    // What is not streamed (a hard link, a symlink, an empty folder) is built as usual.
    fs::hard_link(s.src.join("d/small"), s.src.join("d/small-link")).unwrap();
    std::os::unix::fs::symlink("e/big", s.src.join("d/to-big")).unwrap();
    fs::create_dir(s.src.join("empty")).unwrap();
    fs::set_permissions(s.src.join("d/small"), fs::Permissions::from_mode(0o640)).unwrap();
    let names = hearth_volume::TreeNames::of(&s.live).unwrap();
    let mut inc = hearth_volume::Incoming::new(names.incoming());
    let m = stream_into(&s.src, &mut inc);
    let (report, _) =
        apply_and_prune(&s.store, &m, &s.live, 2, None, Some(&mut inc), true, None).unwrap();
    assert!(report.received_whole);
    common::assert_same_tree(&s.src, &s.live);
    inc.remove().unwrap();
    assert!(!names.incoming().exists());
    assert!(
        s.live.join("d/e/big").exists(),
        "removing the received files left the tree"
    );

    // A received file the manifest does not have (deleted while the primary walked): the files
    // that fit are moved in one by one, and the stray one is not in the tree.
    let tmp = tempfile::tempdir().unwrap();
    let live2 = tmp.path().join("live");
    let names2 = hearth_volume::TreeNames::of(&live2).unwrap();
    let mut inc2 = hearth_volume::Incoming::new(names2.incoming());
    let m2 = stream_into(&s.src, &mut inc2);
    inc2.begin(b"d/deleted-during-walk").unwrap();
    let (report, _) =
        apply_and_prune(&s.store, &m2, &live2, 2, None, Some(&mut inc2), true, None).unwrap();
    assert!(!report.received_whole);
    common::assert_same_tree(&s.src, &live2);
    inc2.remove().unwrap();
}
