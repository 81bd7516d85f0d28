//! `hearth volume` as a user runs it: real processes, real TLS on loopback. The crash test kills
//! either side with SIGKILL at random points of a transfer, many times, and checks that the
//! standby always holds one whole snapshot of the primary and that the next push completes.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

fn hearth() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hearth"));
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    hearth().args(args).output().unwrap()
}

fn keygen(dir: &Path) -> String {
    let out = run(&["volume", "keygen", "--identity", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

struct Setup {
    root: PathBuf,
    src: PathBuf,
    live: PathBuf,
    p_id: String,
    s_id: String,
    port: u16,
}

impl Setup {
    fn new(root: &Path) -> Setup {
        Setup::with_paths(root, root.join("src"), root.join("standby/data"))
    }

    /// A set-up whose volume is `src` (which must exist or is created) and whose standby copy is
    /// `live` (its parent is created).
    fn with_paths(root: &Path, src: PathBuf, live: PathBuf) -> Setup {
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(live.parent().unwrap()).unwrap();
        let p_id = keygen(&root.join("pk"));
        let s_id = keygen(&root.join("sk"));
        let port = hearth_testkit::free_port().unwrap();
        Setup {
            root: root.to_owned(),
            live,
            src,
            p_id,
            s_id,
            port,
        }
    }

    fn serve(&self) -> Child {
        self.serve_with(&[])
    }

    fn serve_with(&self, extra: &[&str]) -> Child {
        let child = hearth()
            .args(["volume", "serve", "--identity"])
            .arg(self.root.join("sk"))
            .arg("--state")
            .arg(self.root.join("sstate"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--allow", &self.p_id])
            .arg("--volume")
            .arg(format!("data={}", self.live.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until it listens.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "serve did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn push_cmd(&self, extra: &[&str]) -> Command {
        let mut c = hearth();
        c.args(["volume", "push", "--identity"])
            .arg(self.root.join("pk"))
            .arg("--state")
            .arg(self.root.join("pstate"))
            .arg("--volume")
            .arg(format!("data={}", self.src.display()))
            .args(["--to", &format!("127.0.0.1:{}={}", self.port, self.s_id)])
            .args(extra);
        c
    }

    fn push(&self, extra: &[&str]) -> Output {
        self.push_cmd(extra).output().unwrap()
    }
}

/// What must survive replication, read with plain `std::fs`: kind, mode, content, link target.
type Tree = BTreeMap<String, (u32, Vec<u8>)>;

fn tree(root: &Path) -> Option<Tree> {
    if !root.exists() {
        return None;
    }
    let mut out = Tree::new();
    for e in walkdir::WalkDir::new(root).sort_by_file_name() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        let body = if md.is_file() {
            fs::read(e.path()).unwrap()
        } else if md.file_type().is_symlink() {
            fs::read_link(e.path())
                .unwrap()
                .display()
                .to_string()
                .into_bytes()
        } else {
            Vec::new()
        };
        out.insert(rel, (md.permissions().mode(), body));
    }
    Some(out)
}

/// A digest of a tree, so that many versions can be remembered without keeping their bytes.
fn digest(t: &Tree) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

fn kill9(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn push_status_verify_and_refusals_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let s = Setup::new(dir.path());
    fs::write(s.src.join("config.yml"), b"a: 1\n").unwrap();
    fs::create_dir(s.src.join("db")).unwrap();
    fs::write(s.src.join("db/data"), vec![3u8; 300_000]).unwrap();
    let mut serve = s.serve();

    let out = s.push(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(": full "), "{stdout}");
    assert_eq!(tree(&s.live), tree(&s.src));

    // status on both sides, human and JSON.
    let out = run(&[
        "volume",
        "status",
        "--state",
        dir.path().join("pstate").to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let standby = &v[0]["primary"]["standbys"][0];
    assert_eq!(standby["full_syncs"], 1);
    assert!(standby["lag_seconds"].as_f64().unwrap() < 60.0);
    let out = run(&[
        "volume",
        "status",
        "--state",
        dir.path().join("sstate").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("standby: epoch 1, live "), "{text}");

    // verify: equal, then a change on the standby is reported with exit code 1.
    let verify = |s: &Setup| {
        hearth()
            .args(["volume", "verify", "--identity"])
            .arg(s.root.join("pk"))
            .arg("--state")
            .arg(s.root.join("pstate"))
            .arg("--volume")
            .arg(format!("data={}", s.src.display()))
            .args(["--to", &format!("127.0.0.1:{}={}", s.port, s.s_id)])
            .output()
            .unwrap()
    };
    let out = verify(&s);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    fs::write(s.live.join("config.yml"), b"a: 2\n").unwrap();
    let out = verify(&s);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("differs: /config.yml"));

    // A lower epoch is refused with exit code 1 and a message naming both epochs. The push at
    // epoch 3 has nothing new, but the standby's watch saw config.yml edited there: the edited
    // tree is kept aside (and named in the output) and the primary's restored.
    let out = s.push(&["--epoch", "3"]);
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("hearth-diverged"), "{all}");
    // verify presents the epoch of the last push (3), so it is not refused as an older primary.
    let out = verify(&s);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("differs"));
    let out = s.push(&["--epoch", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("epoch 2 is lower than epoch 3"), "{err}");

    // Bad input: exit code 2 and a message naming the fix.
    for (args, needle) in [
        (vec!["--volume", "data"], "expected NAME=PATH"),
        (vec!["--volume", "../x=/tmp"], "not a usable volume name"),
    ] {
        let out = hearth()
            .args(["volume", "push", "--identity"])
            .arg(s.root.join("pk"))
            .args(&args)
            .args(["--to", &format!("127.0.0.1:{}={}", s.port, s.s_id)])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}"
        );
    }
    let out = s
        .push_cmd(&[])
        .args(["--to", "127.0.0.1:1=hv1-nothex"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a peer id"));
    let out = run(&[
        "volume",
        "push",
        "--identity",
        "/nonexistent",
        "--volume",
        "a=/tmp",
        "--to",
        "x:1=hv1-00",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("hearth volume keygen"));
    kill9(&mut serve);
}

#[test]
fn kill_9_either_side_during_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let s = Setup::new(dir.path());
    kill_cycles(&s, crash_cycles(40), &[]);
}

/// With `--no-in-place` every apply is a build beside the live tree and one atomic exchange, so
/// the live path shows one whole version at every instant, even before `serve` is started again.
#[test]
fn kill_9_either_side_during_transfers_with_whole_tree_swaps() {
    let dir = tempfile::tempdir().unwrap();
    let s = Setup::new(dir.path());
    kill_cycles(&s, crash_cycles(20), &["--no-in-place"]);
}

#[test]
fn kill_9_either_side_during_btrfs_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let primary = hearth_testkit::btrfs::BtrfsLoop::new(1024).unwrap();
    let standby = hearth_testkit::btrfs::BtrfsLoop::new(1024).unwrap();
    let src = primary.create_subvolume("vol").unwrap();
    let s = Setup::with_paths(dir.path(), src, standby.mount().join("data/data"));
    kill_cycles(&s, crash_cycles(20), &[]);
    // Every push went the btrfs way: the standby holds received snapshots, and no chunk store.
    assert!(standby.mount().join("data/.data.hearth-received").is_dir());
    assert!(
        !dir.path().join("sstate/data/store/chunks").exists()
            || walkdir::WalkDir::new(dir.path().join("sstate/data/store/chunks"))
                .into_iter()
                .filter(|e| e.as_ref().is_ok_and(|e| e.file_type().is_file()))
                .count()
                == 0
    );
}

/// Cycles from `HEARTH_VOLUME_CRASH_CYCLES`, else `default`.
fn crash_cycles(default: usize) -> usize {
    std::env::var("HEARTH_VOLUME_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Pushes from `s.src` to `s.live` `cycles` times, killing either side with SIGKILL at a random
/// moment of each push, and checks that the standby always holds one whole version of the primary
/// and that a final push completes. `serve_args` go to every `serve`. Without `--no-in-place`, a
/// change applied in place that a kill cut short is completed when `serve` starts again, before
/// it listens; the check then comes after that start.
fn kill_cycles(s: &Setup, cycles: usize, serve_args: &[&str]) {
    let whole = serve_args.contains(&"--no-in-place");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // About 24 MB in 60 files of random bytes plus small files, so a push takes long enough to
    // be cut in every phase (capture, offer, chunks, apply).
    for i in 0..60 {
        let d = s.src.join(format!("d{}", i % 6));
        fs::create_dir_all(&d).unwrap();
        let mut body = vec![0u8; 400_000];
        rng.fill(&mut body[..]);
        fs::write(d.join(format!("f{i}")), body).unwrap();
        fs::write(d.join(format!("small{i}")), format!("small {i}")).unwrap();
    }
    let mut versions = vec![digest(&tree(&s.src).unwrap())];
    let mut serve = Some(s.serve_with(serve_args));
    let mut kills = (0, 0);
    let mut mid_transfer = 0;
    // How long to let a push run before the kill, at most. It adapts to how long pushes take on
    // this machine and backend: shorter after a push that was already done, longer after one
    // that was still running, so that kills keep landing inside transfers.
    let mut window_ms = 700.0f64;
    for cycle in 0..cycles {
        let mut push = s
            .push_cmd(&[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(
            rng.random_range(0..window_ms.max(20.0) as u64),
        ));
        if push.try_wait().unwrap().is_none() {
            mid_transfer += 1;
            window_ms = (window_ms * 1.1).min(3000.0);
        } else {
            window_ms *= 0.7;
        }
        if rng.random_bool(0.5) {
            kill9(&mut push);
            kills.0 += 1;
        } else {
            if let Some(mut c) = serve.take() {
                kill9(&mut c);
            }
            let _ = push.wait();
            kills.1 += 1;
        }
        // A standby whose primary died may still be applying the tree it had received in full;
        // wait until it lets go of the volume's lock, then look.
        let lock = s.root.join("sstate/data/lock");
        if lock.exists() {
            let ok = Command::new("flock")
                .args(["-w", "60"])
                .arg(&lock)
                .arg("true")
                .status()
                .unwrap();
            assert!(
                ok.success(),
                "the standby kept the volume locked for a minute"
            );
        }
        if serve.is_none() && !whole {
            serve = Some(s.serve_with(serve_args));
        }
        // The standby holds nothing yet, or exactly one whole version of the primary.
        if let Some(t) = tree(&s.live) {
            assert!(
                versions.contains(&digest(&t)),
                "cycle {cycle}: the standby holds a tree that is no primary snapshot"
            );
        }
        if serve.is_none() {
            serve = Some(s.serve_with(serve_args));
        }
        // Change the primary before every cycle, so every push has work to do: a new file of
        // 3 MB of fresh bytes, part of an old file rewritten, a small file removed.
        let mut body = vec![0u8; 3_000_000];
        rng.fill(&mut body[..]);
        fs::write(s.src.join(format!("new{cycle}")), body).unwrap();
        if cycle > 0 {
            let _ = fs::remove_file(s.src.join(format!("new{}", cycle - 1)));
        }
        let victim = s.src.join(format!("d{}/f{}", cycle % 6, cycle % 60));
        if let Ok(mut body) = fs::read(&victim) {
            let at = rng.random_range(0..body.len() - 1000);
            rng.fill(&mut body[at..at + 1000]);
            fs::write(&victim, body).unwrap();
        }
        let _ = fs::remove_file(s.src.join(format!("d{}/small{}", cycle % 6, cycle)));
        versions.push(digest(&tree(&s.src).unwrap()));
    }
    // With both sides up, the next push completes and the standby equals the newest version.
    let out = s.push(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree(&s.live), tree(&s.src));
    assert_eq!(Some(&digest(&tree(&s.live).unwrap())), versions.last());
    assert!(
        kills.0 > 0 && kills.1 > 0,
        "both sides were killed: {kills:?}"
    );
    assert!(
        mid_transfer * 3 >= cycles,
        "only {mid_transfer} of {cycles} kills hit a running push"
    );
    if let Some(mut c) = serve {
        kill9(&mut c);
    }
}

/// Sends signal `sig` (`TERM`, `USR1`) to process `pid` with kill(1).
fn signal(pid: u32, sig: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// GETs `/metrics` from `port` and returns the body.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// Polls `cond` for up to `secs` seconds.
fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Changes file `a`, adds `new/b`, and waits until the standby holds the changed tree.
fn change_and_wait_for_the_standby(s: &Setup) {
    fs::write(s.src.join("a"), b"two").unwrap();
    fs::create_dir(s.src.join("new")).unwrap();
    fs::write(s.src.join("new/b"), b"three").unwrap();
    assert!(
        eventually(20, || tree(&s.live) == tree(&s.src)),
        "the standby did not follow the change"
    );
}

#[test]
fn continuous_push_without_the_source_watch_follows_changes_by_its_own_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let s = Setup::new(dir.path());
    fs::write(s.src.join("a"), b"one").unwrap();
    let mut serve = s.serve();
    let mut push = s
        .push_cmd(&["--continuous", "--quiet", "300ms", "--walk-every", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(20, || tree(&s.live) == tree(&s.src)));
    change_and_wait_for_the_standby(&s);
    signal(push.id(), "TERM");
    assert!(eventually(10, || push.try_wait().unwrap().is_some()));
    kill9(&mut serve);
}

#[test]
fn continuous_push_follows_changes_and_both_sides_serve_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let s = Setup::new(dir.path());
    fs::write(s.src.join("a"), b"one").unwrap();
    let serve_metrics = hearth_testkit::free_port().unwrap();
    let push_metrics = hearth_testkit::free_port().unwrap();
    let mut serve = s.serve_with(&["--metrics", &format!("127.0.0.1:{serve_metrics}")]);
    let mut push = s
        .push_cmd(&[
            "--continuous",
            "--quiet",
            "300ms",
            "--metrics",
            &format!("127.0.0.1:{push_metrics}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first push happens at once; each change is followed after the quiet period.
    assert!(eventually(20, || fs::read(s.live.join("a"))
        .ok()
        .as_deref()
        == Some(b"one")));
    change_and_wait_for_the_standby(&s);
    let m = scrape(push_metrics);
    assert!(m.contains("hearth_volume_syncs_total{"), "{m}");
    assert!(
        m.contains("kind=\"full\"") && m.contains("kind=\"incremental\""),
        "{m}"
    );
    assert!(m.contains("hearth_volume_lag_seconds{"), "{m}");
    let m = scrape(serve_metrics);
    let applies: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("hearth_volume_applies_total{volume=\"data\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no applies counter in {m}"));
    assert!(applies >= 2, "{m}");
    // SIGTERM ends the loop cleanly.
    signal(push.id(), "TERM");
    assert!(eventually(10, || push.try_wait().unwrap().is_some()));
    assert_eq!(push.wait().unwrap().code(), Some(0));
    kill9(&mut serve);
}

#[test]
fn a_repeating_push_walks_once_then_follows_its_watch_and_wakes_on_sigusr1() {
    let dir = tempfile::tempdir().unwrap();
    let s = Setup::new(dir.path());
    fs::create_dir_all(s.src.join("conf/d")).unwrap();
    fs::write(s.src.join("conf/d/a"), b"one").unwrap();
    fs::write(s.src.join("keep"), b"kept").unwrap();
    let mut serve = s.serve();
    let log = dir.path().join("push.log");
    let metrics = hearth_testkit::free_port().unwrap();
    let mut push = s
        .push_cmd(&[
            "--every",
            "1h",
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    assert!(eventually(20, || tree(&s.live) == tree(&s.src)));
    // Changes an hour before the next pass is due: only SIGUSR1 makes it happen now.
    fs::write(s.src.join("conf/d/a"), b"two").unwrap();
    fs::create_dir(s.src.join("new")).unwrap();
    fs::write(s.src.join("new/b"), b"three").unwrap();
    fs::remove_file(s.src.join("keep")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_ne!(tree(&s.live), tree(&s.src));
    signal(push.id(), "USR1");
    assert!(
        eventually(20, || tree(&s.live) == tree(&s.src)),
        "the standby did not follow the change"
    );
    // The second pass looked only at what the watch saw change.
    let text = fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("walked the whole volume").count(), 1, "{text}");
    assert!(text.contains("woken up by SIGUSR1"), "{text}");
    let m = scrape(metrics);
    for how in ["walk_not_watching", "watched"] {
        assert!(
            m.contains(&format!(
                "hearth_volume_captures_total{{volume=\"data\",reason=\"{how}\"}} 1"
            )),
            "{m}"
        );
    }
    signal(push.id(), "TERM");
    assert!(eventually(10, || push.try_wait().unwrap().is_some()));
    kill9(&mut serve);
}
