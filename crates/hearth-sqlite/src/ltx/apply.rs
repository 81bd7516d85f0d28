//! Applying an LTX file to a database file image, which is what restore does.

use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};

use super::{Checksum, DbChecksum, DecodeSummary, Decoder, LtxError, page_checksum, read_exact_or};

/// A database file image that pages can be written into and that can be truncated.
///
/// `Write + Seek` alone cannot shrink a file, and shrinking is part of applying a file
/// whose commit size is smaller than the database.
pub trait DbImage: Read + Write + Seek {
    /// Sets the image length in bytes, zero-filling when it grows.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

impl DbImage for std::fs::File {
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }
}

impl DbImage for Cursor<Vec<u8>> {
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        self.get_mut().resize(len, 0);
        Ok(())
    }
}

/// Pages are written in runs of up to this many bytes.
const WRITE_RUN_BYTES: usize = 1 << 20;

/// Writes a run of consecutive pages at byte offset `at`.
fn write_run<T: DbImage + ?Sized>(target: &mut T, at: u64, run: &[u8]) -> io::Result<()> {
    target.seek(SeekFrom::Start(at))?;
    target.write_all(run)
}

/// The result of `apply`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// What the file contained (header, trailer, page count).
    pub summary: DecodeSummary,
    /// The database checksum after applying, when it could be tracked: always for a
    /// snapshot, and for other files when the caller passed the checksum before.
    pub checksum: Option<Checksum>,
}

/// Writes the pages of `dec` into `target` and sets its length to commit × page size.
///
/// A snapshot (min TXID 1) replaces the whole image. For other files, pass the
/// database checksum before applying as `current` to have the checksum carried through
/// the change: old page versions are read back before they are overwritten or cut off.
/// When the file declares checksums (in its trailer or in hearth's header extension),
/// `current` must then equal its pre-apply checksum (checked before anything is written) and the result must equal its
/// post-apply checksum. Errors found late (a bad file checksum in the trailer, a
/// post-apply mismatch) are reported after pages were written, so on error the target
/// must be thrown away; restore writes into a temporary file for that reason.
pub fn apply<R: Read, T: DbImage + ?Sized>(
    mut dec: Decoder<R>,
    target: &mut T,
    current: Option<Checksum>,
) -> Result<Applied, LtxError> {
    let h = *dec.header();
    let ps = u64::from(h.page_size);
    let lock = h.lock_pgno();
    if h.is_snapshot() {
        target.set_len(0)?;
    }
    let old_len = target.seek(SeekFrom::End(0))?;
    if !old_len.is_multiple_of(ps) {
        return Err(LtxError::BadDatabaseImage {
            reason: format!("length {old_len} is not a multiple of the page size {ps}"),
        });
    }
    let old_pages = u32::try_from(old_len / ps).map_err(|_| LtxError::BadDatabaseImage {
        reason: "more than 2^32-1 pages".into(),
    })?;
    let mut sum = if h.is_snapshot() {
        Some(DbChecksum::new())
    } else {
        current.map(DbChecksum::from_checksum)
    };
    if !h.is_snapshot()
        && let Some(expected) = h.declared_pre_apply()
        && let Some(cur) = current
        && cur != expected
    {
        return Err(LtxError::PreApplyChecksumMismatch {
            expected,
            actual: cur,
        });
    }

    let zero = vec![0u8; h.page_size as usize];
    let mut old = vec![0u8; h.page_size as usize];
    let page_len = h.page_size as usize;
    // Pages are decoded straight into a run of consecutive pages that is written with one seek and one
    // write when it is full or the next page does not follow it: a seek and a write per page cost most of
    // a restore's system time.
    let run_cap = (WRITE_RUN_BYTES / page_len).max(1) * page_len;
    let mut run = vec![0u8; run_cap];
    // Bytes of `run` in use, and the byte offset in the image where they go.
    let mut used = 0usize;
    let mut run_at: u64 = 0;
    // First page number past the old end that has not been accounted for yet; pages
    // the file skips there read back as zeros and count in the checksum as such.
    let mut grow_from = old_pages.saturating_add(1);
    loop {
        if used == run_cap {
            write_run(target, run_at, &run[..used])?;
            used = 0;
        }
        let Some(pgno) = dec.next_page(&mut run[used..used + page_len])? else {
            break;
        };
        let at = u64::from(pgno - 1) * ps;
        if used == 0 {
            run_at = at;
        } else if run_at + used as u64 != at {
            // Not adjacent to the run: write the run out and start a new one with this page.
            write_run(target, run_at, &run[..used])?;
            run.copy_within(used..used + page_len, 0);
            used = 0;
            run_at = at;
        }
        used += page_len;
        if let Some(s) = sum.as_mut() {
            // Pages are strictly ascending, so an old version is never in the unwritten run.
            if pgno <= old_pages {
                target.seek(SeekFrom::Start(at))?;
                read_exact_or(target, &mut old, "database image")?;
                s.toggle(page_checksum(pgno, &old));
            } else {
                for p in grow_from..pgno {
                    if p != lock {
                        s.toggle(page_checksum(p, &zero));
                    }
                }
                grow_from = pgno + 1;
            }
            // The new version's checksum is added from the decoder's sum of the file's pages below,
            // which it computes anyway: no second pass over every page.
        }
    }
    if used > 0 {
        write_run(target, run_at, &run[..used])?;
    }
    if let Some(s) = sum.as_mut() {
        // Pages cut off by a shrinking commit leave the checksum; pages added by a
        // growing commit but absent from the file enter it as zero pages.
        for p in h.commit.saturating_add(1)..=old_pages {
            if p != lock {
                target.seek(SeekFrom::Start(u64::from(p - 1) * ps))?;
                read_exact_or(target, &mut old, "database image")?;
                s.toggle(page_checksum(p, &old));
            }
        }
        for p in grow_from..=h.commit {
            if p != lock {
                s.toggle(page_checksum(p, &zero));
            }
        }
    }
    target.set_len(u64::from(h.commit) * ps)?;
    target.flush()?;

    let summary = dec.finish()?;
    if let Some(s) = sum.as_mut() {
        s.toggle(summary.pages_checksum);
    }
    let checksum = sum.map(|s| s.value());
    if let Some((_, post)) = h.declared_checksums(&summary.trailer)
        && let Some(c) = checksum
        && c != post
    {
        return Err(LtxError::PostApplyChecksumMismatch {
            stored: post,
            computed: c,
        });
    }
    Ok(Applied { summary, checksum })
}
