//! Continuous SQLite replication: WAL capture, LTX replica files, compaction and verified point-in-time restore.
pub mod capture;
pub mod config;
pub mod layout;
pub mod ltx;
pub mod metrics;
pub mod plan;
pub mod replica;
pub mod replicate;
pub mod restore;
pub mod seal;
pub mod status;
pub mod wal;
