//! The volume link end to end on loopback with real TLS: a standby served in-process, pushes from
//! a primary, and every refusal the issue lists (wrong key, unknown volume, lower epoch, a path
//! outside the volume, a corrupted chunk), resumption after a cut link, divergence and verify.

#![allow(clippy::unwrap_used)]

mod common;

use common::Standby;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_volume::delta::ManifestDelta;
use hearth_volume::metrics::Metrics;
use hearth_volume::net::NetError;
use hearth_volume::net::identity::Identity;
use hearth_volume::net::wire::{Hello, Offer, PROTOCOL_VERSION, RefusalCode, Request, Response};
use hearth_volume::primary::{Backend, PushConfig, SyncKind, Target, connect, push_once, verify};
use hearth_volume::state::{self, VolumeDirs};
use hearth_volume::{CaptureOptions, Entry, EntryKind, Manifest, TreeHash};

/// The in-process standby of these tests: volume `v` at `<dir>/standby/data/v`.
async fn start_standby(dir: &Path, allowed: &[&Identity]) -> Standby {
    Standby::start(
        dir.join("standby/data/v"),
        dir.join("standby/state"),
        allowed,
        1,
    )
    .await
}

fn primary(dir: &Path, name: &str, identity: &Identity, target: Target, epoch: u64) -> PushConfig {
    let source = dir.join(name).join("src");
    fs::create_dir_all(&source).unwrap();
    PushConfig {
        backend: Backend::Files,
        identity: identity.clone(),
        volume: "v".into(),
        source,
        state_dir: dir.join(name).join("state"),
        epoch,
        keep: 3,
        targets: vec![target],
        timeout: Duration::from_secs(20),
        capture: CaptureOptions::default(),
        sender: name.into(),
        btrfs_first_by_files: true,
        btrfs_first: None,
        watch: None,
    }
}

fn fill(root: &Path, files: usize, size: usize, seed: u8) {
    for i in 0..files {
        let dir = root.join(format!("d{}", i % 7));
        fs::create_dir_all(&dir).unwrap();
        let body: Vec<u8> = (0..size)
            .map(|j| ((j * 31 + i * 17) as u8) ^ seed ^ ((j >> 9) as u8))
            .collect();
        fs::write(dir.join(format!("f{i}")), body).unwrap();
    }
    std::os::unix::fs::symlink("d0/f0", root.join("link")).unwrap_or(());
}

fn refusal(r: Result<impl std::fmt::Debug, NetError>) -> RefusalCode {
    match r {
        Err(NetError::Refused(r)) => r.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn outcome(report: &hearth_volume::primary::PushReport) -> &hearth_volume::primary::SyncOutcome {
    match &report.results[0].1 {
        Ok(o) => o,
        Err(e) => panic!("sync failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_incremental_unchanged_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    let sb = start_standby(dir.path(), &[&p_id]).await;
    let cfg = primary(dir.path(), "p", &p_id, sb.target(), 1);
    fill(&cfg.source, 40, 50_000, 1);

    let metrics = Metrics::default();
    let r = push_once(&cfg, &metrics).await.unwrap();
    let first = outcome(&r).clone();
    assert_eq!(first.kind, SyncKind::Full);
    assert!(
        first.bytes_sent >= 40 * 50_000 / 2,
        "sent {}",
        first.bytes_sent
    );
    common::assert_same_tree(&cfg.source, &sb.live);
    assert_eq!(sb.state().epoch, 1);

    // One file changed: only its chunks travel.
    let f = cfg.source.join("d3/f3");
    let mut body = fs::read(&f).unwrap();
    body[100] ^= 0xff;
    fs::write(&f, body).unwrap();
    let r = push_once(&cfg, &metrics).await.unwrap();
    let second = outcome(&r).clone();
    assert_eq!(second.kind, SyncKind::Incremental);
    assert!(
        second.bytes_sent > 0 && second.bytes_sent <= 50_000,
        "sent {}",
        second.bytes_sent
    );
    common::assert_same_tree(&cfg.source, &sb.live);

    // Files captured within 100 ms of being written (2 s on filesystems with whole-second
    // timestamps) are read again by the next capture (the cache's racy margin). Once a capture has
    // recorded them past that margin, an unchanged tree is not read at all, and then the cache is
    // not written again either.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = push_once(&cfg, &metrics).await.unwrap();
    assert_eq!(outcome(&r).kind, SyncKind::Unchanged);
    let cache = VolumeDirs::new(&cfg.state_dir, "v").capture_cache();
    let cache_before = fs::metadata(&cache).unwrap().modified().unwrap();
    let r = push_once(&cfg, &metrics).await.unwrap();
    assert_eq!(outcome(&r).kind, SyncKind::Unchanged);
    assert_eq!(r.capture.files_read, 0);
    assert_eq!(
        fs::metadata(&cache).unwrap().modified().unwrap(),
        cache_before
    );
    assert_eq!(outcome(&r).bytes_sent, 0);

    let v = verify(&cfg, &sb.target()).await.unwrap();
    assert!(v.equal(), "{v:?}");
    // A change made on the standby behind hearth's back is found, with its path.
    fs::write(sb.live.join("d1/f1"), b"changed on the standby").unwrap();
    let v = verify(&cfg, &sb.target()).await.unwrap();
    assert!(!v.equal());
    assert_eq!(v.differences, vec!["differs: /d1/f1".to_string()], "{v:?}");

    // The primary's status knows the standby: one full, one incremental, two unchanged pushes.
    let st: state::PrimaryState =
        state::load(&VolumeDirs::new(&cfg.state_dir, "v").primary()).unwrap();
    let rec = &st.standbys[&sb.addr];
    assert_eq!(
        (rec.full_syncs, rec.incremental_syncs, rec.unchanged_syncs),
        (1, 1, 2)
    );
    assert!(rec.last_common.is_some() && rec.last_error.is_none());
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_unknown_volume_and_lower_epoch_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    let stranger = Identity::generate().unwrap();
    let sb = start_standby(dir.path(), &[&p_id]).await;
    let good = primary(dir.path(), "p", &p_id, sb.target(), 5);
    fill(&good.source, 3, 1000, 2);

    // A primary whose key the standby does not allow.
    let mut cfg = primary(dir.path(), "stranger", &stranger, sb.target(), 5);
    fill(&cfg.source, 3, 1000, 2);
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let err = r.results[0].1.as_ref().unwrap_err();
    assert!(matches!(err, NetError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("does not allow"), "{err}");
    assert!(!sb.live.exists());

    // A standby that is not the pinned one.
    cfg.identity = p_id.clone();
    cfg.targets[0].id = stranger.id();
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let err = r.results[0].1.as_ref().unwrap_err();
    assert!(matches!(err, NetError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("expected"), "{err}");

    // A volume the standby does not serve.
    let mut other = primary(dir.path(), "p2", &p_id, sb.target(), 5);
    other.volume = "nope".into();
    fill(&other.source, 1, 10, 3);
    let r = push_once(&other, &Metrics::default()).await.unwrap();
    let err = r.results.into_iter().next().unwrap().1;
    assert_eq!(refusal(err), RefusalCode::UnknownVolume);
    assert!(
        !sb.state.join("nope").exists(),
        "nothing is written for an unknown volume"
    );

    // Epoch 5 syncs; epoch 3 afterwards is refused and changes nothing.
    push_once(&good, &Metrics::default()).await.unwrap().results[0]
        .1
        .as_ref()
        .unwrap();
    let before = common::snapshot(&sb.live);
    let mut old = primary(dir.path(), "old", &p_id, sb.target(), 3);
    fill(&old.source, 2, 99, 9);
    old.epoch = 3;
    let r = push_once(&old, &Metrics::default()).await.unwrap();
    let err = r.results.into_iter().next().unwrap().1;
    match &err {
        Err(NetError::Refused(r)) => {
            assert_eq!(r.code, RefusalCode::LowerEpoch);
            assert!(
                r.message.contains("epoch 3") && r.message.contains("epoch 5"),
                "{}",
                r.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(common::snapshot(&sb.live), before);
    assert_eq!(sb.state().epoch, 5);
    sb.stop().await;
}

async fn hello(p_id: &Identity, sb: &Standby, epoch: u64) -> hearth_volume::primary::Link {
    let h = Hello {
        protocol: PROTOCOL_VERSION,
        volume: "v".into(),
        epoch,
        sender: "raw".into(),
        btrfs_first: None,
    };
    connect(p_id, &sb.target(), h, Duration::from_secs(10))
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_change_goes_as_a_delta_and_a_delta_that_does_not_fit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    let sb = start_standby(dir.path(), &[&p_id]).await;
    let cfg = primary(dir.path(), "p", &p_id, sb.target(), 1);
    fill(&cfg.source, 200, 300, 1);
    let first = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = outcome(&first);
    assert_eq!((o.kind, o.delta), (SyncKind::Full, false));
    let whole = o.manifest_bytes;
    assert!(whole > 0);

    // One file changed: the offer is a delta, a small part of the manifest.
    fs::write(cfg.source.join("d3/f3"), b"changed").unwrap();
    let second = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = outcome(&second);
    assert_eq!((o.kind, o.delta), (SyncKind::Incremental, true));
    assert!(
        o.manifest_bytes * 10 < whole,
        "{} of {whole}",
        o.manifest_bytes
    );
    let applied = o.applied.as_ref().unwrap().tree_hash;
    assert_eq!(applied.to_string(), second.snapshot.tree_hash);
    assert_eq!(common::snapshot(&sb.live), common::snapshot(&cfg.source));
    let before = common::snapshot(&sb.live);

    // Deltas the standby must refuse, each before anything is written.
    let base = hearth_volume::capture(&cfg.source, &CaptureOptions::default(), None)
        .unwrap()
        .manifest;
    assert_eq!(base.tree_hash().unwrap(), applied);
    let mut new = base.clone();
    new.entries.retain(|e| e.path != b"link");
    let delta = ManifestDelta::between(&base, &new).encode().unwrap();
    let offer = |tree_hash, parent| Offer {
        tree_hash,
        parent,
        captured_at_ms: 0,
        manifest_len: 0,
        delta: true,
    };
    let cases = [
        (
            "against a tree that is not live",
            offer(new.tree_hash().unwrap(), Some(TreeHash([9; 32]))),
            RefusalCode::InvalidManifest,
            "not the live tree here",
        ),
        (
            "rebuilt into another tree than announced",
            offer(TreeHash([1; 32]), Some(applied)),
            RefusalCode::InvalidManifest,
            "rebuilt from the delta does not have the announced tree hash",
        ),
        (
            "without the tree it is against",
            offer(new.tree_hash().unwrap(), None),
            RefusalCode::BadRequest,
            "without the tree it is against",
        ),
    ];
    for (name, offer, code, says) in cases {
        let mut link = hello(&p_id, &sb, 1).await;
        link.offer_parts(offer, &delta).await.unwrap();
        match link.recv().await.unwrap_err() {
            NetError::Refused(r) => {
                assert_eq!(r.code, code, "{name}: {}", r.message);
                assert!(r.message.contains(says), "{name}: {}", r.message);
            }
            other => panic!("{name}: {other}"),
        }
        assert_eq!(common::snapshot(&sb.live), before, "{name}");
    }

    // The same delta, announced right, is taken: the standby asks for what it lacks (nothing).
    let mut link = hello(&p_id, &sb, 1).await;
    link.offer_parts(offer(new.tree_hash().unwrap(), Some(applied)), &delta)
        .await
        .unwrap();
    match link.recv().await.unwrap() {
        Response::Want { ids, last: true } => assert!(ids.is_empty()),
        other => panic!("{other:?}"),
    }
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_volume_and_corrupted_chunks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    let sb = start_standby(dir.path(), &[&p_id]).await;

    // A manifest that names a path outside the volume.
    let entry = |path: &[u8], kind| Entry {
        path: path.to_vec(),
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        xattrs: vec![],
    };
    let evil = Manifest {
        chunking: Default::default(),
        entries: vec![
            entry(b"", EntryKind::Dir),
            entry(
                b"../escaped",
                EntryKind::Symlink {
                    target: b"/etc/passwd".to_vec(),
                },
            ),
        ],
    };
    let encoded = evil.encode().unwrap();
    let mut link = hello(&p_id, &sb, 1).await;
    link.offer(evil.tree_hash().unwrap(), None, 0, &encoded)
        .await
        .unwrap();
    let err = link.recv().await.unwrap_err();
    match err {
        NetError::Refused(r) => {
            assert_eq!(r.code, RefusalCode::InvalidManifest);
            assert!(r.message.contains("nothing was written"), "{}", r.message);
        }
        other => panic!("{other}"),
    }
    assert!(!dir.path().join("standby/data/escaped").exists());
    assert!(!sb.live.exists());

    // A device node is refused the same way.
    let dev = Manifest {
        chunking: Default::default(),
        entries: vec![
            entry(b"", EntryKind::Dir),
            entry(b"sda", EntryKind::BlockDevice { rdev: 0x800 }),
        ],
    };
    let encoded = dev.encode().unwrap();
    let mut link = hello(&p_id, &sb, 1).await;
    link.offer(dev.tree_hash().unwrap(), None, 0, &encoded)
        .await
        .unwrap();
    match link.recv().await.unwrap_err() {
        NetError::Refused(r) => {
            assert_eq!(r.code, RefusalCode::InvalidManifest);
            assert!(r.message.contains("device node"), "{}", r.message);
        }
        other => panic!("{other}"),
    }
    assert!(!sb.live.exists());

    // A chunk whose bytes do not match its id.
    let src = dir.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), vec![7u8; 70_000]).unwrap();
    let cap = hearth_volume::capture(&src, &CaptureOptions::default(), None).unwrap();
    let encoded = cap.manifest.encode().unwrap();
    let mut link = hello(&p_id, &sb, 1).await;
    link.offer(cap.manifest.tree_hash().unwrap(), None, 0, &encoded)
        .await
        .unwrap();
    let ids = match link.recv().await.unwrap() {
        Response::Want { ids, last: true } => ids,
        other => panic!("{other:?}"),
    };
    assert!(!ids.is_empty());
    let mut bad = vec![7u8; 70_000];
    bad[5] = 8;
    link.send(&Request::Chunk {
        id: ids[0],
        data: bad,
    })
    .await
    .unwrap();
    link.send(&Request::Commit).await.unwrap();
    match link.recv().await.unwrap_err() {
        NetError::Refused(r) => assert_eq!(r.code, RefusalCode::ChunkMismatch, "{}", r.message),
        other => panic!("{other}"),
    }
    let stored = VolumeDirs::new(&sb.state, "v").chunks().join("chunks");
    let n = walk_files(&stored);
    assert_eq!(n, 0, "a refused chunk is never stored");
    assert!(!sb.live.exists());
    sb.stop().await;
}

fn walk_files(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.map(|e| e.unwrap().path())
        .map(|p| if p.is_dir() { walk_files(&p) } else { 1 })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_first_sync_resumes_and_a_tampered_stream_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    let sb = start_standby(dir.path(), &[&p_id]).await;
    let mut cfg = primary(dir.path(), "p", &p_id, sb.target(), 1);
    // Random-looking content, so it does not compress or dedupe: about 6 MB.
    let mut rng = common::seeded(12345);
    for i in 0..12 {
        let body = common::random_bytes(&mut rng, 500_000);
        fs::write(cfg.source.join(format!("big{i}")), body).unwrap();
    }
    // A byte flipped inside the TLS stream breaks the record's authentication: the standby
    // drops the connection and applies nothing.
    cfg.targets[0].addr = common::relay(sb.addr.clone(), 3_000_000, true).await;
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    assert!(r.results[0].1.is_err(), "a tampered stream must fail");
    assert!(!sb.live.exists());

    // A link cut after ~3 MB: the standby keeps what arrived.
    cfg.targets[0].addr = common::relay(sb.addr.clone(), 3_000_000, false).await;
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    assert!(r.results[0].1.is_err(), "the cut push must fail");
    assert!(!sb.live.exists(), "nothing half-applied");

    // The next push over a good link sends only the rest.
    cfg.targets[0].addr = sb.addr.clone();
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = outcome(&r);
    assert!(
        o.bytes_sent < 5_000_000,
        "resumed push sent {} of ~6 MB",
        o.bytes_sent
    );
    common::assert_same_tree(&cfg.source, &sb.live);
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_from_another_history_is_kept_aside_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let a_id = Identity::generate().unwrap();
    let b_id = Identity::generate().unwrap();
    let sb = start_standby(dir.path(), &[&a_id, &b_id]).await;
    let a = primary(dir.path(), "a", &a_id, sb.target(), 1);
    fill(&a.source, 5, 3000, 4);
    push_once(&a, &Metrics::default()).await.unwrap().results[0]
        .1
        .as_ref()
        .unwrap();
    let a_tree = common::snapshot(&sb.live);

    // A new primary (epoch 2) that never saw A's tree.
    let b = primary(dir.path(), "b", &b_id, sb.target(), 2);
    fill(&b.source, 4, 2000, 5);
    let r = push_once(&b, &Metrics::default()).await.unwrap();
    let o = outcome(&r);
    assert_eq!(o.kind, SyncKind::Full);
    let kept = &o.applied.as_ref().unwrap().kept_aside;
    assert_eq!(kept.len(), 1, "{kept:?}");
    let aside = PathBuf::from(&kept[0]);
    assert!(
        aside
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .contains("diverged.e2."),
        "{aside:?}"
    );
    common::assert_same_tree(&b.source, &sb.live);
    // The old tree is intact (its top directory made read-only) and recorded in the state.
    let mode = fs::metadata(&aside).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o222, 0);
    let mut now = common::snapshot(&aside);
    // Only the top directory's mode changed.
    let top = now.nodes.get_mut(&Vec::new()).unwrap();
    top.mode = a_tree.nodes[&Vec::new()].mode;
    assert_eq!(now, a_tree);
    let st = sb.state();
    assert_eq!(st.epoch, 2);
    assert_eq!(st.kept_aside.len(), 1);
    assert!(
        st.kept_aside[0].reason.contains("history"),
        "{:?}",
        st.kept_aside
    );
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_keeps_nothing_and_lost_live_chunks_are_asked_for_again() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    let sb = start_standby(dir.path(), &[&p_id]).await;
    let cfg = primary(dir.path(), "p", &p_id, sb.target(), 1);
    let mut rng = common::seeded(99);
    let mut random = |n: usize| common::random_bytes(&mut rng, n);
    fs::write(cfg.source.join("big"), random(3_000_000)).unwrap();
    fs::write(cfg.source.join("other"), random(1_000_000)).unwrap();
    push_once(&cfg, &Metrics::default()).await.unwrap().results[0]
        .1
        .as_ref()
        .unwrap();
    let store = VolumeDirs::new(&sb.state, "v").chunks().join("chunks");
    assert_eq!(
        walk_files(&store),
        0,
        "the live tree holds the data; the store keeps none"
    );

    // A few bytes change in the middle of the big file: only the chunks around them travel,
    // the rest of the file is read from the standby's live copy.
    let mut big = fs::read(cfg.source.join("big")).unwrap();
    big[1_500_000..1_500_010].copy_from_slice(b"0123456789");
    fs::write(cfg.source.join("big"), &big).unwrap();
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = outcome(&r);
    assert_eq!(o.kind, SyncKind::Incremental);
    assert!(o.bytes_sent < 600_000, "sent {}", o.bytes_sent);
    common::assert_same_tree(&cfg.source, &sb.live);

    // Behind hearth's back the standby's copy of `other` is damaged; the primary changes `big`
    // again. The standby did not ask for `other`'s chunks (its live tree had them), finds at
    // apply that it has not, asks again, and keeps the damaged tree aside.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(sb.live.join("other"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"damage", 10).unwrap();
    drop(f);
    big[10..20].copy_from_slice(b"abcdefghij");
    fs::write(cfg.source.join("big"), &big).unwrap();
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = outcome(&r);
    // Only the damaged chunk of `other` and the changed chunk of `big` travel.
    assert!(
        o.bytes_sent > 0 && o.bytes_sent < 600_000,
        "sent {}",
        o.bytes_sent
    );
    // The damaged tree is kept aside, never deleted. Where the filesystem cannot clone (ext4),
    // unchanged files are hard links shared with the replaced tree kept from the last sync, so
    // the damage is in that tree too, and it is kept aside as well instead of being pruned.
    let kept = &o.applied.as_ref().unwrap().kept_aside;
    assert!((1..=2).contains(&kept.len()), "{o:?}");
    common::assert_same_tree(&cfg.source, &sb.live);
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_asked_for_again_beyond_what_a_small_sync_holds_go_to_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    // Holds at most one byte in memory: the second push below wants no chunk when offered (so
    // it holds), then at apply asks for a damaged file's chunks, which must be written instead.
    let sb = Standby::start_config(
        dir.path().join("standby/data/v"),
        dir.path().join("standby/state"),
        &[&p_id],
        1,
        |c| c.hold_chunks_max = 1,
    )
    .await;
    let cfg = primary(dir.path(), "p", &p_id, sb.target(), 1);
    let mut rng = common::seeded(7);
    fs::write(
        cfg.source.join("a"),
        common::random_bytes(&mut rng, 200_000),
    )
    .unwrap();
    fs::write(
        cfg.source.join("b"),
        common::random_bytes(&mut rng, 300_000),
    )
    .unwrap();
    outcome(&push_once(&cfg, &Metrics::default()).await.unwrap());
    let f = fs::OpenOptions::new()
        .write(true)
        .open(sb.live.join("b"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"damage", 100).unwrap();
    drop(f);
    // Only a time changes on the primary: no chunk is new.
    fs::File::options()
        .write(true)
        .open(cfg.source.join("a"))
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .unwrap();
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = outcome(&r);
    assert!(o.bytes_sent > 0, "the damaged chunks travel again: {o:?}");
    common::assert_same_tree(&cfg.source, &sb.live);
    let store = VolumeDirs::new(&sb.state, "v").chunks().join("chunks");
    assert_eq!(walk_files(&store), 0, "written, used and removed");
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_streams_while_capturing_and_resumes_from_what_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    let sb = start_standby(dir.path(), &[&p_id]).await;
    let mut cfg = primary(dir.path(), "p", &p_id, sb.target(), 1);
    fill(&cfg.source, 40, 150_000, 3);
    // Two files with the same content: each is streamed, and apply moves each into place.
    fs::write(cfg.source.join("twin1"), vec![9u8; 100_000]).unwrap();
    fs::write(cfg.source.join("twin2"), vec![9u8; 100_000]).unwrap();
    let incoming = sb.live.parent().unwrap().join(".v.hearth-incoming");

    // A link cut after ~2 MB of a streamed first sync: what arrived stays in the incoming
    // directory and nothing is applied.
    cfg.targets[0].addr = common::relay(sb.addr.clone(), 2_000_000, false).await;
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    assert!(r.results[0].1.is_err(), "the cut push must fail");
    assert!(!sb.live.exists(), "nothing half-applied");
    assert!(incoming.exists(), "streamed files were received");

    // The next push is not streamed (the standby is not fresh any more): the tree is offered,
    // the received files are checked by hash, and only the rest travels.
    cfg.targets[0].addr = sb.addr.clone();
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = outcome(&r);
    assert_eq!(o.kind, SyncKind::Full);
    let total = 40 * 150_000 + 200_000;
    assert!(
        o.bytes_sent + 1_000_000 < total as u64,
        "resumed push sent {} of {total}",
        o.bytes_sent
    );
    common::assert_same_tree(&cfg.source, &sb.live);
    assert!(
        !incoming.exists(),
        "received files are removed once applied"
    );

    // A fresh standby gets the whole tree streamed: every byte once, nothing via the store. (A
    // primary without a capture cache, which reads every file; with one, unchanged files are not
    // read, and their chunks go the offer's way, each distinct chunk once.)
    let dir2 = tempfile::tempdir().unwrap();
    let sb2 = start_standby(dir2.path(), &[&p_id]).await;
    cfg.targets = vec![sb2.target()];
    cfg.state_dir = dir2.path().join("primary-state");
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = outcome(&r);
    assert_eq!(o.kind, SyncKind::Full);
    assert_eq!(o.bytes_sent, total as u64, "{o:?}");
    common::assert_same_tree(&cfg.source, &sb2.live);
    assert!(
        !sb2.live
            .parent()
            .unwrap()
            .join(".v.hearth-incoming")
            .exists()
    );
    sb2.stop().await;

    // Streamed data is held to the same rules as chunks: a path outside the volume and bytes
    // that do not match their id are refused, and nothing is applied.
    let dir3 = tempfile::tempdir().unwrap();
    let sb3 = start_standby(dir3.path(), &[&p_id]).await;
    let mut link = hello(&p_id, &sb3, 1).await;
    link.send(&Request::FileBegin {
        path: b"../escaped".to_vec(),
    })
    .await
    .unwrap();
    link.send(&Request::Done).await.unwrap();
    assert_eq!(
        refusal(link.recv().await.map(|_| ())),
        RefusalCode::InvalidManifest
    );
    let mut link = hello(&p_id, &sb3, 1).await;
    let data = vec![5u8; 1000];
    let id = hearth_volume::ChunkId::of(&data);
    link.send(&Request::FileBegin {
        path: b"a".to_vec(),
    })
    .await
    .unwrap();
    let mut bad = data.clone();
    bad[0] = 6;
    link.send(&Request::FileChunk {
        offset: 0,
        id,
        data: bad,
    })
    .await
    .unwrap();
    link.send(&Request::Done).await.unwrap();
    assert_eq!(
        refusal(link.recv().await.map(|_| ())),
        RefusalCode::ChunkMismatch
    );
    assert!(!sb3.live.exists());
    sb3.stop().await;
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_whose_volume_was_deleted_is_sent_everything_again() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    let sb = start_standby(dir.path(), &[&p_id]).await;
    let cfg = primary(dir.path(), "p", &p_id, sb.target(), 1);
    fill(&cfg.source, 10, 20_000, 1);
    push_once(&cfg, &Metrics::default()).await.unwrap().results[0]
        .1
        .as_ref()
        .unwrap();
    // Someone deletes the standby's copy (`nomad volume delete`, `rm -rf`); hearth's manifest of
    // it stays behind. The standby must not claim to be in sync.
    fs::remove_dir_all(&sb.live).unwrap();
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = outcome(&r);
    assert_eq!(o.kind, SyncKind::Full, "{o:?}");
    assert_eq!(o.bytes_sent, 200_000);
    common::assert_same_tree(&cfg.source, &sb.live);
    sb.stop().await;
}

/// The kept trees (`prev`) of a volume's standby, by name, without their manifests and markers.
fn kept_trees(live: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(live.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.contains(".hearth-prev.") && !n.ends_with(".manifest") && !n.ends_with(".partial")
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_changes_are_applied_in_place_and_their_kept_trees_pruned_after_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    // keep 1: after each apply one replaced tree remains.
    let sb = start_standby(dir.path(), &[&p_id]).await;
    let cfg = primary(dir.path(), "p", &p_id, sb.target(), 1);
    fill(&cfg.source, 40, 20_000, 1);
    let metrics = Metrics::default();
    push_once(&cfg, &metrics).await.unwrap();
    for round in 0..4u8 {
        fs::write(cfg.source.join("d1/f1"), [round; 100]).unwrap();
        let r = push_once(&cfg, &metrics).await.unwrap();
        assert_eq!(outcome(&r).kind, SyncKind::Incremental);
        common::assert_same_tree(&cfg.source, &sb.live);
        // Pruning runs after the answer, under the volume's lock: wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while kept_trees(&sb.live).len() > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: {:?}",
                kept_trees(&sb.live)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let kept = kept_trees(&sb.live);
        assert_eq!(kept.len(), 1, "round {round}");
        // The kept tree of an in-place apply: only the replaced file, with its parent.
        let prev = sb.live.parent().unwrap().join(&kept[0]);
        assert!(
            prev.with_extension(format!(
                "{}.partial",
                prev.extension().unwrap().to_string_lossy()
            ))
            .exists()
        );
        let old = fs::read(prev.join("d1/f1")).unwrap();
        assert!(round == 0 || old == vec![round - 1; 100], "round {round}");
        assert_eq!(walk_files(&prev), 1, "round {round}");
    }
    assert!(sb.state().kept_aside.is_empty());
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_on_the_standby_is_reported_at_once_and_repaired_by_the_next_push() {
    let dir = tempfile::tempdir().unwrap();
    let p_id = Identity::generate().unwrap();
    let sb = start_standby(dir.path(), &[&p_id]).await;
    let cfg = primary(dir.path(), "p", &p_id, sb.target(), 1);
    fill(&cfg.source, 20, 5_000, 2);
    let metrics = Metrics::default();
    push_once(&cfg, &metrics).await.unwrap();
    let seen = || {
        sb.metrics
            .changed_on_standby
            .get_or_create(&hearth_volume::metrics::VolumeLabels { volume: "v".into() })
            .get()
    };
    // Nothing happens on the standby: nothing is reported.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(seen(), 0);
    // Someone edits the standby's copy: serve reports it within its watch period, once.
    fs::write(sb.live.join("d2/f2"), b"edited on the standby").unwrap();
    fs::write(sb.live.join("d3/f3"), b"and again").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while seen() == 0 {
        assert!(std::time::Instant::now() < deadline, "not reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(seen(), 1, "reported once");
    // The next push, with nothing new on the primary, is told the standby's copy changed: it
    // offers the same tree again, and the standby keeps its edited tree aside and restores it.
    let r = push_once(&cfg, &metrics).await.unwrap();
    assert_eq!(outcome(&r).kind, SyncKind::Incremental);
    let applied = outcome(&r).applied.clone().unwrap();
    assert_eq!(applied.kept_aside.len(), 1, "{applied:?}");
    assert_eq!(
        fs::read(Path::new(&applied.kept_aside[0]).join("d2/f2")).unwrap(),
        b"edited on the standby"
    );
    common::assert_same_tree(&cfg.source, &sb.live);
    // Restored and watched again: the push after it has nothing to do.
    let r = push_once(&cfg, &metrics).await.unwrap();
    assert_eq!(outcome(&r).kind, SyncKind::Unchanged);
    sb.stop().await;
}
