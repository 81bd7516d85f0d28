//! The LTX file format (format version 3, as written and read by ltx v0.5.2 inside Litestream 0.5.17).
//!
//! LTX is the unit of Litestream 0.5's replica layout: one file holds the changed pages
//! of a contiguous range of transactions, LZ4-compressed page by page, with a page index
//! and checksums. hearth writes and reads these files itself so that replicas stay
//! interchangeable with real Litestream. The byte layout is documented in
//! `docs/formats/ltx.md`.
//!
//! The code is hand-written rather than taken from a crate because no maintained Rust
//! crate implements LTX version 3 byte-compatibly; the building blocks (CRC-64, LZ4 block
//! compression) come from the `crc` and `lz4_flex` crates.

mod apply;
mod checksum;
mod compact;
mod decoder;
mod encoder;
mod filename;
mod header;

use std::io::{self, Read};

pub use apply::{Applied, DbImage, apply};
pub use checksum::{Checksum, DbChecksum, checksum_database, page_checksum};
pub use compact::{CompactOptions, compact};
pub use decoder::{DecodeSummary, Decoder};
pub use encoder::{Encoder, Finished};
pub use filename::{
    SNAPSHOT_LEVEL, format_filename, parse_filename, replica_file_path, replica_s3_key,
};
pub use header::{HEARTH_HEADER_MAGIC, Header, HearthChecksums, PageHeader, Trailer, peek_header};

/// A transaction ID. Litestream counts one per sync batch, starting at 1.
pub type Txid = u64;

/// The first four bytes of every LTX file. Versions 1 to 3 all share it.
pub const MAGIC: &[u8; 4] = b"LTX1";
/// The format version this module implements; it is not stored in the file.
pub const VERSION: u32 = 3;
/// Size of the fixed header.
pub const HEADER_SIZE: usize = 100;
/// Size of a page frame header (page number + flags).
pub const PAGE_HEADER_SIZE: usize = 6;
/// Size of the trailer (post-apply checksum + file checksum).
pub const TRAILER_SIZE: usize = 16;
/// Header flag: database checksums are not tracked (pre/post-apply are zero).
pub const HEADER_FLAG_NO_CHECKSUM: u32 = 1 << 1;
/// All header flags format version 3 knows.
pub const HEADER_FLAG_MASK: u32 = HEADER_FLAG_NO_CHECKSUM;
/// Page header flag: a 4-byte compressed size follows and the data is an LZ4 block.
pub const PAGE_FLAG_SIZE: u16 = 1 << 0;

/// SQLite's PENDING_BYTE offset; the page holding it (the lock page) is never stored.
const PENDING_BYTE: u64 = 0x4000_0000;

/// The page number of the SQLite lock page for a page size.
pub fn lock_pgno(page_size: u32) -> u32 {
    // page_size is at least 512, so the quotient is far below u32::MAX.
    (PENDING_BYTE / u64::from(page_size.max(1))) as u32 + 1
}

/// True when `sz` is a SQLite page size: a power of two between 512 and 65536.
pub fn is_valid_page_size(sz: u32) -> bool {
    (512..=65536).contains(&sz) && sz.is_power_of_two()
}

/// Everything that can go wrong reading, writing or applying LTX files.
///
/// Each variant names what is wrong; `is_retryable` says whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum LtxError {
    /// The underlying reader or writer failed.
    #[error("LTX I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The stream ended in the middle of a structure.
    #[error("LTX file is truncated: it ends inside the {what}")]
    Truncated { what: &'static str },
    /// The first four bytes are not "LTX1".
    #[error("not an LTX file: magic is {found:02x?}, expected \"LTX1\"")]
    BadMagic { found: [u8; 4] },
    /// Header flags this reader does not know; bit 0 is the LZ4 flag of format version 1.
    #[error(
        "unsupported LTX version or flags: header flags are {flags:#010x}; only format version 3 (flags 0 or 0x2) is supported"
    )]
    UnsupportedVersion { flags: u32 },
    /// The header breaks a format rule.
    #[error("invalid LTX header: {reason}")]
    InvalidHeader { reason: String },
    /// A page frame has flags this reader does not know.
    #[error("page {pgno} has unsupported page header flags {flags:#06x}")]
    UnsupportedPageFlags { pgno: u32, flags: u16 },
    /// A page's compressed data is damaged.
    #[error("page {pgno} has damaged compressed data: {reason}")]
    BadPageData { pgno: u32, reason: String },
    /// Page number zero was given to the encoder.
    #[error("page number 0 is not a database page")]
    ZeroPageNumber,
    /// Pages must come in strictly ascending page number.
    #[error("page {pgno} comes after page {prev}; pages must be strictly ascending")]
    PageOutOfOrder { prev: u32, pgno: u32 },
    /// A page lies beyond the database size the header declares.
    #[error("page {pgno} is beyond the commit size of {commit} pages")]
    PageBeyondCommit { pgno: u32, commit: u32 },
    /// The SQLite lock page must never be stored.
    #[error("page {pgno} is the SQLite lock page, which LTX files never contain")]
    LockPage { pgno: u32 },
    /// A snapshot (min TXID 1) must hold every page 1..=commit except the lock page.
    #[error("snapshot is missing page {expected} (next page present: {found:?})")]
    SnapshotGap { expected: u32, found: Option<u32> },
    /// A page buffer does not have the header's page size.
    #[error("page buffer holds {len} bytes but the page size is {page_size}")]
    PageSizeMismatch { len: usize, page_size: u32 },
    /// The page index disagrees with the page frames.
    #[error("LTX page index is corrupt: {reason}")]
    BadPageIndex { reason: String },
    /// The trailer breaks a format rule.
    #[error("invalid LTX trailer: {reason}")]
    InvalidTrailer { reason: String },
    /// The file checksum in the trailer does not match the content.
    #[error("LTX file checksum mismatch: trailer has {stored}, content hashes to {computed}")]
    FileChecksumMismatch {
        stored: Checksum,
        computed: Checksum,
    },
    /// The database checksum after applying the file is not what the trailer says.
    #[error("post-apply database checksum mismatch: trailer has {stored}, pages give {computed}")]
    PostApplyChecksumMismatch {
        stored: Checksum,
        computed: Checksum,
    },
    /// The database the file is applied to is not the one the file was made from.
    #[error("pre-apply database checksum mismatch: file expects {expected}, database has {actual}")]
    PreApplyChecksumMismatch {
        expected: Checksum,
        actual: Checksum,
    },
    /// Bytes follow the trailer.
    #[error("unexpected data after the LTX trailer")]
    TrailingData,
    /// A file name is not `<16 hex>-<16 hex>.ltx`.
    #[error("invalid LTX file name {name:?}: {reason}")]
    BadFilename { name: String, reason: &'static str },
    /// Input files cannot be compacted together.
    #[error("cannot compact LTX files: {reason}")]
    Compaction { reason: String },
    /// A database image is not a whole number of pages.
    #[error("bad database image: {reason}")]
    BadDatabaseImage { reason: String },
}

impl LtxError {
    /// Whether retrying the same operation can help.
    ///
    /// I/O errors may be transient (network, full disk being cleaned up). A truncated
    /// file can come from an interrupted download, so fetching it again can help.
    /// Every other error describes the bytes themselves and will recur.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LtxError::Io(_) | LtxError::Truncated { .. })
    }
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize, LtxError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(LtxError::Io(e)),
        }
    }
    Ok(n)
}

/// Reads exactly `buf.len()` bytes or reports which structure was cut short.
pub(crate) fn read_exact_or<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), LtxError> {
    if read_full(r, buf)? < buf.len() {
        return Err(LtxError::Truncated { what });
    }
    Ok(())
}
