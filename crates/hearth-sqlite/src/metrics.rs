//! Prometheus metrics of SQLite replication: lag, last upload, TXIDs, WAL size, checkpoints, rebases, errors
//! and object-store requests and bytes by operation.
//!
//! Litestream 0.5 has no lag metric; these names are hearth's own and documented in docs/sqlite.md.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbLabels {
    pub db: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub db: String,
    pub replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub db: String,
    pub replica: String,
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub db: String,
    pub reason: String,
}

/// Every metric of SQLite replication. Cheap to clone (the families are shared).
#[derive(Clone, Default)]
pub struct Metrics {
    pub lag_seconds: Family<ReplicaLabels, Gauge<f64, AtomicU64>>,
    pub last_upload_timestamp_seconds: Family<ReplicaLabels, Gauge<f64, AtomicU64>>,
    pub uploaded_txid: Family<ReplicaLabels, Gauge>,
    pub captured_txid: Family<DbLabels, Gauge>,
    pub wal_bytes: Family<DbLabels, Gauge>,
    pub checkpoints: Family<ReasonLabels, Counter>,
    pub rebases: Family<ReasonLabels, Counter>,
    pub errors: Family<ReasonLabels, Counter>,
    pub store_requests: Family<OpLabels, Counter>,
    pub store_bytes: Family<OpLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates the metrics and registers them under `hearth_sqlite_`.
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("hearth_sqlite");
        r.register(
            "replication_lag_seconds",
            "How long the oldest captured transaction not yet on the replica has waited (0 when caught up)",
            m.lag_seconds.clone(),
        );
        r.register(
            "last_upload_timestamp_seconds",
            "Unix time of the last successful upload to the replica",
            m.last_upload_timestamp_seconds.clone(),
        );
        r.register(
            "uploaded_txid",
            "Highest TXID uploaded to the replica",
            m.uploaded_txid.clone(),
        );
        r.register(
            "captured_txid",
            "Highest TXID captured from the WAL",
            m.captured_txid.clone(),
        );
        r.register(
            "wal_bytes",
            "Size of the database's WAL file",
            m.wal_bytes.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoints run by hearth, by result",
            m.checkpoints.clone(),
        );
        r.register(
            "rebases",
            "Full images written because continuity was lost, by reason",
            m.rebases.clone(),
        );
        r.register(
            "errors",
            "Errors by stage (capture, checkpoint, upload, maintenance)",
            m.errors.clone(),
        );
        r.register(
            "store_requests",
            "Object-store requests by operation",
            m.store_requests.clone(),
        );
        r.register(
            "store_bytes",
            "Object-store bytes by direction (put = sent, get = received)",
            m.store_bytes.clone(),
        );
        m
    }

    pub(crate) fn db(db: &std::path::Path) -> DbLabels {
        DbLabels {
            db: db.display().to_string(),
        }
    }

    pub(crate) fn replica(db: &std::path::Path, replica: &str) -> ReplicaLabels {
        ReplicaLabels {
            db: db.display().to_string(),
            replica: replica.to_string(),
        }
    }

    pub(crate) fn reason(db: &std::path::Path, reason: &str) -> ReasonLabels {
        ReasonLabels {
            db: db.display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// Adds the growth of a store's counters since `before` to the request and byte counters.
    pub(crate) fn add_store_stats(
        &self,
        db: &std::path::Path,
        replica: &str,
        before: &hearth_store::StoreStats,
        now: &hearth_store::StoreStats,
    ) {
        let label = |op: &str| OpLabels {
            db: db.display().to_string(),
            replica: replica.to_string(),
            op: op.to_string(),
        };
        let pairs = [
            ("put", now.puts.saturating_sub(before.puts)),
            ("get", now.gets.saturating_sub(before.gets)),
            ("list", now.lists.saturating_sub(before.lists)),
            ("head", now.heads.saturating_sub(before.heads)),
            ("delete", now.deletes.saturating_sub(before.deletes)),
        ];
        for (op, n) in pairs {
            if n > 0 {
                self.store_requests.get_or_create(&label(op)).inc_by(n);
            }
        }
        let sent = now.bytes_out.saturating_sub(before.bytes_out);
        let received = now.bytes_in.saturating_sub(before.bytes_in);
        if sent > 0 {
            self.store_bytes.get_or_create(&label("put")).inc_by(sent);
        }
        if received > 0 {
            self.store_bytes
                .get_or_create(&label("get"))
                .inc_by(received);
        }
    }
}
