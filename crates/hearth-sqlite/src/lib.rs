//! Continuous SQLite replication: WAL capture, LTX replica files, compaction and verified point-in-time restore.
pub mod wal;
pub mod ltx;
pub mod config;
pub mod capture;
pub mod layout;
pub mod plan;
pub mod replica;
pub mod replicate;
pub mod restore;
pub mod status;
pub mod metrics;
