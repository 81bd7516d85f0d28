//! LTX file names and where Litestream 0.5 puts them in a replica.

use super::{LtxError, Txid};

/// The level Litestream 0.5 keeps full snapshots in (`litestream.SnapshotLevel`).
pub const SNAPSHOT_LEVEL: u8 = 9;

/// Formats the name of a file covering `min..=max`: two 16-digit lower-case hex TXIDs.
pub fn format_filename(min: Txid, max: Txid) -> String {
    format!("{min:016x}-{max:016x}.ltx")
}

/// Parses `<16 hex>-<16 hex>.ltx` (lower-case hex, as ltx's `filenameRegex` demands).
///
/// Unlike ltx, a zero TXID or a range whose start is above its end is also rejected:
/// no valid file can carry such a range in its header.
pub fn parse_filename(name: &str) -> Result<(Txid, Txid), LtxError> {
    let bad = |reason| LtxError::BadFilename {
        name: name.to_string(),
        reason,
    };
    let b = name.as_bytes();
    if b.len() != 37 || !name.ends_with(".ltx") || b[16] != b'-' {
        return Err(bad("expected <16 hex digits>-<16 hex digits>.ltx"));
    }
    let is_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if !is_hex(&b[0..16]) || !is_hex(&b[17..33]) {
        return Err(bad("TXIDs must be lower-case hexadecimal"));
    }
    let min = u64::from_str_radix(&name[0..16], 16).map_err(|_| bad("bad minimum TXID"))?;
    let max = u64::from_str_radix(&name[17..33], 16).map_err(|_| bad("bad maximum TXID"))?;
    if min == 0 {
        return Err(bad("minimum TXID is zero"));
    }
    if min > max {
        return Err(bad("minimum TXID is above maximum TXID"));
    }
    Ok((min, max))
}

/// Path of a file relative to a `file://` replica root: `ltx/<level decimal>/<name>`
/// (Litestream's `LTXFilePath`, used by `file/replica_client.go`).
pub fn replica_file_path(level: u8, min: Txid, max: Txid) -> String {
    format!("ltx/{level}/{}", format_filename(min, max))
}

/// Object key of a file relative to an S3 replica path: `<level as 4 hex digits>/<name>`
/// (`s3/replica_client.go` formats the level with `%04x` and has no `ltx/` segment).
pub fn replica_s3_key(level: u8, min: Txid, max: Txid) -> String {
    format!("{level:04x}/{}", format_filename(min, max))
}
