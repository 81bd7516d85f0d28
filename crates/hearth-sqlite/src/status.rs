//! Replication status from local state alone (no store request): position, lag and last upload per replica.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::capture::{LocalState, list_local_files, meta_dir, read_state};
use crate::config::ReplicaConfig;
use crate::replica::{ReplicaPosition, position_path};

/// The status of one database.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DbStatus {
    pub path: PathBuf,
    /// Highest captured TXID (0 when nothing was captured yet).
    pub txid: u64,
    /// When that TXID was captured, in milliseconds since the epoch.
    pub captured_at_ms: Option<i64>,
    pub wal_bytes: u64,
    pub replicas: Vec<ReplicaStatus>,
}

/// The status of one replica of a database.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReplicaStatus {
    pub name: String,
    pub uploaded_txid: u64,
    pub last_upload_ms: Option<i64>,
    /// How long the oldest captured transaction not on this replica has waited; 0 when it is caught up.
    pub lag_seconds: f64,
}

/// Reads the status of `db` from its meta directory.
pub fn status(db: &Path, replicas: &[ReplicaConfig], now: SystemTime) -> DbStatus {
    let meta = meta_dir(db);
    let state: Option<LocalState> = read_state(&meta).ok().flatten().map(|(s, _)| s);
    let local = list_local_files(&meta).unwrap_or_default();
    let txid = state.as_ref().map_or(0, |s| s.txid);
    let replicas = replicas
        .iter()
        .map(|r| {
            let pos: Option<ReplicaPosition> = std::fs::read(position_path(&meta, &r.name))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let uploaded_txid = pos.as_ref().map_or(0, |p| p.txid);
            // The oldest local file the replica lacks tells how long data has been waiting for it.
            let waiting_since = local
                .iter()
                .find(|(t, _)| *t > uploaded_txid && *t <= txid)
                .and_then(|(_, p)| std::fs::metadata(p).ok()?.modified().ok());
            let lag_seconds = waiting_since.map_or(0.0, |t| {
                now.duration_since(t).unwrap_or_default().as_secs_f64()
            });
            ReplicaStatus {
                name: r.name.clone(),
                uploaded_txid,
                last_upload_ms: pos.and_then(|p| p.uploaded_at_ms),
                lag_seconds,
            }
        })
        .collect();
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    DbStatus {
        path: db.to_path_buf(),
        txid,
        captured_at_ms: state.map(|s| s.timestamp_ms),
        wal_bytes: std::fs::metadata(PathBuf::from(wal)).map_or(0, |m| m.len()),
        replicas,
    }
}

/// Milliseconds since the epoch.
pub fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
