//! Streaming LTX decoder that checks every structural rule and every checksum it can.

use std::io::{self, BufReader, Read};

use crc_fast::Digest;

use super::checksum::fast_digest as digest;
use super::encoder::{next_snapshot_pgno, put_uvarint};
use super::{
    Checksum, DbChecksum, HEADER_SIZE, Header, LtxError, PAGE_FLAG_SIZE, PAGE_HEADER_SIZE,
    PageHeader, TRAILER_SIZE, Trailer, page_checksum, read_exact_or, read_full,
};

/// Reads one LTX file from `R`: the header on construction, then pages in order with
/// `next_page`, then the page index and trailer with `finish`.
///
/// Memory stays bounded (one compressed page and a 64 KiB read buffer): the page index
/// is checked against the frames through a running CRC rather than by keeping it.
pub struct Decoder<R: Read> {
    r: BufReader<R>,
    header: Header,
    hash: Digest,
    /// CRC of the page index the frames imply, compared with the stored index at the end.
    expected_index: Digest,
    expected_index_len: u64,
    scratch: Vec<u8>,
    n: u64,
    prev_pgno: u32,
    page_count: u32,
    comp_buf: Vec<u8>,
    max_compressed: usize,
    pages_sum: DbChecksum,
    pages_done: bool,
    failed: bool,
}

/// What a fully decoded and verified file contained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeSummary {
    /// The file's header.
    pub header: Header,
    /// The file's trailer (checksums verified).
    pub trailer: Trailer,
    /// Total bytes read.
    pub size: u64,
    /// Number of page frames.
    pub page_count: u32,
    /// XOR-combined checksum of the pages in the file (flag bit set).
    pub pages_checksum: Checksum,
}

impl<R: Read> Decoder<R> {
    /// Reads and validates the header.
    pub fn new(r: R) -> Result<Decoder<R>, LtxError> {
        let mut r = BufReader::with_capacity(64 * 1024, r);
        let mut b = [0u8; HEADER_SIZE];
        read_exact_or(&mut r, &mut b, "header")?;
        let header = Header::from_bytes(&b)?;
        let mut hash = digest();
        hash.update(&b);
        let max_compressed = lz4_flex::block::get_maximum_output_size(header.page_size as usize);
        Ok(Decoder {
            r,
            header,
            hash,
            expected_index: digest(),
            expected_index_len: 0,
            scratch: Vec::with_capacity(32),
            n: HEADER_SIZE as u64,
            prev_pgno: 0,
            page_count: 0,
            comp_buf: vec![0u8; max_compressed],
            max_compressed,
            pages_sum: DbChecksum::new(),
            pages_done: false,
            failed: false,
        })
    }

    /// The file's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Reads the next page into `buf` (exactly one page size long) and returns its page
    /// number, or `None` at the end of the page block.
    pub fn next_page(&mut self, buf: &mut [u8]) -> Result<Option<u32>, LtxError> {
        if self.failed {
            return Err(failed_earlier());
        }
        if self.pages_done {
            return Ok(None);
        }
        let res = self.read_page(buf);
        if res.is_err() {
            self.failed = true;
        }
        res
    }

    fn read_page(&mut self, buf: &mut [u8]) -> Result<Option<u32>, LtxError> {
        let h = self.header;
        if buf.len() != h.page_size as usize {
            return Err(LtxError::PageSizeMismatch {
                len: buf.len(),
                page_size: h.page_size,
            });
        }
        let mut phb = [0u8; PAGE_HEADER_SIZE];
        read_exact_or(&mut self.r, &mut phb, "page frame header")?;
        self.hash.update(&phb);
        self.n += PAGE_HEADER_SIZE as u64;
        let ph = PageHeader::from_bytes(&phb);
        if ph.pgno == 0 {
            if ph.flags != 0 {
                return Err(LtxError::UnsupportedPageFlags {
                    pgno: 0,
                    flags: ph.flags,
                });
            }
            self.pages_done = true;
            return Ok(None);
        }
        let pgno = ph.pgno;
        if ph.flags & !PAGE_FLAG_SIZE != 0 {
            return Err(LtxError::UnsupportedPageFlags {
                pgno,
                flags: ph.flags,
            });
        }
        if pgno <= self.prev_pgno {
            return Err(LtxError::PageOutOfOrder {
                prev: self.prev_pgno,
                pgno,
            });
        }
        if pgno > h.commit {
            return Err(LtxError::PageBeyondCommit {
                pgno,
                commit: h.commit,
            });
        }
        let lock = h.lock_pgno();
        if pgno == lock {
            return Err(LtxError::LockPage { pgno });
        }
        if h.is_snapshot() {
            let expected = next_snapshot_pgno(self.prev_pgno, lock);
            if pgno != expected {
                return Err(LtxError::SnapshotGap {
                    expected,
                    found: Some(pgno),
                });
            }
        }
        let offset = self.n - PAGE_HEADER_SIZE as u64;

        let body_len = if ph.flags & PAGE_FLAG_SIZE != 0 {
            self.read_block_page(pgno, buf)?
        } else {
            self.read_legacy_frame_page(pgno, buf)?
        };
        self.hash.update(buf);
        let frame_len = PAGE_HEADER_SIZE as u64 + body_len;
        self.n += body_len;

        self.scratch.clear();
        put_uvarint(&mut self.scratch, u64::from(pgno));
        put_uvarint(&mut self.scratch, offset);
        put_uvarint(&mut self.scratch, frame_len);
        self.expected_index.update(&self.scratch);
        self.expected_index_len += self.scratch.len() as u64;

        self.pages_sum.toggle(page_checksum(pgno, buf));
        self.prev_pgno = pgno;
        self.page_count += 1;
        Ok(Some(pgno))
    }

    /// Reads the current encoding: a 4-byte size, then one LZ4 block. The size prefix is
    /// hashed, the compressed bytes are not. Returns the bytes consumed after the frame
    /// header.
    fn read_block_page(&mut self, pgno: u32, buf: &mut [u8]) -> Result<u64, LtxError> {
        let mut sz = [0u8; 4];
        read_exact_or(&mut self.r, &mut sz, "page size prefix")?;
        self.hash.update(&sz);
        let clen = u32::from_be_bytes(sz) as usize;
        if clen == 0 || clen > self.max_compressed {
            return Err(LtxError::BadPageData {
                pgno,
                reason: format!(
                    "compressed size {clen} is outside 1..={} for page size {}",
                    self.max_compressed,
                    buf.len()
                ),
            });
        }
        read_exact_or(&mut self.r, &mut self.comp_buf[..clen], "page data")?;
        let got = lz4_flex::block::decompress_into(&self.comp_buf[..clen], buf).map_err(|e| {
            LtxError::BadPageData {
                pgno,
                reason: format!("LZ4 block does not decode: {e}"),
            }
        })?;
        if got != buf.len() {
            return Err(LtxError::BadPageData {
                pgno,
                reason: format!(
                    "LZ4 block decodes to {got} bytes, page size is {}",
                    buf.len()
                ),
            });
        }
        Ok(4 + clen as u64)
    }

    /// Reads the legacy encoding of ltx v0.5.0/v0.5.1 (Litestream 0.5.0 to 0.5.15): one
    /// complete LZ4 frame per page with no size prefix. The frame is parsed by hand
    /// because its length is not stored and a general frame reader may read past its end
    /// into the next page; nothing of the frame is hashed, only the decoded page. Returns
    /// the bytes consumed after the frame header.
    fn read_legacy_frame_page(&mut self, pgno: u32, buf: &mut [u8]) -> Result<u64, LtxError> {
        let bad = |reason: String| LtxError::BadPageData { pgno, reason };
        const WHAT: &str = "legacy LZ4 frame";
        let mut head = [0u8; 6];
        read_exact_or(&mut self.r, &mut head, WHAT)?;
        if head[0..4] != [0x04, 0x22, 0x4d, 0x18] {
            return Err(bad(format!(
                "no size flag and no LZ4 frame magic (found {:02x?})",
                &head[0..4]
            )));
        }
        let flg = head[4];
        if flg >> 6 != 0b01 {
            return Err(bad(format!(
                "LZ4 frame version bits in {flg:#04x} are not 01"
            )));
        }
        if flg & 0x01 != 0 {
            return Err(bad("LZ4 frame uses a dictionary".into()));
        }
        let independent = flg & 0x20 != 0;
        let block_checksum = flg & 0x10 != 0;
        let content_size = flg & 0x08 != 0;
        let content_checksum = flg & 0x04 != 0;
        let mut consumed = head.len() as u64;
        // Optional content size, then the header checksum byte.
        let mut rest = [0u8; 9];
        let rest_len = if content_size { 9 } else { 1 };
        read_exact_or(&mut self.r, &mut rest[..rest_len], WHAT)?;
        consumed += rest_len as u64;

        let mut pos = 0usize;
        loop {
            let mut bs = [0u8; 4];
            read_exact_or(&mut self.r, &mut bs, WHAT)?;
            consumed += 4;
            let word = u32::from_le_bytes(bs);
            if word == 0 {
                break;
            }
            let raw = word & 0x8000_0000 != 0;
            let len = (word & 0x7fff_ffff) as usize;
            if len > self.max_compressed {
                return Err(bad(format!("LZ4 frame block of {len} bytes is too large")));
            }
            read_exact_or(&mut self.r, &mut self.comp_buf[..len], WHAT)?;
            consumed += len as u64;
            if block_checksum {
                read_exact_or(&mut self.r, &mut bs, WHAT)?;
                consumed += 4;
            }
            let block = &self.comp_buf[..len];
            let n = if raw {
                let end = pos + len;
                if end > buf.len() {
                    return Err(bad("LZ4 frame holds more than one page".into()));
                }
                buf[pos..end].copy_from_slice(block);
                len
            } else if independent || pos == 0 {
                lz4_flex::block::decompress_into(block, &mut buf[pos..])
                    .map_err(|e| bad(format!("LZ4 frame block does not decode: {e}")))?
            } else {
                let (dict, out) = buf.split_at_mut(pos);
                lz4_flex::block::decompress_into_with_dict(block, out, dict)
                    .map_err(|e| bad(format!("LZ4 frame block does not decode: {e}")))?
            };
            pos += n;
        }
        if content_checksum {
            let mut c = [0u8; 4];
            read_exact_or(&mut self.r, &mut c, WHAT)?;
            consumed += 4;
        }
        if pos != buf.len() {
            return Err(bad(format!(
                "LZ4 frame decodes to {pos} bytes, page size is {}",
                buf.len()
            )));
        }
        Ok(consumed)
    }

    /// Skips any pages not yet read, then reads and verifies the page index, the trailer
    /// and the file checksum, and checks that nothing follows the trailer. For a snapshot
    /// with declared checksums (trailer or hearth header extension) it also checks the
    /// post-apply checksum against the pages.
    pub fn finish(mut self) -> Result<DecodeSummary, LtxError> {
        let mut page = vec![0u8; self.header.page_size as usize];
        while self.next_page(&mut page)?.is_some() {}
        let h = self.header;
        if h.is_snapshot() {
            let next = next_snapshot_pgno(self.prev_pgno, h.lock_pgno());
            if next <= h.commit {
                return Err(LtxError::SnapshotGap {
                    expected: next,
                    found: None,
                });
            }
        }

        // Page index: (pgno, offset, size) varint triples, a zero terminator, then the
        // big-endian byte length of all that.
        let mut stored_index = digest();
        let mut index_len: u64 = 0;
        let mut entries: u32 = 0;
        loop {
            let pgno = self.read_index_uvarint(&mut stored_index, &mut index_len)?;
            if pgno == 0 {
                break;
            }
            self.read_index_uvarint(&mut stored_index, &mut index_len)?;
            self.read_index_uvarint(&mut stored_index, &mut index_len)?;
            entries = entries.saturating_add(1);
        }
        let mut lenb = [0u8; 8];
        read_exact_or(&mut self.r, &mut lenb, "page index size")?;
        self.hash.update(&lenb);
        let stored_len = u64::from_be_bytes(lenb);
        if stored_len != index_len {
            return Err(LtxError::BadPageIndex {
                reason: format!("size field says {stored_len} bytes, the index has {index_len}"),
            });
        }
        if entries != self.page_count {
            return Err(LtxError::BadPageIndex {
                reason: format!("{entries} entries for {} page frames", self.page_count),
            });
        }
        self.scratch.clear();
        put_uvarint(&mut self.scratch, 0);
        self.expected_index.update(&self.scratch);
        if stored_index.finalize() != self.expected_index.finalize() {
            return Err(LtxError::BadPageIndex {
                reason: "entries do not match the offsets and sizes of the page frames".into(),
            });
        }

        let mut tb = [0u8; TRAILER_SIZE];
        read_exact_or(&mut self.r, &mut tb, "trailer")?;
        let trailer = Trailer::from_bytes(&tb);
        self.hash.update(&tb[..8]);
        let computed = Checksum::from_crc(self.hash.finalize());
        if computed != trailer.file_checksum {
            return Err(LtxError::FileChecksumMismatch {
                stored: trailer.file_checksum,
                computed,
            });
        }
        trailer.validate(&h)?;
        if h.is_snapshot()
            && let Some((_, post)) = h.declared_checksums(&trailer)
            && post != self.pages_sum.value()
        {
            return Err(LtxError::PostApplyChecksumMismatch {
                stored: post,
                computed: self.pages_sum.value(),
            });
        }
        let mut extra = [0u8; 1];
        if read_full(&mut self.r, &mut extra)? != 0 {
            return Err(LtxError::TrailingData);
        }
        let size = self.n + 8 + index_len + TRAILER_SIZE as u64;
        Ok(DecodeSummary {
            header: h,
            trailer,
            size,
            page_count: self.page_count,
            pages_checksum: self.pages_sum.value(),
        })
    }

    /// Reads one LEB128 varint of the page index, feeding its bytes to the file hash and
    /// to the index hash.
    fn read_index_uvarint(
        &mut self,
        stored_index: &mut Digest,
        len: &mut u64,
    ) -> Result<u64, LtxError> {
        let mut v: u64 = 0;
        for i in 0..10u32 {
            let mut b = [0u8; 1];
            read_exact_or(&mut self.r, &mut b, "page index")?;
            self.hash.update(&b);
            stored_index.update(&b);
            *len += 1;
            let byte = u64::from(b[0]);
            if i == 9 && byte > 1 {
                break;
            }
            v |= (byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err(LtxError::BadPageIndex {
            reason: "a varint overflows 64 bits".into(),
        })
    }
}

fn failed_earlier() -> LtxError {
    LtxError::Io(io::Error::other(
        "an earlier read of this LTX file failed; decode it again from the start",
    ))
}
