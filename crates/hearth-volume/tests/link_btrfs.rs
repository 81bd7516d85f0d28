//! The `btrfs` backend over the link, on real btrfs filesystems on loop devices (root only): a full
//! then incremental sends, parent choice by UUID, a standby that lost its snapshots, a subvolume from
//! another history kept aside, nested subvolumes refused, and verify.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Standby;
use hearth_testkit::btrfs::BtrfsLoop;
use hearth_volume::CaptureOptions;
use hearth_volume::metrics::Metrics;
use hearth_volume::net::identity::Identity;
use hearth_volume::primary::{Backend, PushConfig, SyncKind, push_once, verify};

/// Loop devices are a machine-wide resource: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Sides {
    primary: BtrfsLoop,
    standby: BtrfsLoop,
    p_id: Identity,
    server: Standby,
    state: tempfile::TempDir,
}

impl Sides {
    async fn new() -> Sides {
        let primary = BtrfsLoop::new(512).unwrap();
        let standby = BtrfsLoop::new(512).unwrap();
        primary.create_subvolume("vol").unwrap();
        let p_id = Identity::generate().unwrap();
        let state = tempfile::tempdir().unwrap();
        let live = standby.mount().join("data/v");
        let server = Standby::start(live, state.path().join("standby"), &[&p_id], 2).await;
        Sides {
            primary,
            standby,
            p_id,
            server,
            state,
        }
    }

    fn src(&self) -> PathBuf {
        self.primary.mount().join("vol")
    }

    fn live(&self) -> PathBuf {
        self.standby.mount().join("data/v")
    }

    fn cfg(&self, epoch: u64, state: &str) -> PushConfig {
        PushConfig {
            backend: Backend::Auto,
            identity: self.p_id.clone(),
            volume: "v".into(),
            source: self.src(),
            state_dir: self.state.path().join(state),
            epoch,
            keep: 2,
            targets: vec![self.server.target()],
            timeout: Duration::from_secs(30),
            capture: CaptureOptions::default(),
            sender: "p".into(),
            btrfs_first_by_files: true,
            btrfs_first: None,
            watch: None,
        }
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, bytes).unwrap();
}

fn same(a: &Path, b: &Path) {
    let list = |root: &Path| -> BTreeMap<String, Vec<u8>> {
        walkdir::WalkDir::new(root)
            .into_iter()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().is_file())
            .map(|e| {
                (
                    e.path().strip_prefix(root).unwrap().display().to_string(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(list(a), list(b));
}

/// Eight files `d/f0`..`d/f7` of 1,000,000 random bytes each (so a stream or copy of them is
/// about as large as the data).
fn eight_random_megabytes(root: &Path, seed: u64) {
    let mut rng = common::seeded(seed);
    for i in 0..8 {
        write(
            root,
            &format!("d/f{i}"),
            &common::random_bytes(&mut rng, 1_000_000),
        );
    }
}

fn hidden(dir: &Path, part: &str) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_by_uuid_and_verify() {
    let _serial = SERIAL.lock().await;
    let s = Sides::new().await;
    let big: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    write(&s.src(), "db/big", &big);
    write(&s.src(), "config.yml", b"a: 1\n");
    let cfg = s.cfg(1, "p");
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let first = r.results[0].1.as_ref().unwrap().clone();
    assert_eq!(first.kind, SyncKind::Full);
    same(&s.src(), &s.live());

    write(&s.src(), "config.yml", b"a: 2\n");
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let second = r.results[0].1.as_ref().unwrap().clone();
    assert_eq!(second.kind, SyncKind::Incremental);
    assert!(
        second.bytes_sent * 20 < first.bytes_sent,
        "incremental {} vs full {}",
        second.bytes_sent,
        first.bytes_sent
    );
    same(&s.src(), &s.live());
    // The standby's live copy is writable (a service can start on it after a failover).
    assert!(!fs::metadata(s.live()).unwrap().permissions().readonly());

    // Nothing changed: no snapshot is taken and nothing is sent. (Reading the files above moved
    // their access times, a change to btrfs; the first push takes that in.)
    push_once(&cfg, &Metrics::default()).await.unwrap().results[0]
        .1
        .as_ref()
        .unwrap();
    let snapdir = s.primary.mount().join(".vol.hearth-snapshots");
    let before = hidden(&snapdir, "v.");
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let third = r.results[0].1.as_ref().unwrap().clone();
    assert_eq!(third.kind, SyncKind::Unchanged, "{third:?}");
    assert_eq!(hidden(&snapdir, "v."), before);
    // A write not yet committed by btrfs is still a change: the push commits before it looks.
    write(&s.src(), "config.yml", b"a: 3\n");
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let fourth = r.results[0].1.as_ref().unwrap().clone();
    assert_eq!(fourth.kind, SyncKind::Incremental, "{fourth:?}");
    same(&s.src(), &s.live());

    let v = verify(&cfg, &cfg.targets[0]).await.unwrap();
    assert!(v.equal(), "{v:?}");
    // Retention: at most `keep` snapshots besides the pinned one.
    let snaps = hidden(&s.primary.mount().join(".vol.hearth-snapshots"), "v.");
    assert!(snaps.len() <= 2, "{snaps:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_parent_gives_a_full_send_and_another_history_is_kept_aside() {
    let _serial = SERIAL.lock().await;
    let s = Sides::new().await;
    write(&s.src(), "a", b"one");
    let cfg = s.cfg(1, "p");
    push_once(&cfg, &Metrics::default()).await.unwrap().results[0]
        .1
        .as_ref()
        .unwrap();

    // The standby lost its received snapshots: the next send is full, and since the live subvolume
    // came from a snapshot the primary still has, it is replaced (not kept aside).
    let staging = s.standby.mount().join("data/.v.hearth-received");
    for name in hidden(&staging, "") {
        let st = std::process::Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(staging.join(&name))
            .output()
            .unwrap();
        assert!(st.status.success());
    }
    write(&s.src(), "a", b"two");
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = r.results[0].1.as_ref().unwrap();
    assert_eq!(o.kind, SyncKind::Full);
    same(&s.src(), &s.live());

    // A primary with another history (its own state and snapshots, epoch 2) sends a full stream:
    // the standby's subvolume is not in its history and is kept aside read-only, data intact.
    let before: Vec<u8> = fs::read(s.live().join("a")).unwrap();
    let snapdir = s.primary.mount().join(".vol.hearth-snapshots");
    for name in hidden(&snapdir, "") {
        let st = std::process::Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(snapdir.join(&name))
            .output()
            .unwrap();
        assert!(st.status.success());
    }
    write(&s.src(), "a", b"three");
    let other = s.cfg(2, "p2");
    let r = push_once(&other, &Metrics::default()).await.unwrap();
    let o = r.results[0].1.as_ref().unwrap();
    assert_eq!(o.kind, SyncKind::Full);
    let kept = &o.applied.as_ref().unwrap().kept_aside;
    assert_eq!(kept.len(), 1, "{kept:?}");
    let aside = PathBuf::from(&kept[0]);
    assert_eq!(fs::read(aside.join("a")).unwrap(), before);
    assert!(
        fs::write(aside.join("x"), b"no").is_err(),
        "kept aside read-only"
    );
    same(&s.src(), &s.live());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_subvolumes_are_refused_with_their_path() {
    let _serial = SERIAL.lock().await;
    let s = Sides::new().await;
    write(&s.src(), "a", b"one");
    s.primary.create_subvolume("vol/inner").unwrap();
    let err = push_once(&s.cfg(1, "p"), &Metrics::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("inner"), "{err}");
    assert!(!s.live().exists());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_backend_captures_a_subvolume_from_a_snapshot() {
    let _serial = SERIAL.lock().await;
    let s = Sides::new().await;
    write(&s.src(), "db/data", &vec![3u8; 300_000]);
    write(&s.src(), "config.yml", b"a: 1\n");
    let mut cfg = s.cfg(1, "p");
    cfg.backend = Backend::Files;
    // Files changed within 2 s of a capture are read again by the next one (the cache's racy
    // margin), which is not what this test is about.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    assert_eq!(r.results[0].1.as_ref().unwrap().kind, SyncKind::Full);
    same(&s.src(), &s.live());
    // The snapshot served one push and is gone; the standby holds a plain tree (no subvolume).
    let capture_dir = s.primary.mount().join(".vol.hearth-capture");
    assert!(hidden(&capture_dir, "").is_empty(), "snapshot left behind");
    assert!(!hearth_volume::btrfs::is_subvolume(&s.live()).unwrap());

    // Each push captures a new snapshot (a new device to `stat`), yet unchanged files are not
    // read again.
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    assert_eq!(r.results[0].1.as_ref().unwrap().kind, SyncKind::Unchanged);
    assert_eq!(r.capture.files_read, 0, "{:?}", r.capture);
    write(&s.src(), "config.yml", b"a: 2\n");
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    assert_eq!(r.results[0].1.as_ref().unwrap().kind, SyncKind::Incremental);
    assert_eq!(r.capture.files_read, 1, "{:?}", r.capture);
    same(&s.src(), &s.live());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_full_stream_resumes_where_it_stopped() {
    let _serial = SERIAL.lock().await;
    let s = Sides::new().await;
    // Random bytes, so the stream is about as large as the data: ~8 MB.
    eight_random_megabytes(&s.src(), 4242);
    let mut cfg = s.cfg(1, "p");
    // The full stream's own resumption (the default first copy goes by the files backend; see
    // `a_first_copy_by_files_resumes_after_a_cut_and_later_sends_are_incremental`).
    cfg.btrfs_first_by_files = false;
    // The link breaks after ~4 MB of the first (full) stream: nothing is live yet.
    cfg.targets[0].addr = common::relay(s.server.addr.clone(), 4_000_000, false).await;
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    assert!(r.results[0].1.is_err(), "the cut push must fail");
    assert!(!s.live().exists());

    // The volume changed meanwhile, so the next push takes a new snapshot; the cut stream of the
    // old one is finished first (only its rest travels), then the new one follows incrementally.
    write(&s.src(), "config.yml", b"changed after the cut\n");
    cfg.targets[0].addr = s.server.addr.clone();
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = r.results[0].1.as_ref().unwrap().clone();
    assert_eq!(o.kind, SyncKind::Full);
    assert!(
        o.bytes_sent < 6_000_000 && o.bytes_sent > 2_000_000,
        "resumed stream sent {} of ~8 MB",
        o.bytes_sent
    );
    same(&s.src(), &s.live());

    // A cut again, of a stream that is then made again identically (nothing changed): the part
    // held is skipped as well.
    let s2 = Sides::new().await;
    for i in 0..8 {
        let body = fs::read(s.src().join(format!("d/f{i}"))).unwrap();
        write(&s2.src(), &format!("d/f{i}"), &body);
    }
    let mut cfg2 = s2.cfg(1, "p");
    cfg2.btrfs_first_by_files = false;
    cfg2.targets[0].addr = common::relay(s2.server.addr.clone(), 4_000_000, false).await;
    assert!(
        push_once(&cfg2, &Metrics::default()).await.unwrap().results[0]
            .1
            .is_err()
    );
    cfg2.targets[0].addr = s2.server.addr.clone();
    let r = push_once(&cfg2, &Metrics::default()).await.unwrap();
    let o = r.results[0].1.as_ref().unwrap().clone();
    assert!(o.bytes_sent < 6_000_000, "sent {}", o.bytes_sent);
    same(&s2.src(), &s2.live());

    // A standby told to keep no copies (`serve --no-resume-copy`) starts a cut first sync over.
    let live3 = s2.standby.mount().join("data3/v");
    let plain = Standby::start_with(
        live3.clone(),
        s2.state.path().join("s3"),
        &[&s2.p_id],
        2,
        false,
    )
    .await;
    let mut cfg3 = s2.cfg(1, "p3");
    cfg3.btrfs_first_by_files = false;
    cfg3.targets = vec![plain.target()];
    cfg3.targets[0].addr = common::relay(plain.addr.clone(), 4_000_000, false).await;
    assert!(
        push_once(&cfg3, &Metrics::default()).await.unwrap().results[0]
            .1
            .is_err()
    );
    cfg3.targets[0].addr = plain.addr.clone();
    let r = push_once(&cfg3, &Metrics::default()).await.unwrap();
    let o = r.results[0].1.as_ref().unwrap().clone();
    assert!(o.bytes_sent > 7_000_000, "sent only {}", o.bytes_sent);
    same(&s2.src(), &live3);
    plain.stop().await;
    s2.stop().await;
    // The copy of the stream is gone once it was received whole.
    let kept: Vec<_> = fs::read_dir(s.state.path().join("standby/v"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("btrfs-partial."))
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
    s.stop().await;
}

/// A field of `btrfs subvolume show`.
fn show_field(path: &Path, key: &str) -> String {
    let out = std::process::Command::new("btrfs")
        .args(["subvolume", "show"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_copy_by_files_resumes_after_a_cut_and_later_sends_are_incremental() {
    let _serial = SERIAL.lock().await;
    let s = Sides::new().await;
    eight_random_megabytes(&s.src(), 99);
    write(&s.src(), "config.yml", b"a: 1\n");
    // Top-level names the adoption itself uses for a moment, and a root with its own metadata.
    write(&s.src(), "tree/inner", b"a folder named like the copy's");
    write(
        &s.src(),
        ".hearth-first-root.0",
        b"and a file named like its holder",
    );
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(s.src(), fs::Permissions::from_mode(0o750)).unwrap();
        xattr::set(s.src(), "user.hearth", b"root").unwrap();
    }
    let mut cfg = s.cfg(1, "p");
    // Cut after ~4 MB of the first copy: nothing is live, and no received snapshot is left.
    cfg.targets[0].addr = common::relay(s.server.addr.clone(), 4_000_000, false).await;
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    assert!(r.results[0].1.is_err(), "the cut push must fail");
    assert!(!s.live().exists());
    let staging = s.standby.mount().join("data/.v.hearth-received");
    assert!(!staging.exists() || hidden(&staging, "").is_empty());
    assert!(
        s.state
            .path()
            .join("p/btrfs-first-copy/v/capture.cache")
            .exists()
    );

    // The volume changed meanwhile: a new snapshot, whose copy reuses what arrived.
    write(&s.src(), "config.yml", b"a: 2\n");
    cfg.targets[0].addr = s.server.addr.clone();
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = r.results[0].1.as_ref().unwrap().clone();
    assert_eq!(o.kind, SyncKind::Full);
    assert!(
        o.bytes_sent < 6_000_000,
        "the resumed copy sent {} of ~8 MB",
        o.bytes_sent
    );
    same(&s.src(), &s.live());
    {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (
            fs::metadata(s.src()).unwrap(),
            fs::metadata(s.live()).unwrap(),
        );
        assert_eq!(a.mode(), b.mode());
        assert_eq!((a.mtime(), a.mtime_nsec()), (b.mtime(), b.mtime_nsec()));
        assert_eq!(
            xattr::get(s.live(), "user.hearth").unwrap().as_deref(),
            Some(&b"root"[..])
        );
    }
    // The files backend's state of first copies, kept apart from the btrfs backend's, is gone
    // once every first copy was adopted.
    assert!(!s.state.path().join("p/btrfs-first-copy/v").exists());
    // Nothing of the copy's own bookkeeping is left beside the live path.
    assert!(hidden(&s.standby.mount().join("data"), "hearth-first").is_empty());

    // The copy is recorded exactly as `btrfs receive` records a full stream of the same
    // snapshot: same received UUID, same send transid.
    let snapdir = s.primary.mount().join(".vol.hearth-snapshots");
    let names = hidden(&staging, "v.");
    assert_eq!(names.len(), 1, "{names:?}");
    let snap = snapdir.join(&names[0]);
    let copy = staging.join(&names[0]);
    assert_eq!(
        show_field(&copy, "Received UUID"),
        show_field(&snap, "UUID")
    );
    assert_eq!(show_field(&copy, "Flags"), "readonly");
    let by_receive = s.standby.mount().join("by-receive");
    fs::create_dir_all(&by_receive).unwrap();
    let mut send = std::process::Command::new("btrfs")
        .args(["send", "-q"])
        .arg(&snap)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let got = std::process::Command::new("btrfs")
        .args(["receive", "-q"])
        .arg(&by_receive)
        .stdin(send.stdout.take().unwrap())
        .status()
        .unwrap();
    assert!(got.success() && send.wait().unwrap().success());
    assert_eq!(
        show_field(&copy, "Send transid"),
        show_field(&by_receive.join(&names[0]), "Send transid")
    );

    // From here on, btrfs streams: incremental from the adopted copy.
    write(&s.src(), "config.yml", b"a: 3\n");
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = r.results[0].1.as_ref().unwrap().clone();
    assert_eq!(o.kind, SyncKind::Incremental, "{o:?}");
    assert!(o.bytes_sent < 100_000, "sent {}", o.bytes_sent);
    same(&s.src(), &s.live());

    // A cut incremental stream resumes too: the volume did not change after the cut, so the
    // next push sends the same snapshot from the same parent, after what the standby holds.
    let mut rng = common::seeded(100);
    for i in 0..8 {
        write(
            &s.src(),
            &format!("e/g{i}"),
            &common::random_bytes(&mut rng, 1_000_000),
        );
    }
    let mut cut = cfg.clone();
    cut.targets[0].addr = common::relay(s.server.addr.clone(), 4_000_000, false).await;
    assert!(
        push_once(&cut, &Metrics::default()).await.unwrap().results[0]
            .1
            .is_err()
    );
    assert!(
        !s.live().join("e").exists(),
        "a cut stream made nothing live"
    );
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = r.results[0].1.as_ref().unwrap().clone();
    assert_eq!(o.kind, SyncKind::Incremental, "{o:?}");
    assert!(
        o.bytes_sent < 6_000_000 && o.bytes_sent > 2_000_000,
        "the resumed incremental stream sent {} of ~8 MB",
        o.bytes_sent
    );
    same(&s.src(), &s.live());
    let v = verify(&cfg, &cfg.targets[0]).await.unwrap();
    assert!(v.equal(), "{v:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_copy_by_files_is_refused_unless_the_standby_is_empty() {
    use hearth_volume::net::NetError;
    use hearth_volume::net::wire::{BtrfsFirst, Hello, PROTOCOL_VERSION, RefusalCode};
    let _serial = SERIAL.lock().await;
    let s = Sides::new().await;
    let first = |name: &str| Hello {
        protocol: PROTOCOL_VERSION,
        volume: "v".into(),
        epoch: 1,
        sender: "raw".into(),
        btrfs_first: Some(BtrfsFirst {
            uuid: "0f0e0d0c-0b0a-0908-0706-050403020100".into(),
            ctransid: 7,
            name: name.into(),
            history: Vec::new(),
        }),
    };
    let refused = |r: Result<_, NetError>, needle: &str| match r {
        Err(NetError::Refused(refusal)) => {
            assert_eq!(refusal.code, RefusalCode::BadRequest, "{refusal:?}");
            assert!(refusal.message.contains(needle), "{refusal:?}");
        }
        Err(e) => panic!("expected a refusal naming {needle:?}, got {e}"),
        Ok(_) => panic!("expected a refusal naming {needle:?}"),
    };
    let target = s.server.target();
    let t = Duration::from_secs(10);
    // A name that is not one path component is refused before anything is created.
    refused(
        hearth_volume::primary::connect(&s.p_id, &target, first("../x"), t).await,
        "not a snapshot name",
    );
    assert!(hidden(&s.standby.mount().join("data"), "hearth-first").is_empty());
    // Something in the live path (a folder the service already wrote to).
    write(&s.live(), "mine.txt", b"keep me");
    refused(
        hearth_volume::primary::connect(&s.p_id, &target, first("v.1"), t).await,
        "exists",
    );
    // Once it is gone, the standby takes a first copy.
    fs::remove_dir_all(s.live()).unwrap();
    write(&s.src(), "a", b"one");
    let r = push_once(&s.cfg(1, "p"), &Metrics::default())
        .await
        .unwrap();
    assert_eq!(r.results[0].1.as_ref().unwrap().kind, SyncKind::Full);
    same(&s.src(), &s.live());
    // A standby that holds received snapshots takes no first copy either.
    refused(
        hearth_volume::primary::connect(&s.p_id, &target, first("v.2"), t).await,
        "already holds received snapshots",
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_copy_never_deletes_what_was_kept_aside_and_a_missing_live_copy_comes_back() {
    let _serial = SERIAL.lock().await;
    let s = Sides::new().await;
    write(&s.src(), "config.yml", b"a: 1\n");
    eight_random_megabytes(&s.src(), 7);
    // Something kept aside in the first-copy subvolume (as the files backend does with a tree
    // from another history): the adoption must not delete it.
    let data = s.standby.mount().join("data");
    fs::create_dir_all(&data).unwrap();
    let sub = data.join(".v.hearth-first");
    assert!(
        std::process::Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(&sub)
            .status()
            .unwrap()
            .success()
    );
    write(&sub, ".tree.hearth-diverged.e1.1/keep.txt", b"kept aside");
    let cfg = s.cfg(1, "p");
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let err = r.results[0].1.as_ref().unwrap_err().to_string();
    assert!(err.contains("besides the first copy"), "{err}");
    assert!(!s.live().exists());
    assert_eq!(
        fs::read(sub.join(".tree.hearth-diverged.e1.1/keep.txt")).unwrap(),
        b"kept aside"
    );

    // Moved away, the copy that arrived whole is adopted without being sent again.
    fs::remove_dir_all(sub.join(".tree.hearth-diverged.e1.1")).unwrap();
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = r.results[0].1.as_ref().unwrap().clone();
    assert_eq!(o.kind, SyncKind::Full, "{o:?}");
    assert!(o.bytes_sent < 100_000, "sent {} again", o.bytes_sent);
    same(&s.src(), &s.live());

    // The live copy deleted by hand comes back from the newest received snapshot at the next
    // connection, before the primary is told anything. (Reading the files above moved their
    // access times, a change to btrfs: one push takes that in, so the last one has nothing new.)
    push_once(&cfg, &Metrics::default()).await.unwrap().results[0]
        .1
        .as_ref()
        .unwrap();
    assert!(
        std::process::Command::new("btrfs")
            .args(["-q", "subvolume", "delete"])
            .arg(s.live())
            .status()
            .unwrap()
            .success()
    );
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    let o = r.results[0].1.as_ref().unwrap().clone();
    assert_eq!(o.kind, SyncKind::Unchanged, "{o:?}");
    same(&s.src(), &s.live());
    assert!(!fs::metadata(s.live()).unwrap().permissions().readonly());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_first_copy_is_deleted_once_a_full_stream_made_the_volume_live() {
    let _serial = SERIAL.lock().await;
    let s = Sides::new().await;
    eight_random_megabytes(&s.src(), 5);
    let mut cfg = s.cfg(1, "p");
    cfg.targets[0].addr = common::relay(s.server.addr.clone(), 4_000_000, false).await;
    assert!(
        push_once(&cfg, &Metrics::default()).await.unwrap().results[0]
            .1
            .is_err()
    );
    let data = s.standby.mount().join("data");
    assert_eq!(hidden(&data, "hearth-first"), vec![".v.hearth-first"]);
    cfg.targets[0].addr = s.server.addr.clone();
    cfg.btrfs_first_by_files = false;
    let r = push_once(&cfg, &Metrics::default()).await.unwrap();
    assert_eq!(r.results[0].1.as_ref().unwrap().kind, SyncKind::Full);
    same(&s.src(), &s.live());
    assert!(hidden(&data, "hearth-first").is_empty());
    s.stop().await;
}
