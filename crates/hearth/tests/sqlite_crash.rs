//! Crash safety: kill -9 the replicator (a separate `hearth` process) at random points while a writer runs;
//! every restore must equal a committed prefix of the source, checked by content.
//!
//! `HEARTH_CRASH_CYCLES` sets the number of kill cycles (default 100; use more in a slow run by hand).

// Test helpers outside #[test] bodies unwrap too: a failed step should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;

fn hearth() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
}

/// The value stored with row `id`: deterministic, so a restored row can be checked by content.
fn value(id: i64) -> String {
    format!("{id:0>600}")
}

fn write_config(dir: &Path, db: &Path, replica: &Path) -> std::path::PathBuf {
    // Short intervals so that syncs, checkpoints, uploads, compactions and snapshots all happen within the
    // short life of each replicator process, and a kill can land in any of them.
    let config = format!(
        "levels:\n  - interval: 100ms\n  - interval: 250ms\nsnapshot:\n  interval: 1s\n  retention: 1h\n\
         shutdown-sync-timeout: 4s\n\
         dbs:\n  - path: {}\n    monitor-interval: 20ms\n    min-checkpoint-page-count: 40\n    checkpoint-interval: 200ms\n\
         \x20   replica:\n      url: file://{}\n      sync-interval: 20ms\n",
        db.display(),
        replica.display()
    );
    let path = dir.join("hearth.yml");
    std::fs::write(&path, config).unwrap();
    path
}

fn start(config: &Path) -> Child {
    hearth()
        .args(["sqlite", "replicate", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Checks that `restored` holds exactly rows 1..=k with their values, for some k <= `committed`; returns k.
fn check_prefix(restored: &Path, committed: i64) -> i64 {
    let conn = Connection::open(restored).unwrap();
    let rows: Vec<(i64, String)> = conn
        .prepare("SELECT id, v FROM t ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (i, (id, v)) in rows.iter().enumerate() {
        assert_eq!(
            *id,
            i as i64 + 1,
            "row {i} of the restore is not the next committed row"
        );
        assert_eq!(
            v,
            &value(*id),
            "row {id} has other content than was committed"
        );
    }
    let k = rows.len() as i64;
    assert!(
        k <= committed,
        "restore holds {k} rows but only {committed} were committed"
    );
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    k
}

#[test]
fn kill_9_at_random_points_leaves_a_restorable_committed_prefix() {
    let cycles: u32 = std::env::var("HEARTH_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let config = write_config(dir.path(), &db, &replica);
    {
        let conn = Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
    }

    // The writer: one row per transaction, counting what is committed.
    let committed = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, committed, stop) = (db.clone(), committed.clone(), stop.clone());
        std::thread::spawn(move || {
            let conn = Connection::open(&db).unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            let mut id = 0;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                conn.execute(
                    "INSERT INTO t (id, v) VALUES (?1, ?2)",
                    rusqlite::params![id, value(id)],
                )
                .unwrap();
                committed.store(id, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };

    let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    let mut rand = move |n: u64| rng.random_range(0..n);
    let mut best = 0;
    for cycle in 0..cycles {
        let mut child = start(&config);
        std::thread::sleep(Duration::from_millis(30 + rand(400)));
        child.kill().unwrap();
        child.wait().unwrap();
        if cycle % 10 == 9 {
            let out = dir.path().join(format!("restore-{cycle}.db"));
            let committed_now = committed.load(Ordering::SeqCst);
            let restore = hearth()
                .args(["sqlite", "restore", "-o"])
                .arg(&out)
                .arg(format!("file://{}", replica.display()))
                .output()
                .unwrap();
            assert!(
                restore.status.success(),
                "restore failed after cycle {cycle}: {}",
                String::from_utf8_lossy(&restore.stderr)
            );
            best = best.max(check_prefix(&out, committed_now));
        }
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let total = committed.load(Ordering::SeqCst);

    // A clean run after all the crashes catches up completely.
    let mut child = start(&config);
    std::thread::sleep(Duration::from_millis(1500));
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "replicator exited with {status}");
    let out = dir.path().join("final.db");
    let status = hearth()
        .args(["sqlite", "restore", "-o"])
        .arg(&out)
        .arg(format!("file://{}", replica.display()))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        check_prefix(&out, total),
        total,
        "the final restore must hold every committed row"
    );
    assert!(
        best > 0,
        "no intermediate restore saw any row: the test did not exercise replication"
    );
}
