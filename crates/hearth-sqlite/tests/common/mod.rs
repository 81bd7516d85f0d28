//! Helpers shared by the replication test files: a writer connection, table contents, and a real Litestream.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

/// Opens `db` in WAL mode with the test table.
pub fn open_writer(db: &Path) -> Connection {
    let conn = Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    conn
}

/// The user-visible contents of a database: every row of `t`, in order.
pub fn contents(db: &Path) -> Vec<(i64, Vec<u8>)> {
    let conn = Connection::open(db).unwrap();
    let mut stmt = conn.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Runs the real `litestream replicate -config <config>` while `work` runs, then stops it with SIGTERM.
pub async fn litestream_replicate_while(config: &Path, envs: &[(&str, &str)], work: impl FnOnce()) {
    let mut cmd = hearth_testkit::command(hearth_testkit::litestream_bin().unwrap());
    cmd.args(["replicate", "-config"])
        .arg(config)
        .stderr(std::process::Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    work();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
}
