//! The local core of `hearth volume`'s `files` backend: capture a directory tree into a manifest of
//! content-defined chunks, work out which chunks a standby lacks, keep chunks in a verified
//! content-addressed store, and apply a manifest as a whole new tree that replaces the live copy
//! atomically.
//!
//! The pieces are deliberately separate so the network transport can sit between them:
//! the primary runs [`capture`] and [`missing_chunks`], reads the wanted chunks with
//! [`read_chunk`] and sends them; the standby [`ChunkStore::put`]s them (each is checked against
//! its hash) and finally runs [`apply`]. Nothing here talks to the network.
//!
//! The on-disk manifest format is documented in `docs/formats/volume-tree.md`; the overall design
//! (consistency without snapshots, atomic switch, clean-up of old trees) in `docs/volume.md`.

mod apply;
pub mod btrfs;
mod capture;
pub mod delta;
mod diff;
mod durable;
mod envelope;
mod error;
mod incoming;
pub mod link_btrfs;
mod manifest;
pub mod metrics;
pub mod net;
mod patch;
pub mod primary;
mod reuse;
pub mod schedule;
pub mod source_watch;
pub mod standby;
pub mod state;
mod store;
mod threads;
mod watch;

pub use apply::{
    ApplyReport, PruneReport, SetAside, TreeNames, apply, apply_and_prune, apply_whole,
    prune_previous, read_live_manifest, read_live_manifest_hashed, select_for_prune,
};
pub use capture::{
    Capture, CaptureCache, CaptureOptions, CaptureReport, Changes, DirWatch, Sink, Streamed,
    UnstablePolicy, capture, capture_changes, capture_streaming,
};
pub use diff::{ChunkWant, TransferPlan, missing_chunks, read_chunk};
pub use error::VolumeError;
pub use incoming::Incoming;
pub use manifest::{
    ChunkId, ChunkParams, ChunkRef, Entry, EntryKind, FORMAT_VERSION, Manifest, TreeHash, Xattr,
};
pub use patch::finish_interrupted;
pub use store::{ChunkStore, Durability, VerifiedChunk};
pub use watch::{LiveWatch, TRUST_FOR};
