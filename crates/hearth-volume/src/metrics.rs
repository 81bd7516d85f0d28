//! Prometheus metrics of volume replication, on both sides: lag and last success per standby,
//! bytes, sync durations, full and incremental syncs, refusals and errors. Names are documented in
//! docs/volume.md.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a per-volume metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    /// The volume's name.
    pub volume: String,
}

/// Labels of a per-standby metric on the primary.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StandbyLabels {
    /// The volume's name.
    pub volume: String,
    /// The standby's address as configured.
    pub standby: String,
}

/// Labels of a sync counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// The volume's name.
    pub volume: String,
    /// The standby's address.
    pub standby: String,
    /// `full`, `incremental` or `unchanged`.
    pub kind: String,
}

/// Labels of a refusal or error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The volume's name (empty when the request named none that could be read).
    pub volume: String,
    /// The kind of refusal or error.
    pub reason: String,
}

/// Every metric of volume replication. Cheap to clone (the families are shared).
#[derive(Clone)]
pub struct Metrics {
    /// Age of the standby's newest tree (now minus its capture time), set after each sync.
    pub lag_seconds: Family<StandbyLabels, Gauge<f64, AtomicU64>>,
    /// When the last sync to the standby succeeded.
    pub last_success_timestamp_seconds: Family<StandbyLabels, Gauge<f64, AtomicU64>>,
    /// Chunk bytes sent.
    pub bytes_sent: Family<StandbyLabels, Counter>,
    /// Syncs by kind.
    pub syncs: Family<SyncLabels, Counter>,
    /// Sync durations.
    pub sync_seconds: Family<VolumeLabels, Histogram>,
    /// Failed syncs on the primary, by reason.
    pub errors: Family<ReasonLabels, Counter>,
    /// Refusals, on either side, by code.
    pub refusals: Family<ReasonLabels, Counter>,
    /// Chunk bytes received on the standby.
    pub bytes_received: Family<VolumeLabels, Counter>,
    /// Trees applied on the standby.
    pub applies: Family<VolumeLabels, Counter>,
    /// Trees kept aside on the standby.
    pub kept_aside: Family<VolumeLabels, Counter>,
    /// Live trees a standby's watch saw changed by someone else between syncs.
    pub changed_on_standby: Family<VolumeLabels, Counter>,
    /// Captures on the primary by how they went (`reason`): `watched` (only what a watch saw
    /// change was looked at), `walk` (a push without a watch), or `walk_<why>` (a watched
    /// push that had to walk; see `WalkReason::label`).
    pub captures: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            lag_seconds: Family::default(),
            last_success_timestamp_seconds: Family::default(),
            bytes_sent: Family::default(),
            syncs: Family::default(),
            sync_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.05, 2.0, 14))
            }),
            errors: Family::default(),
            refusals: Family::default(),
            bytes_received: Family::default(),
            applies: Family::default(),
            kept_aside: Family::default(),
            changed_on_standby: Family::default(),
            captures: Family::default(),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates the metrics and registers them under `hearth_volume_`.
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("hearth_volume");
        r.register(
            "lag_seconds",
            "Age of the standby's newest tree: now minus the time the primary captured it, as of the last sync",
            m.lag_seconds.clone(),
        );
        r.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful sync to the standby",
            m.last_success_timestamp_seconds.clone(),
        );
        r.register(
            "sent_bytes",
            "Chunk bytes sent to the standby",
            m.bytes_sent.clone(),
        );
        r.register(
            "syncs",
            "Syncs by kind: full (no common tree), incremental, unchanged",
            m.syncs.clone(),
        );
        r.register(
            "sync_duration_seconds",
            "Duration of successful syncs",
            m.sync_seconds.clone(),
        );
        r.register("errors", "Failed syncs by reason", m.errors.clone());
        r.register(
            "refusals",
            "Requests refused by a standby, by code",
            m.refusals.clone(),
        );
        r.register(
            "received_bytes",
            "Chunk bytes received by the standby",
            m.bytes_received.clone(),
        );
        r.register("applies", "Trees applied on the standby", m.applies.clone());
        r.register(
            "kept_aside",
            "Standby trees kept aside read-only instead of being replaced",
            m.kept_aside.clone(),
        );
        r.register(
            "changed_on_standby",
            "Times a standby's live tree was seen changed by someone other than hearth between syncs",
            m.changed_on_standby.clone(),
        );
        r.register(
            "captures",
            "Captures on the primary: watched (only what changed was looked at), walk, or walk_<why> for a watched push that had to walk",
            m.captures.clone(),
        );
        m
    }
}
