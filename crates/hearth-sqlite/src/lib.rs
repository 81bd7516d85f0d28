//! Continuous SQLite replication: WAL capture, LTX replica files, compaction and verified point-in-time restore.
