//! `hearth volume` across a real network: three hosts as network namespaces on one bridge (root
//! only). One primary pushes to two standbys; a standby whose link is cut mid-transfer fails its
//! push without harm and catches up when the link is back; a standby reached through the wrong
//! address (another host's key) is refused.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use hearth_testkit::netns::Hosts;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

const PORT: u16 = 7431;

fn hearth_in(hosts: &Hosts, i: usize) -> std::process::Command {
    let mut c = hosts.command(i, env!("CARGO_BIN_EXE_hearth"));
    c.env("RUST_LOG", "warn");
    c
}

fn keygen(hosts: &Hosts, i: usize, dir: &Path) -> String {
    let out = hearth_in(hosts, i)
        .args(["volume", "keygen", "--identity"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

struct Standby {
    child: Child,
    live: PathBuf,
    id: String,
}

fn start_standby(hosts: &Hosts, i: usize, root: &Path, allow: &str) -> Standby {
    let dir = root.join(format!("host{i}"));
    fs::create_dir_all(dir.join("data")).unwrap();
    let id = keygen(hosts, i, &dir.join("id"));
    let live = dir.join("data/app");
    let child = hearth_in(hosts, i)
        .args(["volume", "serve", "--identity"])
        .arg(dir.join("id"))
        .arg("--state")
        .arg(dir.join("state"))
        .args(["--listen", &format!("0.0.0.0:{PORT}"), "--allow", allow])
        .arg("--volume")
        .arg(format!("app={}", live.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Standby { child, live, id }
}

fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            (
                e.path().strip_prefix(root).unwrap().display().to_string(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn one_primary_two_standbys_over_a_real_network_with_a_partition() {
    let hosts = Hosts::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let p_dir = root.join("host0");
    let src = p_dir.join("src");
    fs::create_dir_all(&src).unwrap();
    // About 8 MB of incompressible data in a few files, so a transfer takes long enough to cut.
    let mut rng = StdRng::seed_from_u64(7);
    for i in 0..8 {
        let mut body = vec![0u8; 1_000_000];
        rng.fill_bytes(&mut body);
        fs::write(src.join(format!("f{i}")), body).unwrap();
    }
    let p_id = keygen(&hosts, 0, &p_dir.join("id"));
    let mut s1 = start_standby(&hosts, 1, root, &p_id);
    let mut s2 = start_standby(&hosts, 2, root, &p_id);
    // Wait until both listen (checked from the primary's host, across the bridge).
    for i in [1, 2] {
        let addr = hosts.socket_addr(i, PORT);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = hosts
                .command(0, "bash")
                .args([
                    "-c",
                    &format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()),
                ])
                .status()
                .unwrap()
                .success();
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "standby {i} did not start listening"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let to = |i: usize, id: &str| format!("{}={id}", hosts.socket_addr(i, PORT));
    let push = |extra: &[&str]| -> Output {
        hearth_in(&hosts, 0)
            .args(["volume", "push", "--identity"])
            .arg(p_dir.join("id"))
            .arg("--state")
            .arg(p_dir.join("state"))
            .arg("--volume")
            .arg(format!("app={}", src.display()))
            .args([
                "--to",
                &to(1, &s1.id),
                "--to",
                &to(2, &s2.id),
                "--timeout",
                "3",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = push(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree(&s1.live), tree(&src));
    assert_eq!(tree(&s2.live), tree(&src));

    // The link to standby 2 is slowed to 16 Mbit/s and cut while a change (8 MB) is on its way:
    // standby 1 gets it, the push reports standby 2's failure (exit 1) after the timeout, and
    // standby 2 still holds the previous whole tree.
    let before = tree(&s2.live);
    for i in 0..8 {
        let f = src.join(format!("f{i}"));
        let mut body = fs::read(&f).unwrap();
        body.reverse();
        fs::write(&f, body).unwrap();
    }
    hosts.shape(2, 0, 16).unwrap();
    let started = Instant::now();
    let pushing = std::thread::scope(|scope| {
        let h = scope.spawn(|| push(&[]));
        std::thread::sleep(Duration::from_millis(1500));
        hosts.cut(2).unwrap();
        h.join().unwrap()
    });
    let out = pushing;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the push noticed the cut in time"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&hosts.addr(2).to_string()), "{stderr}");
    assert_eq!(tree(&s1.live), tree(&src));
    assert_eq!(
        tree(&s2.live),
        before,
        "a cut link leaves the standby's tree whole"
    );

    // Link back: the next push brings standby 2 up to date, sending only what it lacks.
    hosts.heal(2).unwrap();
    hosts.shape(2, 0, 0).unwrap();
    let out = push(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree(&s2.live), tree(&src));

    // Pointing at standby 1's address with standby 2's id: the pinned key does not match.
    let out = hearth_in(&hosts, 0)
        .args(["volume", "push", "--identity"])
        .arg(p_dir.join("id"))
        .arg("--state")
        .arg(p_dir.join("state2"))
        .arg("--volume")
        .arg(format!("app={}", src.display()))
        .args(["--to", &to(1, &s2.id)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let _ = s1.child.kill();
    let _ = s2.child.kill();
    let _ = s1.child.wait();
    let _ = s2.child.wait();
}
