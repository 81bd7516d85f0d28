//! The LTX header, page frame header and trailer: byte layout and validation rules.

use super::{
    Checksum, HEADER_FLAG_MASK, HEADER_FLAG_NO_CHECKSUM, HEADER_SIZE, LtxError, MAGIC,
    PAGE_HEADER_SIZE, TRAILER_SIZE, Txid, is_valid_page_size, lock_pgno,
};

/// The 100-byte LTX header. All integers are big-endian on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    /// Header flags; `HEADER_FLAG_NO_CHECKSUM` is the only one defined.
    pub flags: u32,
    /// Database page size in bytes.
    pub page_size: u32,
    /// Database size in pages after this file is applied.
    pub commit: u32,
    /// First transaction ID the file covers (1 means the file is a full snapshot).
    pub min_txid: Txid,
    /// Last transaction ID the file covers.
    pub max_txid: Txid,
    /// Creation time in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Database checksum before applying; zero for snapshots and no-checksum files.
    pub pre_apply_checksum: Checksum,
    /// Offset in the source WAL where this file's frames started; zero if not from a WAL.
    pub wal_offset: i64,
    /// Bytes of WAL this file covers; zero if not from a WAL.
    pub wal_size: i64,
    /// WAL header salt-1 at capture time; zero for compactions.
    pub wal_salt1: u32,
    /// WAL header salt-2 at capture time; zero for compactions.
    pub wal_salt2: u32,
    /// ID of the node that wrote the file; zero if unset.
    pub node_id: u64,
    /// hearth's database checksums carried in the reserved header bytes (see
    /// `HearthChecksums`); `None` in files written by Litestream.
    pub hearth: Option<HearthChecksums>,
}

/// Magic that marks hearth's checksums in header bytes 80..84.
pub const HEARTH_HEADER_MAGIC: &[u8; 4] = b"HRT1";

/// Database checksums that hearth stores in the header's reserved bytes 80..100 of a
/// file that carries the no-checksum flag.
///
/// Why not the format's own checksum fields: Litestream 0.5.17's restore compacts its
/// inputs with the no-checksum flag but copies the last input's post-apply checksum
/// into the output trailer, so any restore whose newest file tracks checksums fails
/// ("validate trailer: post-apply checksum not allowed"). ltx v0.5.2 ignores the
/// reserved bytes (they are still covered by the file checksum), so checksums there
/// survive a Litestream restore untouched. Because the header comes first, the
/// post-apply checksum must be known before the file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HearthChecksums {
    /// Database checksum before applying; zero for a snapshot.
    pub pre_apply: Checksum,
    /// Database checksum after applying.
    pub post_apply: Checksum,
}

impl Header {
    /// True when the file is a full snapshot (it starts at transaction 1).
    pub fn is_snapshot(&self) -> bool {
        self.min_txid == 1
    }

    /// True when the file does not track database checksums.
    pub fn no_checksum(&self) -> bool {
        self.flags & HEADER_FLAG_NO_CHECKSUM != 0
    }

    /// The SQLite lock page number for this file's page size.
    pub fn lock_pgno(&self) -> u32 {
        lock_pgno(self.page_size)
    }

    /// Serialises the header. Bytes 80..100 are reserved and written as zero.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_be_bytes());
        b[12..16].copy_from_slice(&self.commit.to_be_bytes());
        b[16..24].copy_from_slice(&self.min_txid.to_be_bytes());
        b[24..32].copy_from_slice(&self.max_txid.to_be_bytes());
        b[32..40].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b[40..48].copy_from_slice(&self.pre_apply_checksum.0.to_be_bytes());
        b[48..56].copy_from_slice(&self.wal_offset.to_be_bytes());
        b[56..64].copy_from_slice(&self.wal_size.to_be_bytes());
        b[64..68].copy_from_slice(&self.wal_salt1.to_be_bytes());
        b[68..72].copy_from_slice(&self.wal_salt2.to_be_bytes());
        b[72..80].copy_from_slice(&self.node_id.to_be_bytes());
        if let Some(x) = self.hearth {
            b[80..84].copy_from_slice(HEARTH_HEADER_MAGIC);
            b[84..92].copy_from_slice(&x.pre_apply.0.to_be_bytes());
            b[92..100].copy_from_slice(&x.post_apply.0.to_be_bytes());
        }
        b
    }

    /// Parses and validates a header from the first 100 bytes of `b`.
    ///
    /// Reserved bytes 80..100 are read as `HearthChecksums` when they start with
    /// `HEARTH_HEADER_MAGIC` and are otherwise ignored, as ltx v0.5.2 ignores them; they
    /// are always covered by the file checksum.
    pub fn from_bytes(b: &[u8]) -> Result<Header, LtxError> {
        if b.len() < HEADER_SIZE {
            return Err(LtxError::Truncated { what: "header" });
        }
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&b[0..4]);
        if &magic != MAGIC {
            return Err(LtxError::BadMagic { found: magic });
        }
        let h = Header {
            flags: be_u32(b, 4),
            page_size: be_u32(b, 8),
            commit: be_u32(b, 12),
            min_txid: be_u64(b, 16),
            max_txid: be_u64(b, 24),
            timestamp_ms: be_u64(b, 32) as i64,
            pre_apply_checksum: Checksum(be_u64(b, 40)),
            wal_offset: be_u64(b, 48) as i64,
            wal_size: be_u64(b, 56) as i64,
            wal_salt1: be_u32(b, 64),
            wal_salt2: be_u32(b, 68),
            node_id: be_u64(b, 72),
            hearth: (&b[80..84] == HEARTH_HEADER_MAGIC).then(|| HearthChecksums {
                pre_apply: Checksum(be_u64(b, 84)),
                post_apply: Checksum(be_u64(b, 92)),
            }),
        };
        h.validate()?;
        Ok(h)
    }

    /// Checks the rules ltx v0.5.2's `Header.Validate` enforces, so that a header this
    /// accepts is one real Litestream accepts too.
    pub fn validate(&self) -> Result<(), LtxError> {
        let bad = |reason: String| Err(LtxError::InvalidHeader { reason });
        if self.flags & !HEADER_FLAG_MASK != 0 {
            return Err(LtxError::UnsupportedVersion { flags: self.flags });
        }
        if !is_valid_page_size(self.page_size) {
            return bad(format!(
                "page size {} is not a power of two in 512..=65536",
                self.page_size
            ));
        }
        if self.min_txid == 0 {
            return bad("minimum TXID is zero".into());
        }
        if self.max_txid == 0 {
            return bad("maximum TXID is zero".into());
        }
        if self.min_txid > self.max_txid {
            return bad(format!(
                "minimum TXID {} is above maximum TXID {}",
                self.min_txid, self.max_txid
            ));
        }
        if self.wal_offset < 0 {
            return bad(format!("WAL offset {} is negative", self.wal_offset));
        }
        if self.wal_size < 0 {
            return bad(format!("WAL size {} is negative", self.wal_size));
        }
        if (self.wal_salt1 != 0 || self.wal_salt2 != 0) && self.wal_offset == 0 {
            return bad("WAL salts are set but the WAL offset is zero".into());
        }
        if self.wal_offset == 0 && self.wal_size != 0 {
            return bad("WAL size is set but the WAL offset is zero".into());
        }
        let pre = self.pre_apply_checksum;
        if self.is_snapshot() {
            if pre != Checksum::ZERO {
                return bad("a snapshot (min TXID 1) must have a zero pre-apply checksum".into());
            }
        } else if self.no_checksum() {
            if pre != Checksum::ZERO {
                return bad("pre-apply checksum is set but the no-checksum flag is on".into());
            }
        } else if !pre.is_real() {
            return bad(format!(
                "pre-apply checksum {pre} is missing or lacks the checksum flag bit"
            ));
        }
        if let Some(x) = self.hearth {
            if !self.no_checksum() {
                return bad("hearth checksums in the header need the no-checksum flag".into());
            }
            if !x.post_apply.is_real() {
                return bad(format!(
                    "hearth post-apply checksum {} lacks the checksum flag bit",
                    x.post_apply
                ));
            }
            if self.commit == 0 && x.post_apply != Checksum::FLAG {
                return bad("an empty database must have the flag-only post-apply checksum".into());
            }
            if self.is_snapshot() {
                if x.pre_apply != Checksum::ZERO {
                    return bad("a snapshot must have a zero hearth pre-apply checksum".into());
                }
            } else if !x.pre_apply.is_real() {
                return bad(format!(
                    "hearth pre-apply checksum {} lacks the checksum flag bit",
                    x.pre_apply
                ));
            }
        }
        Ok(())
    }

    /// The database checksums (pre-apply, post-apply) this file declares, from the
    /// format's own fields or from hearth's header extension; `None` if it has neither.
    /// The post-apply value of the format's own fields lives in the trailer.
    pub fn declared_checksums(&self, trailer: &Trailer) -> Option<(Checksum, Checksum)> {
        if !self.no_checksum() {
            Some((self.pre_apply_checksum, trailer.post_apply_checksum))
        } else {
            self.hearth.map(|x| (x.pre_apply, x.post_apply))
        }
    }

    /// The pre-apply checksum this file declares, if any (known from the header alone).
    pub fn declared_pre_apply(&self) -> Option<Checksum> {
        if !self.no_checksum() {
            Some(self.pre_apply_checksum)
        } else {
            self.hearth.map(|x| x.pre_apply)
        }
    }
}

/// Parses and validates the header at the start of a byte prefix (for example the first
/// bytes of an object fetched with a range request). Needs at least 100 bytes.
pub fn peek_header(prefix: &[u8]) -> Result<Header, LtxError> {
    Header::from_bytes(prefix)
}

/// The 6-byte header of a page frame: page number and page flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PageHeader {
    /// Page number; zero marks the end of the page block.
    pub pgno: u32,
    /// Page flags; `PAGE_FLAG_SIZE` on every frame ltx v0.5.2 writes.
    pub flags: u16,
}

impl PageHeader {
    /// Serialises the frame header.
    pub fn to_bytes(&self) -> [u8; PAGE_HEADER_SIZE] {
        let mut b = [0u8; PAGE_HEADER_SIZE];
        b[0..4].copy_from_slice(&self.pgno.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b
    }

    /// Parses a frame header.
    pub fn from_bytes(b: &[u8; PAGE_HEADER_SIZE]) -> PageHeader {
        PageHeader {
            pgno: be_u32(b, 0),
            flags: u16::from_be_bytes([b[4], b[5]]),
        }
    }
}

/// The 16-byte trailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Trailer {
    /// Database checksum after applying the file; zero for no-checksum files.
    pub post_apply_checksum: Checksum,
    /// CRC-64/ISO of the file's logical content, flag bit set.
    pub file_checksum: Checksum,
}

impl Trailer {
    /// Serialises the trailer.
    pub fn to_bytes(&self) -> [u8; TRAILER_SIZE] {
        let mut b = [0u8; TRAILER_SIZE];
        b[0..8].copy_from_slice(&self.post_apply_checksum.0.to_be_bytes());
        b[8..16].copy_from_slice(&self.file_checksum.0.to_be_bytes());
        b
    }

    /// Parses a trailer without validating it.
    pub fn from_bytes(b: &[u8; TRAILER_SIZE]) -> Trailer {
        Trailer {
            post_apply_checksum: Checksum(be_u64(b, 0)),
            file_checksum: Checksum(be_u64(b, 8)),
        }
    }

    /// Checks the rules of ltx v0.5.2's `Trailer.Validate` plus its encoder's rule that
    /// an empty database (commit 0) has exactly the flag-only checksum.
    pub fn validate(&self, h: &Header) -> Result<(), LtxError> {
        let bad = |reason: String| Err(LtxError::InvalidTrailer { reason });
        let post = self.post_apply_checksum;
        if h.no_checksum() {
            if post != Checksum::ZERO {
                return bad(format!(
                    "post-apply checksum {post} is set but the no-checksum flag is on"
                ));
            }
        } else {
            if !post.is_real() {
                return bad(format!(
                    "post-apply checksum {post} is missing or lacks the checksum flag bit"
                ));
            }
            if h.commit == 0 && post != Checksum::FLAG {
                return bad(format!(
                    "an empty database must have post-apply checksum {}, not {post}",
                    Checksum::FLAG
                ));
            }
        }
        if !self.file_checksum.is_real() {
            return bad(format!(
                "file checksum {} is missing or lacks the checksum flag bit",
                self.file_checksum
            ));
        }
        Ok(())
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
