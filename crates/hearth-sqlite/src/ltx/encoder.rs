//! Streaming LTX encoder: header, LZ4-block page frames in ascending order, page index, trailer.

use std::io::{self, Seek, SeekFrom, Write};

use crc::{Digest, Table};

use super::checksum::{CRC64, crc64_combine, digest};
use super::{
    Checksum, DbChecksum, HEADER_SIZE, Header, HearthChecksums, LtxError, PAGE_FLAG_SIZE,
    PageHeader, Trailer, page_checksum,
};

/// Writes one LTX file to `W` page by page.
///
/// Memory stays bounded by one compressed page plus the page index, which the format
/// puts at the end of the file and therefore has to be kept until `finish`; it costs
/// at most 15 bytes per page written (three LEB128 varints), about 1 MiB for a 1 GiB
/// database of 4 KiB pages.
pub struct Encoder<W: Write> {
    w: W,
    header: Header,
    /// CRC of everything after the header. The header's CRC is combined in at the end,
    /// so `finish_with_hearth_checksums` can still rewrite the header.
    hash: Digest<'static, u64, Table<16>>,
    hashed: u64,
    /// Bytes written so far, which is also the offset of the next frame.
    n: u64,
    prev_pgno: u32,
    page_count: u32,
    index: Vec<u8>,
    compress_buf: Vec<u8>,
    pages_sum: DbChecksum,
    poisoned: bool,
}

/// What `Encoder::finish` returns: the writer back plus what was written.
#[derive(Debug)]
pub struct Finished<W> {
    /// The underlying writer, flushed.
    pub writer: W,
    /// The header as written.
    pub header: Header,
    /// The trailer as written, including the file checksum.
    pub trailer: Trailer,
    /// Total file size in bytes.
    pub size: u64,
    /// Number of page frames written.
    pub page_count: u32,
}

impl<W: Write> Encoder<W> {
    /// Validates `header` and writes it. Use `HEADER_FLAG_NO_CHECKSUM` in `flags` to write
    /// a file without database checksums, as Litestream itself does.
    pub fn new(mut w: W, header: Header) -> Result<Encoder<W>, LtxError> {
        header.validate()?;
        w.write_all(&header.to_bytes())?;
        let bound = lz4_flex::block::get_maximum_output_size(header.page_size as usize);
        Ok(Encoder {
            w,
            header,
            hash: digest(),
            hashed: 0,
            n: HEADER_SIZE as u64,
            prev_pgno: 0,
            page_count: 0,
            index: Vec::new(),
            compress_buf: vec![0u8; bound],
            pages_sum: DbChecksum::new(),
            poisoned: false,
        })
    }

    /// The header being written.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The XOR-combined checksum of the pages written so far (flag bit set). For a
    /// snapshot this is the database checksum once every page is written.
    pub fn pages_checksum(&self) -> Checksum {
        self.pages_sum.value()
    }

    /// Appends one page. Pages must come in strictly ascending page number, must lie
    /// within the commit size, and must not be the SQLite lock page; a snapshot must
    /// contain every page from 1 on. A rejected page leaves the encoder usable; an I/O
    /// error does not.
    pub fn write_page(&mut self, pgno: u32, data: &[u8]) -> Result<(), LtxError> {
        self.check_usable()?;
        let h = &self.header;
        if pgno == 0 {
            return Err(LtxError::ZeroPageNumber);
        }
        if data.len() != h.page_size as usize {
            return Err(LtxError::PageSizeMismatch {
                len: data.len(),
                page_size: h.page_size,
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
        if pgno <= self.prev_pgno {
            return Err(LtxError::PageOutOfOrder {
                prev: self.prev_pgno,
                pgno,
            });
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

        let clen = lz4_flex::block::compress_into(data, &mut self.compress_buf).map_err(|e| {
            // The buffer is sized with lz4_flex's own bound, so this cannot happen for a
            // page-sized input; report it rather than panic.
            LtxError::BadPageData {
                pgno,
                reason: format!("LZ4 compression failed: {e}"),
            }
        })?;
        let ph = PageHeader {
            pgno,
            flags: PAGE_FLAG_SIZE,
        }
        .to_bytes();
        let size = (clen as u32).to_be_bytes();
        let offset = self.n;
        self.poisoned = true;
        self.w.write_all(&ph)?;
        self.w.write_all(&size)?;
        self.w.write_all(&self.compress_buf[..clen])?;
        self.poisoned = false;
        // The file checksum covers the frame header, the size prefix and the page as
        // decompressed, never the compressed bytes (ltx v0.5.2 encoder.go).
        self.hash_update(&ph);
        self.hash_update(&size);
        self.hash_update(data);
        let frame_len = (ph.len() + size.len() + clen) as u64;
        self.n += frame_len;
        put_uvarint(&mut self.index, u64::from(pgno));
        put_uvarint(&mut self.index, offset);
        put_uvarint(&mut self.index, frame_len);
        self.pages_sum.toggle(page_checksum(pgno, data));
        self.prev_pgno = pgno;
        self.page_count += 1;
        Ok(())
    }

    /// Writes the end of the page block, the page index and the trailer.
    ///
    /// `post_apply` is the database checksum after this file is applied, or
    /// `Checksum::ZERO` for a no-checksum file (including files that carry hearth's
    /// checksums in the header). For a snapshot, the declared post-apply checksum must
    /// equal `pages_checksum()`; a mismatch is reported instead of writing a wrong file.
    pub fn finish(mut self, post_apply: Checksum) -> Result<Finished<W>, LtxError> {
        self.check_usable()?;
        let h = self.header;
        let trailer = self.check_finish(&h, post_apply)?;
        let body = self.write_tail(post_apply)?;
        self.complete(h, trailer, body)
    }

    /// Checks the end-of-file rules for header `h` and returns the trailer to write
    /// (file checksum still to be filled in).
    fn check_finish(&self, h: &Header, post_apply: Checksum) -> Result<Trailer, LtxError> {
        if h.is_snapshot() {
            let next = next_snapshot_pgno(self.prev_pgno, h.lock_pgno());
            if next <= h.commit {
                return Err(LtxError::SnapshotGap {
                    expected: next,
                    found: None,
                });
            }
        }
        let trailer = Trailer {
            post_apply_checksum: post_apply,
            file_checksum: Checksum::FLAG,
        };
        trailer.validate(h)?;
        if h.is_snapshot()
            && let Some((_, post)) = h.declared_checksums(&trailer)
            && post != self.pages_sum.value()
        {
            return Err(LtxError::PostApplyChecksumMismatch {
                stored: post,
                computed: self.pages_sum.value(),
            });
        }
        Ok(trailer)
    }

    /// Writes the end marker, the page index and its size, and hashes them with the
    /// post-apply field. Returns the CRC of everything after the header.
    fn write_tail(&mut self, post_apply: Checksum) -> Result<u64, LtxError> {
        let end = PageHeader::default().to_bytes();
        put_uvarint(&mut self.index, 0);
        let index_len = (self.index.len() as u64).to_be_bytes();
        self.w.write_all(&end)?;
        self.w.write_all(&self.index)?;
        self.w.write_all(&index_len)?;
        self.hash_update(&end);
        let index = std::mem::take(&mut self.index);
        self.hash_update(&index);
        self.hash_update(&index_len);
        self.hash_update(&post_apply.0.to_be_bytes());
        self.n += (end.len() + index.len() + index_len.len()) as u64;
        let hash = std::mem::replace(&mut self.hash, digest());
        Ok(hash.finalize())
    }

    /// Combines the header CRC with the body CRC and writes the trailer.
    fn complete(
        mut self,
        h: Header,
        mut trailer: Trailer,
        body: u64,
    ) -> Result<Finished<W>, LtxError> {
        let head = CRC64.checksum(&h.to_bytes());
        trailer.file_checksum = Checksum::from_crc(crc64_combine(head, body, self.hashed));
        self.w.write_all(&trailer.to_bytes())?;
        self.w.flush()?;
        Ok(Finished {
            writer: self.w,
            header: h,
            trailer,
            size: self.n + super::TRAILER_SIZE as u64,
            page_count: self.page_count,
        })
    }

    fn hash_update(&mut self, b: &[u8]) {
        self.hash.update(b);
        self.hashed += b.len() as u64;
    }

    fn check_usable(&self) -> Result<(), LtxError> {
        if self.poisoned {
            return Err(LtxError::Io(io::Error::other(
                "an earlier write failed, so this LTX output is incomplete",
            )));
        }
        Ok(())
    }
}

impl<W: Write + Seek> Encoder<W> {
    /// Finishes a no-checksum file and stores hearth's database checksums in its header,
    /// for when the post-apply checksum is only known once every page is written.
    ///
    /// The header is rewritten in place, so `W` must be seekable (a local file, as
    /// Litestream also stages files locally); the file checksum still covers the final
    /// header. The header must carry the no-checksum flag.
    pub fn finish_with_hearth_checksums(
        mut self,
        checksums: HearthChecksums,
    ) -> Result<Finished<W>, LtxError> {
        self.check_usable()?;
        let mut h = self.header;
        h.hearth = Some(checksums);
        h.validate()?;
        let trailer = self.check_finish(&h, Checksum::ZERO)?;
        let body = self.write_tail(Checksum::ZERO)?;
        // Go back over the body to the header, rewrite it, and return to the end.
        let back = i64::try_from(self.n).map_err(io::Error::other)?;
        self.w.seek(SeekFrom::Current(-back))?;
        self.w.write_all(&h.to_bytes())?;
        self.w.seek(SeekFrom::Current(back - HEADER_SIZE as i64))?;
        self.complete(h, trailer, body)
    }
}

/// The page a snapshot must contain after `prev`, stepping over the lock page.
pub(crate) fn next_snapshot_pgno(prev: u32, lock: u32) -> u32 {
    let next = prev.saturating_add(1);
    if next == lock {
        next.saturating_add(1)
    } else {
        next
    }
}

/// Appends `v` as an unsigned LEB128 varint, the encoding of Go's `binary.AppendUvarint`.
pub(crate) fn put_uvarint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}
