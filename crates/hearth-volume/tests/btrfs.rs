//! The btrfs backend's local parts against real btrfs: two filesystems on loop devices play primary and
//! standby, and send streams go between them through memory (the network link is tested elsewhere).
//!
//! Needs root and btrfs-progs (scripts/install-deps); tests run one at a time to bound loop device use.

// Helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_testkit::btrfs::BtrfsLoop;
use hearth_volume::btrfs::{
    self, BtrfsError, FullReason, KeepReason, ParentChoice, Replaced, SubvolInfo,
};
use rand::{Rng, SeedableRng};
use tokio::io::AsyncReadExt;

/// Tests that take loop devices run one at a time. A tokio mutex, because the guard lives across awaits;
/// it does not poison, so one failed test does not fail the rest.
static ROOT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const FS_MIB: u64 = 512;

/// A primary with volume `vol` and a snapshot folder, and a standby with a staging folder and a live path.
struct Pair {
    primary: BtrfsLoop,
    standby: BtrfsLoop,
}

impl Pair {
    fn new() -> Pair {
        let pair = Pair {
            primary: BtrfsLoop::new(FS_MIB).unwrap(),
            standby: BtrfsLoop::new(FS_MIB).unwrap(),
        };
        pair.primary.create_subvolume("vol").unwrap();
        std::fs::create_dir(pair.snaps()).unwrap();
        std::fs::create_dir(pair.staging()).unwrap();
        std::fs::create_dir(pair.standby.mount().join("services")).unwrap();
        pair
    }
    fn vol(&self) -> PathBuf {
        self.primary.mount().join("vol")
    }
    fn snaps(&self) -> PathBuf {
        self.primary.mount().join("snaps")
    }
    fn staging(&self) -> PathBuf {
        self.standby.mount().join("staging")
    }
    fn live(&self) -> PathBuf {
        self.standby.mount().join("services/app")
    }
    fn snapshot(&self, name: &str) -> SubvolInfo {
        btrfs::take_snapshot(&self.vol(), &self.snaps(), name).unwrap()
    }
    /// The primary's snapshots other than `except` (what `choose_parent` is given before sending it).
    fn others(&self, except: &SubvolInfo) -> Vec<SubvolInfo> {
        btrfs::list_snapshots(&self.snaps())
            .unwrap()
            .into_iter()
            .filter(|s| s.uuid != except.uuid)
            .collect()
    }
}

/// The whole send stream of `snapshot` (from `parent`), read into memory.
async fn stream_of(snapshot: &SubvolInfo, parent: Option<&SubvolInfo>) -> Vec<u8> {
    let mut send = btrfs::send(snapshot, parent).unwrap();
    let mut bytes = Vec::new();
    send.read_to_end(&mut bytes).await.unwrap();
    send.finish().await.unwrap();
    bytes
}

/// Writes `files` files of random sizes up to `max_size` below `dir`, in a few subfolders, plus a symlink.
fn write_tree(dir: &Path, seed: u64, files: usize, max_size: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..files {
        let sub = dir.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&sub).unwrap();
        let len = rng.random_range(0..=max_size);
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        std::fs::write(sub.join(format!("f{i}")), data).unwrap();
    }
    let link = dir.join("link");
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink("d0/f0", link).unwrap();
    }
    std::fs::set_permissions(dir.join("d1"), std::fs::Permissions::from_mode(0o750)).unwrap();
}

/// Every entry below `root` with what matters for equality: kind, mode, and file bytes or link target.
fn tree(root: &Path) -> BTreeMap<PathBuf, (String, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1) {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(root).unwrap().to_path_buf();
        let meta = entry.path().symlink_metadata().unwrap();
        let value = if meta.file_type().is_symlink() {
            let target = std::fs::read_link(entry.path()).unwrap();
            (
                "link".into(),
                0,
                target.into_os_string().into_encoded_bytes(),
            )
        } else if meta.is_dir() {
            ("dir".into(), meta.mode(), Vec::new())
        } else {
            (
                "file".into(),
                meta.mode(),
                std::fs::read(entry.path()).unwrap(),
            )
        };
        out.insert(rel, value);
    }
    out
}

fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{} and {} hold different names",
        a.display(),
        b.display()
    );
    for (k, va) in &ta {
        assert!(
            tb[k] == *va,
            "{} differs between {} and {}",
            k.display(),
            a.display(),
            b.display()
        );
    }
}

fn total_bytes(root: &Path) -> usize {
    tree(root).values().map(|v| v.2.len()).sum()
}

#[tokio::test]
async fn full_then_incremental_from_the_right_parent() {
    let _guard = ROOT.lock().await;
    let pair = Pair::new();
    write_tree(&pair.vol(), 1, 40, 1 << 20);
    assert!(total_bytes(&pair.vol()) > 10 << 20);

    // First sync: the standby holds nothing, so the send is full and says why.
    let s1 = pair.snapshot("s1");
    assert!(s1.readonly && s1.received_uuid.is_none());
    let has = btrfs::received_uuids(&pair.staging()).unwrap();
    assert_eq!(
        btrfs::choose_parent(&pair.others(&s1), &has),
        ParentChoice::Full {
            reason: FullReason::NoSnapshotsOnStandby
        }
    );
    let full = stream_of(&s1, None).await;
    let r1 = btrfs::receive(&pair.staging(), &full[..]).await.unwrap();
    assert!(r1.readonly);
    assert_eq!(r1.received_uuid.as_deref(), Some(s1.uuid.as_str()));
    assert_eq!(r1.path, pair.staging().join("s1"));
    let report = btrfs::switch_live(&r1, &pair.live(), "app.diverged-1").unwrap();
    assert_eq!(report.replaced, None);
    assert!(!report.live.readonly, "the live copy is writable");
    assert_same_tree(&s1.path, &pair.live());

    // A small change: one file rewritten, one added, one removed.
    std::fs::write(pair.vol().join("d0/f0"), b"changed").unwrap();
    std::fs::write(pair.vol().join("d2/new"), vec![5u8; 4096]).unwrap();
    std::fs::remove_file(pair.vol().join("d3/f3")).unwrap();
    let s2 = pair.snapshot("s2");
    let has = btrfs::received_uuids(&pair.staging()).unwrap();
    assert_eq!(has, vec![s1.uuid.clone()]);
    let ParentChoice::Incremental { parent } = btrfs::choose_parent(&pair.others(&s2), &has) else {
        panic!("expected an incremental send");
    };
    assert_eq!(parent.uuid, s1.uuid);
    let incremental = stream_of(&s2, Some(&parent)).await;
    assert!(
        incremental.len() * 50 < full.len(),
        "incremental {} bytes against full {}",
        incremental.len(),
        full.len()
    );
    let r2 = btrfs::receive(&pair.staging(), &incremental[..])
        .await
        .unwrap();
    assert_eq!(r2.received_uuid.as_deref(), Some(s2.uuid.as_str()));
    let report = btrfs::switch_live(&r2, &pair.live(), "app.diverged-2").unwrap();
    assert_same_tree(&s2.path, &pair.live());
    assert!(
        matches!(report.replaced, Some(Replaced::Deleted { .. })),
        "an unchanged live copy made by hearth is deleted: {report:?}"
    );
    assert!(
        !pair
            .standby
            .mount()
            .join("services/app.diverged-2")
            .exists()
    );

    // With s1 and s2 on the standby, the parent of s3 is s2, the newest common one.
    std::fs::write(pair.vol().join("d1/f1"), b"third").unwrap();
    let s3 = pair.snapshot("s3");
    let has = btrfs::received_uuids(&pair.staging()).unwrap();
    assert_eq!(has.len(), 2);
    match btrfs::choose_parent(&pair.others(&s3), &has) {
        ParentChoice::Incremental { parent } => assert_eq!(parent.uuid, s2.uuid),
        other => panic!("expected s2 as parent, got {other:?}"),
    }
    let r3 = btrfs::receive(&pair.staging(), &stream_of(&s3, Some(&s2)).await[..])
        .await
        .unwrap();
    btrfs::switch_live(&r3, &pair.live(), "app.diverged-3").unwrap();
    assert_same_tree(&s3.path, &pair.live());

    // Space held by old snapshots, without quotas: s1 alone holds the old d0/f0.
    let old_f0 = std::fs::metadata(s1.path.join("d0/f0")).unwrap().len();
    let space = btrfs::exclusive_bytes(&[s1.path.clone(), s3.path.clone()]).unwrap();
    assert!(
        space[0].total as usize >= total_bytes(&s1.path) - (64 << 10),
        "{space:?}"
    );
    assert!(
        space[0].exclusive >= old_f0 - 4096,
        "{space:?}, old f0 {old_f0}"
    );
    assert!(space[0].exclusive < space[0].total, "{space:?}");

    // Retention on the primary: keep the newest, and s2 as the standby's pinned last common snapshot.
    let all = btrfs::list_snapshots(&pair.snaps()).unwrap();
    assert_eq!(
        all.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s1", "s2", "s3"]
    );
    let prune = btrfs::select_for_prune(&all, 1, std::slice::from_ref(&s2.uuid));
    assert_eq!(
        prune.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s1"]
    );
    for s in &prune {
        btrfs::delete_subvolume(&s.path).unwrap();
    }
    let left: Vec<String> = btrfs::list_snapshots(&pair.snaps())
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(left, ["s2", "s3"]);
    // Retention on the standby, pinned by the primary's UUID, which it holds as received UUID.
    let staged = btrfs::list_snapshots(&pair.staging()).unwrap();
    let prune = btrfs::select_for_prune(&staged, 1, std::slice::from_ref(&s2.uuid));
    assert_eq!(
        prune.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s1"]
    );
}

#[tokio::test]
async fn missing_parent_on_standby_gives_an_explicit_full_send() {
    let _guard = ROOT.lock().await;
    let pair = Pair::new();
    write_tree(&pair.vol(), 2, 10, 64 << 10);
    let s1 = pair.snapshot("s1");
    let r1 = btrfs::receive(&pair.staging(), &stream_of(&s1, None).await[..])
        .await
        .unwrap();
    btrfs::switch_live(&r1, &pair.live(), "app.diverged-1").unwrap();

    // The primary pruned s1 (say, before the pin existed): the standby's snapshot is no parent any more.
    btrfs::delete_subvolume(&s1.path).unwrap();
    let s0 = pair.snapshot("unsent");
    std::fs::write(pair.vol().join("later"), b"x").unwrap();
    let s2 = pair.snapshot("s2");
    let has = btrfs::received_uuids(&pair.staging()).unwrap();
    assert_eq!(has.len(), 1);
    let choice = btrfs::choose_parent(&pair.others(&s2), &has);
    assert_eq!(
        choice,
        ParentChoice::Full {
            reason: FullReason::NoCommonParent { standby_has_n: 1 }
        }
    );
    assert!(pair.others(&s2).iter().any(|s| s.uuid == s0.uuid));
    // Sending from a parent the standby lacks fails on the standby, and leaves nothing usable.
    let wrong = stream_of(&s2, Some(&s0)).await;
    let err = btrfs::receive(&pair.staging(), &wrong[..])
        .await
        .unwrap_err();
    assert!(
        matches!(err, BtrfsError::Command { .. }),
        "receive from an unknown parent must fail: {err}"
    );
    btrfs::clean_partial_receives(&pair.staging()).unwrap();
    // The full send works and the standby ends equal to s2.
    let r2 = btrfs::receive(&pair.staging(), &stream_of(&s2, None).await[..])
        .await
        .unwrap();
    let report = btrfs::switch_live(&r2, &pair.live(), "app.diverged-2").unwrap();
    assert!(matches!(report.replaced, Some(Replaced::Deleted { .. })));
    assert_same_tree(&s2.path, &pair.live());

    // The standby lost its staging (emptied by hand): the reason says so.
    for s in btrfs::list_snapshots(&pair.staging()).unwrap() {
        btrfs::delete_subvolume(&s.path).unwrap();
    }
    let has = btrfs::received_uuids(&pair.staging()).unwrap();
    assert_eq!(
        btrfs::choose_parent(&pair.others(&s2), &has),
        ParentChoice::Full {
            reason: FullReason::NoSnapshotsOnStandby
        }
    );
}

#[tokio::test]
async fn nested_subvolumes_are_refused_by_name() {
    let _guard = ROOT.lock().await;
    let fs = BtrfsLoop::new(FS_MIB).unwrap();
    let vol = fs.create_subvolume("data/vol").unwrap();
    let snaps = fs.mount().join("snaps");
    std::fs::create_dir(&snaps).unwrap();
    std::fs::write(vol.join("plain"), b"x").unwrap();
    assert!(btrfs::nested_subvolumes(&vol).unwrap().is_empty());
    btrfs::check_no_nested(&vol).unwrap();

    let inner = fs.create_subvolume("data/vol/db").unwrap();
    let deep = fs.create_subvolume("data/vol/a dir/cache").unwrap();
    // A subvolume beside the volume is not nested in it.
    fs.create_subvolume("data/other").unwrap();
    let mut want = vec![inner.clone(), deep.clone()];
    want.sort();
    assert_eq!(btrfs::nested_subvolumes(&vol).unwrap(), want);
    let err = btrfs::take_snapshot(&vol, &snaps, "s1").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, BtrfsError::NestedSubvolumes { .. }), "{text}");
    assert!(!err.is_retryable());
    for part in [
        inner.to_str().unwrap(),
        deep.to_str().unwrap(),
        "own volume",
    ] {
        assert!(text.contains(part), "{text} should name {part}");
    }
    assert!(
        btrfs::list_snapshots(&snaps).unwrap().is_empty(),
        "nothing is snapshotted"
    );

    // Not a subvolume, not btrfs: typed errors.
    let plain = vol.join("a dir");
    assert!(!btrfs::is_subvolume(&plain).unwrap());
    assert!(matches!(
        btrfs::take_snapshot(&plain, &snaps, "s1"),
        Err(BtrfsError::NotASubvolume { .. })
    ));
    assert!(matches!(
        btrfs::is_subvolume(Path::new("/proc")),
        Err(BtrfsError::NotBtrfs { .. })
    ));
}

#[tokio::test]
async fn standby_changes_are_kept_aside_read_only() {
    let _guard = ROOT.lock().await;
    let pair = Pair::new();
    write_tree(&pair.vol(), 3, 8, 32 << 10);
    let s1 = pair.snapshot("s1");
    let r1 = btrfs::receive(&pair.staging(), &stream_of(&s1, None).await[..])
        .await
        .unwrap();
    btrfs::switch_live(&r1, &pair.live(), "app.diverged-1").unwrap();

    // Someone writes on the standby.
    std::fs::write(pair.live().join("local-note"), b"written on the standby").unwrap();
    std::fs::write(pair.live().join("d0/f0"), b"edited on the standby").unwrap();

    std::fs::write(pair.vol().join("d1/f1"), b"primary change").unwrap();
    let s2 = pair.snapshot("s2");
    let r2 = btrfs::receive(&pair.staging(), &stream_of(&s2, Some(&s1)).await[..])
        .await
        .unwrap();
    let report = btrfs::switch_live(&r2, &pair.live(), "app.diverged-2").unwrap();
    assert_same_tree(&s2.path, &pair.live());
    let aside = pair.standby.mount().join("services/app.diverged-2");
    match &report.replaced {
        Some(Replaced::KeptAside { path, reason, .. }) => {
            assert_eq!(path, &aside);
            assert!(
                matches!(reason, KeepReason::ChangedLocally { .. }),
                "{reason:?}"
            );
        }
        other => panic!("expected the changed live copy kept aside, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(aside.join("local-note")).unwrap(),
        b"written on the standby"
    );
    assert_eq!(
        std::fs::read(aside.join("d0/f0")).unwrap(),
        b"edited on the standby"
    );
    assert!(btrfs::subvolume_info(&aside).unwrap().readonly);
    assert!(
        std::fs::write(aside.join("more"), b"x").is_err(),
        "the kept copy is read-only"
    );
    // The diverged name is never reused: a second switch with it is refused before anything changes.
    let err = btrfs::switch_live(&r2, &pair.live(), "app.diverged-2").unwrap_err();
    assert!(matches!(err, BtrfsError::Exists { .. }), "{err}");
    assert_same_tree(&s2.path, &pair.live());

    // A change of mode alone is a change too (no data written).
    std::fs::set_permissions(
        pair.live().join("d1/f1"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let s3 = pair.snapshot("s3");
    let r3 = btrfs::receive(&pair.staging(), &stream_of(&s3, Some(&s2)).await[..])
        .await
        .unwrap();
    let report = btrfs::switch_live(&r3, &pair.live(), "app.diverged-3").unwrap();
    assert!(
        matches!(report.replaced, Some(Replaced::KeptAside { .. })),
        "{report:?}"
    );
    let kept = pair.standby.mount().join("services/app.diverged-3");
    assert_eq!(
        std::fs::metadata(kept.join("d1/f1")).unwrap().mode() & 0o777,
        0o600
    );

    // Reading files on the standby (which moves access times, and so the generation) is not a change:
    // the replaced copy is deleted, not kept.
    assert_same_tree(&s3.path, &pair.live());
    std::thread::sleep(Duration::from_millis(1100));
    assert_same_tree(&s3.path, &pair.live());
    let s4 = pair.snapshot("s4");
    let r4 = btrfs::receive(&pair.staging(), &stream_of(&s4, Some(&s3)).await[..])
        .await
        .unwrap();
    let report = btrfs::switch_live(&r4, &pair.live(), "app.diverged-4").unwrap();
    assert!(
        matches!(report.replaced, Some(Replaced::Deleted { .. })),
        "{report:?}"
    );
}

#[tokio::test]
async fn live_not_made_by_hearth_is_kept_and_a_plain_folder_refused() {
    let _guard = ROOT.lock().await;
    let pair = Pair::new();
    write_tree(&pair.vol(), 4, 4, 8 << 10);
    let s1 = pair.snapshot("s1");
    let r1 = btrfs::receive(&pair.staging(), &stream_of(&s1, None).await[..])
        .await
        .unwrap();

    // A plain folder at the live path (data from before hearth): refused, untouched.
    std::fs::create_dir(pair.live()).unwrap();
    std::fs::write(pair.live().join("old"), b"old data").unwrap();
    let err = btrfs::switch_live(&r1, &pair.live(), "app.diverged-1").unwrap_err();
    assert!(matches!(err, BtrfsError::LiveNotSubvolume { .. }), "{err}");
    assert_eq!(std::fs::read(pair.live().join("old")).unwrap(), b"old data");
    std::fs::remove_dir_all(pair.live()).unwrap();

    // A subvolume hearth did not make (say, from an old `btrfs receive` timer): kept aside, not deleted.
    pair.standby.create_subvolume("services/app").unwrap();
    std::fs::write(pair.live().join("old"), b"old data").unwrap();
    let report = btrfs::switch_live(&r1, &pair.live(), "app.diverged-1").unwrap();
    match report.replaced {
        Some(Replaced::KeptAside { path, reason, .. }) => {
            assert_eq!(reason, KeepReason::NotMadeByHearth);
            assert_eq!(std::fs::read(path.join("old")).unwrap(), b"old data");
        }
        other => panic!("expected kept aside, got {other:?}"),
    }
    assert_same_tree(&s1.path, &pair.live());
}

#[tokio::test]
async fn interrupted_receives_are_cleaned_and_the_next_full_receive_works() {
    let _guard = ROOT.lock().await;
    let pair = Pair::new();
    write_tree(&pair.vol(), 5, 20, 256 << 10);
    let s1 = pair.snapshot("s1");
    let full = stream_of(&s1, None).await;

    // Cut in the middle of a command.
    let err = btrfs::receive(&pair.staging(), &full[..full.len() / 2])
        .await
        .unwrap_err();
    assert!(matches!(err, BtrfsError::BadStream { .. }), "{err}");
    assert!(err.is_retryable());
    // Cut exactly before the end command: `btrfs receive` alone would take this for a whole snapshot.
    let err = btrfs::receive(&pair.staging(), &full[..full.len() - 10]).await;
    // The first partial is still there under the same name, so receive may also fail on that; either
    // way nothing may be finalised.
    assert!(err.is_err());
    assert!(btrfs::received_uuids(&pair.staging()).unwrap().is_empty());
    let partial = btrfs::list_snapshots(&pair.staging()).unwrap();
    assert_eq!(partial.len(), 1, "{partial:?}");
    assert!(!partial[0].readonly);
    let cleaned = btrfs::clean_partial_receives(&pair.staging()).unwrap();
    assert_eq!(cleaned, vec![pair.staging().join("s1")]);
    assert!(btrfs::list_snapshots(&pair.staging()).unwrap().is_empty());

    let err = btrfs::receive(&pair.staging(), &full[..full.len() - 10])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("before its end command"), "{err}");
    assert!(btrfs::received_uuids(&pair.staging()).unwrap().is_empty());
    assert_eq!(
        btrfs::clean_partial_receives(&pair.staging())
            .unwrap()
            .len(),
        1
    );

    // Killed mid-stream: the receive is dropped while its input stalls (a dead link).
    let (mut tx, rx) = tokio::io::duplex(64 << 10);
    let half = full[..full.len() / 2].to_vec();
    let feeder = async move {
        use tokio::io::AsyncWriteExt;
        tx.write_all(&half).await.unwrap();
        // Keep the link open and silent.
        std::future::pending::<()>().await;
    };
    let staging = pair.staging();
    let outcome = tokio::time::timeout(Duration::from_secs(3), async {
        tokio::join!(feeder, btrfs::receive(&staging, rx)).1
    })
    .await;
    assert!(outcome.is_err(), "the receive must still be waiting");
    // The dropped receive's process is killed; its partial subvolume is cleaned once it is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let cleaned = loop {
        match btrfs::clean_partial_receives(&pair.staging()) {
            Ok(c) if !c.is_empty() => break c,
            other if std::time::Instant::now() > deadline => {
                panic!("no partial cleaned: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(cleaned, vec![pair.staging().join("s1")]);

    // And the next full receive works.
    let r1 = btrfs::receive(&pair.staging(), &full[..]).await.unwrap();
    assert_eq!(
        btrfs::received_uuids(&pair.staging()).unwrap(),
        vec![s1.uuid.clone()]
    );
    btrfs::switch_live(&r1, &pair.live(), "app.diverged-1").unwrap();
    assert_same_tree(&s1.path, &pair.live());
}

#[tokio::test]
async fn corrupted_stream_is_rejected_and_live_untouched() {
    let _guard = ROOT.lock().await;
    let pair = Pair::new();
    write_tree(&pair.vol(), 6, 6, 128 << 10);
    let s1 = pair.snapshot("s1");
    let r1 = btrfs::receive(&pair.staging(), &stream_of(&s1, None).await[..])
        .await
        .unwrap();
    btrfs::switch_live(&r1, &pair.live(), "app.diverged-1").unwrap();
    let before = tree(&pair.live());

    write_tree(&pair.vol(), 7, 6, 128 << 10);
    let s2 = pair.snapshot("s2");
    let good = stream_of(&s2, Some(&s1)).await;
    // Flip bytes in the data of a few places after the header (each command carries a crc32c).
    for at in [good.len() / 3, good.len() / 2, good.len() * 2 / 3] {
        let mut bad = good.clone();
        bad[at] ^= 0xff;
        let err = btrfs::receive(&pair.staging(), &bad[..]).await.unwrap_err();
        assert!(
            matches!(
                err,
                BtrfsError::Command { .. } | BtrfsError::BadStream { .. }
            ),
            "{err}"
        );
        assert_eq!(
            tree(&pair.live()),
            before,
            "live changed after a bad stream"
        );
        assert_eq!(
            btrfs::received_uuids(&pair.staging()).unwrap(),
            vec![s1.uuid.clone()]
        );
        assert_eq!(
            btrfs::clean_partial_receives(&pair.staging())
                .unwrap()
                .len(),
            1
        );
    }
    // Not a stream at all.
    let err = btrfs::receive(&pair.staging(), &b"hello, this is not btrfs"[..])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");

    let r2 = btrfs::receive(&pair.staging(), &good[..]).await.unwrap();
    btrfs::switch_live(&r2, &pair.live(), "app.diverged-2").unwrap();
    assert_same_tree(&s2.path, &pair.live());
}

#[tokio::test]
async fn send_fails_loudly_and_can_be_cancelled() {
    let _guard = ROOT.lock().await;
    let pair = Pair::new();
    write_tree(&pair.vol(), 8, 30, 1 << 20);
    let s1 = pair.snapshot("s1");

    // Cancelled after the first bytes: the process is gone afterwards.
    let mut send = btrfs::send(&s1, None).unwrap();
    let pid = send.pid().unwrap();
    let mut first = [0u8; 4096];
    send.read_exact(&mut first).await.unwrap();
    assert_eq!(&first[..13], b"btrfs-stream\0");
    send.cancel().await.unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "btrfs send {pid} survived"
    );

    // Dropped unread: killed too.
    let send = btrfs::send(&s1, None).unwrap();
    let pid = send.pid().unwrap();
    drop(send);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}/status")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .contains("zombie")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "btrfs send {pid} survived its drop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A snapshot that vanished: the failure carries btrfs's own words.
    let gone = s1.clone();
    btrfs::delete_subvolume(&s1.path).unwrap();
    let mut send = btrfs::send(&gone, None).unwrap();
    let mut sink = Vec::new();
    let _ = send.read_to_end(&mut sink).await;
    let err = send.finish().await.unwrap_err();
    match &err {
        BtrfsError::Command { stderr, .. } => assert!(!stderr.is_empty(), "{err}"),
        other => panic!("expected a command failure, got {other}"),
    }

    // Writable subvolumes are refused before anything runs.
    let vol = btrfs::subvolume_info(&pair.vol()).unwrap();
    assert!(matches!(
        btrfs::send(&vol, None),
        Err(BtrfsError::NotReadOnly { .. })
    ));
}

#[tokio::test]
async fn interrupted_switch_is_settled_by_the_next_one() {
    let _guard = ROOT.lock().await;
    let pair = Pair::new();
    write_tree(&pair.vol(), 9, 6, 16 << 10);
    let s1 = pair.snapshot("s1");
    let r1 = btrfs::receive(&pair.staging(), &stream_of(&s1, None).await[..])
        .await
        .unwrap();
    let first = btrfs::switch_live(&r1, &pair.live(), "app.diverged-1").unwrap();

    // A switch to s2 that stopped right after the exchange: the next copy was made and recorded as
    // `next`, exchanged with the live copy, and then the process died.
    std::fs::write(pair.vol().join("second"), b"2").unwrap();
    let s2 = pair.snapshot("s2");
    let r2 = btrfs::receive(&pair.staging(), &stream_of(&s2, Some(&s1)).await[..])
        .await
        .unwrap();
    let names = btrfs::LiveNames::new(&pair.live()).unwrap();
    let status = std::process::Command::new("btrfs")
        .args(["subvolume", "snapshot"])
        .arg(&r2.path)
        .arg(&names.next)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    btrfs::sync_filesystem(&names.next).unwrap();
    let next = btrfs::subvolume_info(&names.next).unwrap();
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&names.state).unwrap()).unwrap();
    assert_eq!(state["live"]["uuid"], first.live.uuid.as_str());
    state["next"] = serde_json::json!({
        "uuid": next.uuid,
        "generation": next.generation,
        "source": r2.received_uuid,
    });
    std::fs::write(&names.state, serde_json::to_vec(&state).unwrap()).unwrap();
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        &names.next,
        rustix::fs::CWD,
        pair.live(),
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .unwrap();

    // The next switch finishes the job: the old live copy left at the hidden name was unchanged, so it
    // is deleted, and the copy of s2 it replaces now is too.
    std::fs::write(pair.vol().join("third"), b"3").unwrap();
    let s3 = pair.snapshot("s3");
    let r3 = btrfs::receive(&pair.staging(), &stream_of(&s3, Some(&s2)).await[..])
        .await
        .unwrap();
    let report = btrfs::switch_live(&r3, &pair.live(), "app.diverged-3").unwrap();
    assert_eq!(
        report.leftover,
        Some(Replaced::Deleted {
            uuid: first.live.uuid.clone()
        })
    );
    assert_eq!(
        report.replaced,
        Some(Replaced::Deleted {
            uuid: next.uuid.clone()
        })
    );
    assert_same_tree(&s3.path, &pair.live());
    assert!(!names.next.exists());

    // Something hearth has no record of at the hidden name is kept, read-only, never deleted.
    pair.standby
        .create_subvolume(names.next.strip_prefix(pair.standby.mount()).unwrap())
        .unwrap();
    std::fs::write(names.next.join("mine"), b"someone's data").unwrap();
    std::fs::write(pair.vol().join("fourth"), b"4").unwrap();
    let s4 = pair.snapshot("s4");
    let r4 = btrfs::receive(&pair.staging(), &stream_of(&s4, Some(&s3)).await[..])
        .await
        .unwrap();
    let report = btrfs::switch_live(&r4, &pair.live(), "app.diverged-4").unwrap();
    let kept = pair
        .standby
        .mount()
        .join("services/app.diverged-4.interrupted");
    match &report.leftover {
        Some(Replaced::KeptAside { path, reason, .. }) => {
            assert_eq!(path, &kept);
            assert_eq!(reason, &KeepReason::NotMadeByHearth);
        }
        other => panic!("expected the unknown leftover kept, got {other:?}"),
    }
    assert_eq!(std::fs::read(kept.join("mine")).unwrap(), b"someone's data");
    assert!(btrfs::subvolume_info(&kept).unwrap().readonly);
    assert!(matches!(report.replaced, Some(Replaced::Deleted { .. })));
    assert_same_tree(&s4.path, &pair.live());
}

#[tokio::test]
async fn the_kernel_facts_equal_what_subvolume_show_prints() {
    let _guard = ROOT.lock().await;
    let pair = Pair::new();
    write_tree(&pair.vol(), 7, 5, 1 << 12);
    let s1 = pair.snapshot("s1");
    let full = stream_of(&s1, None).await;
    let r1 = btrfs::receive(&pair.staging(), &full[..]).await.unwrap();
    btrfs::switch_live(&r1, &pair.live(), "app.diverged-1").unwrap();
    // A plain subvolume, a read-only snapshot, a received snapshot and a writable snapshot of it.
    for path in [pair.vol(), s1.path.clone(), r1.path.clone(), pair.live()] {
        let by_ioctl = btrfs::subvolume_info(&path).unwrap();
        let by_show = btrfs::subvolume_show(&path).unwrap();
        assert!(by_ioctl.fs_path.is_none() && by_show.fs_path.is_some());
        // `show` prints the creation time in local time; the ioctl's is formatted in UTC.
        assert!(by_ioctl.created.is_some(), "{by_ioctl:?}");
        // `show` does not print the ctransid; the first copy's test checks it against `receive`.
        assert!(by_ioctl.ctransid.is_some() && by_show.ctransid.is_none());
        let plain = |i: SubvolInfo| SubvolInfo {
            fs_path: None,
            created: None,
            ctransid: None,
            ..i
        };
        assert_eq!(plain(by_ioctl), plain(by_show), "{}", path.display());
    }
    assert!(btrfs::subvolume_info(&pair.primary.mount().join("snaps")).is_err());
}
