//! Where LTX files live in a replica: Litestream 0.5's key layout, which differs between file and S3 replicas.
//!
//! Litestream's file replica keeps `<root>/ltx/<level in decimal>/<min>-<max>.ltx`; its S3 replica keeps
//! `<prefix>/<level as %04x>/<min>-<max>.ltx` (see `litestream.go: LTXLevelDir` and
//! `s3/replica_client.go: WriteLTXFile`). hearth writes the same keys so that either tool can restore
//! what the other wrote. hearth's own objects live under `.hearth/`, which Litestream never lists.

use std::time::SystemTime;

pub use crate::ltx::SNAPSHOT_LEVEL;
use crate::ltx::parse_filename;

/// The prefix of hearth's own objects in a replica (lease, database checksums); Litestream ignores it.
pub const HEARTH_PREFIX: &str = ".hearth";

/// Which of Litestream's two key layouts a replica uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    File,
    S3,
}

impl Layout {
    /// The layout that Litestream uses for a store location.
    pub fn for_location(location: &hearth_store::Location) -> Layout {
        match location {
            hearth_store::Location::File { .. } => Layout::File,
            hearth_store::Location::S3(_) => Layout::S3,
        }
    }

    /// The key prefix (ending in `/`) under which a level's files are listed.
    pub fn level_prefix(self, level: u8) -> String {
        match self {
            Layout::File => format!("ltx/{level}/"),
            Layout::S3 => format!("{level:04x}/"),
        }
    }

    /// The key of one LTX file.
    pub fn ltx_key(self, level: u8, min_txid: u64, max_txid: u64) -> String {
        match self {
            Layout::File => crate::ltx::replica_file_path(level, min_txid, max_txid),
            Layout::S3 => crate::ltx::replica_s3_key(level, min_txid, max_txid),
        }
    }

    /// Parses a key below a level prefix back into its TXID range; `None` for anything that is not an LTX file.
    pub fn parse_key(self, level: u8, key: &str) -> Option<(u64, u64)> {
        let name = key.strip_prefix(&self.level_prefix(level))?;
        parse_filename(name).ok()
    }
}

/// What a replica holds in one LTX file, as far as a listing tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub level: u8,
    pub min_txid: u64,
    pub max_txid: u64,
    pub size: u64,
    /// When the newest transaction in the file was captured (the LTX header's timestamp).
    pub timestamp: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_litestream() {
        assert_eq!(
            Layout::File.ltx_key(0, 1, 5),
            "ltx/0/0000000000000001-0000000000000005.ltx"
        );
        assert_eq!(
            Layout::File.ltx_key(9, 1, 255),
            "ltx/9/0000000000000001-00000000000000ff.ltx"
        );
        assert_eq!(
            Layout::S3.ltx_key(9, 1, 255),
            "0009/0000000000000001-00000000000000ff.ltx"
        );
        assert_eq!(
            Layout::S3.ltx_key(1, 16, 16),
            "0001/0000000000000010-0000000000000010.ltx"
        );
    }

    #[test]
    fn parses_keys_of_its_own_level_only() {
        assert_eq!(
            Layout::S3.parse_key(0, "0000/0000000000000001-0000000000000002.ltx"),
            Some((1, 2))
        );
        assert_eq!(
            Layout::S3.parse_key(1, "0000/0000000000000001-0000000000000002.ltx"),
            None
        );
        assert_eq!(
            Layout::File.parse_key(0, "ltx/0/0000000000000001-0000000000000002.ltx.tmp"),
            None
        );
    }
}
