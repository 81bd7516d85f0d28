//! The `hearth sqlite` and `hearth litestream` command lines: exit codes, refusals, `run` and metrics.

// Test helpers outside #[test] bodies unwrap too: a failed step should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rusqlite::Connection;

fn hearth() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
}

fn make_db(path: &Path, rows: i64) {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..rows {
        conn.execute("INSERT INTO t (v) VALUES (?1)", [format!("row {i}")])
            .unwrap();
    }
}

fn count(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn config(dir: &Path, db: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("hearth.yml");
    std::fs::write(
        &path,
        format!(
            "{extra}dbs:\n  - path: {}\n    monitor-interval: 50ms\n    replica:\n      url: file://{}/replica\n      sync-interval: 50ms\n",
            db.display(),
            dir.display()
        ),
    )
    .unwrap();
    path
}

/// Removes `app.db` and hearth's local state for it, as a new Nomad allocation on another node starts without them.
fn forget_database(dir: &Path) {
    std::fs::remove_dir_all(dir.join(".app.db-hearth")).unwrap();
    for f in ["app.db", "app.db-wal", "app.db-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// Replicates `db` with the CLI for a moment, then stops it with SIGTERM.
fn replicate_briefly(cfg: &Path) {
    let child = hearth()
        .args(["sqlite", "replicate", "-c"])
        .arg(cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "replicate exited with {}", out.status);
}

#[test]
fn bad_configuration_and_urls_exit_2_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "yaml syntax",
            vec![
                "sqlite".into(),
                "replicate".into(),
                "-c".into(),
                "bad.yml".into(),
            ],
            "bad.yml",
        ),
        (
            "missing file",
            vec![
                "sqlite".into(),
                "replicate".into(),
                "-c".into(),
                "missing.yml".into(),
            ],
            "missing.yml",
        ),
        (
            "s3 url without bucket",
            vec![
                "sqlite".into(),
                "replicate".into(),
                "app.db".into(),
                "s3://".into(),
            ],
            "bucket",
        ),
        (
            "unknown scheme",
            vec![
                "sqlite".into(),
                "replicate".into(),
                "app.db".into(),
                "ftp://x/y".into(),
            ],
            "ftp",
        ),
        (
            "txid and timestamp",
            vec![
                "sqlite".into(),
                "restore".into(),
                "--txid".into(),
                "1".into(),
                "--timestamp".into(),
                "2026-01-01T00:00:00Z".into(),
                "-o".into(),
                "out.db".into(),
                "file:///nonexistent".into(),
            ],
            "not both",
        ),
        (
            "bad duration",
            vec![
                "sqlite".into(),
                "replicate".into(),
                "-c".into(),
                "duration.yml".into(),
            ],
            "sync-interval",
        ),
    ];
    std::fs::write(dir.path().join("bad.yml"), "dbs: [\n").unwrap();
    std::fs::write(
        dir.path().join("duration.yml"),
        "dbs:\n  - path: app.db\n    replica:\n      url: file:///tmp/x\n      sync-interval: fast\n",
    )
    .unwrap();
    for (name, args, needle) in cases {
        let out = hearth()
            .args(&args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: {stderr}");
        let mut entries: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        entries.sort();
        assert_eq!(
            entries,
            ["bad.yml", "duration.yml"],
            "{name}: nothing may be written"
        );
    }
    // Litestream's command line keeps Litestream's exit code (1) for the same kind of mistake.
    let out = hearth()
        .args(["litestream", "restore", "-config", "missing.yml", "app.db"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn run_restores_first_then_exits_with_the_childs_code_and_keeps_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    make_db(&db, 10);
    let cfg = config(dir.path(), &db, "");
    replicate_briefly(&cfg);

    // A new allocation: the database is gone. `run` must restore it before the app starts.
    forget_database(dir.path());
    let app = format!(
        "import sqlite3, sys; c = sqlite3.connect('{}'); n = c.execute('select count(*) from t').fetchone()[0]; \
         c.execute('insert into t (v) values (\"from the app\")'); c.commit(); sys.exit(7 if n == 10 else 3)",
        db.display()
    );
    let out = hearth()
        .args(["sqlite", "run", "-c"])
        .arg(&cfg)
        .args(["--", "python3", "-c", &app])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = dir.path().join("check.db");
    let status = hearth()
        .args(["sqlite", "restore", "-o"])
        .arg(&restored)
        .arg(format!("file://{}/replica", dir.path().display()))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        count(&restored),
        11,
        "the app's write was flushed before hearth exited"
    );
}

#[test]
fn run_forwards_sigterm_to_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    make_db(&db, 1);
    let cfg = config(dir.path(), &db, "");
    let child = hearth()
        .args(["sqlite", "run", "-c"])
        .arg(&cfg)
        .args(["--", "sleep", "30"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let start = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(128 + 15),
        "sleep was killed by SIGTERM: 143"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "shutdown must fit Nomad's 5 s kill timeout"
    );
}

#[test]
fn replicate_waits_for_a_running_restore_then_continues_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    make_db(&db, 5);
    let cfg = config(dir.path(), &db, "");
    replicate_briefly(&cfg);
    forget_database(dir.path());
    // Nomad's pattern: the sidecar starts at the same time as the restore task.
    let sidecar = hearth()
        .args(["sqlite", "replicate", "-c"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = hearth()
        .args(["sqlite", "restore", "-c"])
        .arg(&cfg)
        .arg(&db)
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    make_db(&db, 3);
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-TERM", &sidecar.id().to_string()])
        .status()
        .unwrap();
    let out = sidecar.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("no history"), "{stderr}");
    let restored = dir.path().join("check.db");
    let status = hearth()
        .args(["sqlite", "restore", "-o"])
        .arg(&restored)
        .arg(format!("file://{}/replica", dir.path().display()))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(count(&restored), 8);
}

#[test]
fn metrics_are_served_on_the_configured_address() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    make_db(&db, 3);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(dir.path(), &db, &format!("addr: 127.0.0.1:{port}\n"));
    let child = hearth()
        .args(["sqlite", "replicate", "-c"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait_with_output().unwrap();
    for name in [
        "hearth_sqlite_replication_lag_seconds",
        "hearth_sqlite_last_upload_timestamp_seconds",
        "hearth_sqlite_captured_txid",
        "hearth_sqlite_wal_bytes",
        "hearth_sqlite_store_requests_total",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
}

#[test]
fn invoked_as_litestream_it_takes_litestreams_command_lines() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("litestream");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_hearth"), &link).unwrap();
    let out = Command::new(&link).arg("version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("hearth"));

    let empty = format!("file://{}/empty-replica", dir.path().display());
    let target = dir.path().join("app.db");
    // The Nomad prestart line: an empty (reachable) replica is not an error with -if-replica-exists...
    let out = Command::new(&link)
        .args(["restore", "-if-db-not-exists", "-if-replica-exists", "-o"])
        .arg(&target)
        .arg(&empty)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!target.exists());
    // ...but without it, it is, with Litestream's exit code.
    let out = Command::new(&link)
        .args(["restore", "-o"])
        .arg(&target)
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Go-style flags that Litestream rejects are rejected the same way.
    let out = Command::new(&link)
        .args(["restore", "-badflag", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn replicate_once_syncs_what_is_committed_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    make_db(&db, 300);
    let url = format!("file://{}/replica", dir.path().display());
    // Runs hearth with `args`, then the database and URL, and expects success.
    let ok = |args: &[&str], db: &Path| {
        let out = hearth().args(args).arg(db).arg(&url).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let restored = dir.path().join("restored.db");
    // A fresh database: the first image is written and the command exits 0.
    ok(&["sqlite", "replicate", "--once"], &db);
    ok(&["sqlite", "restore", "-o"], &restored);
    assert_eq!(count(&restored), 300);

    // Litestream's spelling continues the same history.
    make_db(&db, 200);
    ok(&["litestream", "replicate", "-once"], &db);
    std::fs::remove_file(&restored).unwrap();
    ok(&["sqlite", "restore", "-o"], &restored);
    assert_eq!(count(&restored), 500);

    // A missing database is an error, not a quiet success.
    let out = hearth()
        .args(["sqlite", "replicate", "--once"])
        .arg(dir.path().join("missing.db"))
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn logging_type_json_in_the_config_gives_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    make_db(&db, 10);
    let cfg = config(dir.path(), &db, "logging:\n  type: json\n  level: info\n");
    let out = hearth()
        .args(["sqlite", "replicate", "--once", "-c"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

#[test]
fn restore_dry_run_prints_the_plan_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    make_db(&db, 50);
    let url = format!("file://{}/replica", dir.path().display());
    let out = hearth()
        .args(["sqlite", "replicate", "--once"])
        .arg(&db)
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = dir.path().join("never.db");
    for args in [
        vec!["sqlite", "restore", "--dry-run", "-o"],
        vec!["litestream", "restore", "-dry-run", "-o"],
    ] {
        let out = hearth()
            .args(&args)
            .arg(&target)
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let plan = String::from_utf8_lossy(&out.stdout);
        assert!(plan.starts_with("Restore plan:"), "{plan}");
        assert!(plan.contains("replica: file"), "{plan}");
        // One line per file to fetch, the first starting at TXID 1.
        assert!(plan.contains("\t0000000000000001\t"), "{plan}");
        assert!(!target.exists(), "a dry run writes nothing");
    }
    // An existing output is no reason to refuse a dry run (nothing is written to it).
    let out = hearth()
        .args(["sqlite", "restore", "--dry-run", "-o"])
        .arg(&db)
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
