//! Streaming compaction: merge LTX files with contiguous TXID ranges into one file.

use std::io::{Read, Write};

use super::{
    Checksum, Decoder, Encoder, Finished, HEADER_FLAG_NO_CHECKSUM, Header, HearthChecksums,
    LtxError,
};

/// Choices for `compact`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactOptions {
    /// Write the output without database checksums even if every input carries them.
    /// Litestream's own compactor always does this.
    pub no_checksum: bool,
    /// Node ID for the output header; Litestream writes zero after compaction.
    pub node_id: u64,
}

/// Merges `inputs` (ordered oldest first, headers already read) into one LTX file on `out`.
///
/// This follows Litestream's compactor (ltx v0.5.2 `compactor.go`): pages are merged in
/// ascending page number and the newest input's version of a page wins; pages beyond the
/// newest commit size are dropped. The output covers the first input's minimum TXID to
/// the last input's maximum TXID, with the newest commit size and timestamp, the first
/// input's pre-apply checksum and the last input's post-apply checksum. WAL fields are
/// zero. A TXID range may overlap the previous one but must extend it without a gap (ltx's
/// `IsContiguous`).
///
/// The output tracks database checksums in its trailer only when every input does and
/// `no_checksum` is off. Otherwise, if every input carries hearth's header checksums, the
/// output carries them too (pre-apply of the first, post-apply of the last). Then adjacent inputs must chain: each pre-apply checksum must equal the previous
/// post-apply checksum. If the first input is a snapshot, the output is a snapshot and
/// the encoder checks that it holds every page and that its pages give the post-apply
/// checksum. Memory is one page buffer per input.
pub fn compact<R: Read, W: Write>(
    mut inputs: Vec<Decoder<R>>,
    out: W,
    opts: CompactOptions,
) -> Result<Finished<W>, LtxError> {
    let (first, last) = match (inputs.first(), inputs.last()) {
        (Some(f), Some(l)) => (*f.header(), *l.header()),
        _ => {
            return Err(LtxError::Compaction {
                reason: "no input files".into(),
            });
        }
    };
    for pair in inputs.windows(2) {
        let (a, b) = (pair[0].header(), pair[1].header());
        if a.page_size != b.page_size {
            return Err(LtxError::Compaction {
                reason: format!("page sizes differ: {} and {}", a.page_size, b.page_size),
            });
        }
        if !(b.min_txid <= a.max_txid.saturating_add(1) && b.max_txid > a.max_txid) {
            return Err(LtxError::Compaction {
                reason: format!(
                    "TXID ranges are not contiguous: {:016x}-{:016x} then {:016x}-{:016x}",
                    a.min_txid, a.max_txid, b.min_txid, b.max_txid
                ),
            });
        }
    }
    let checksums = !opts.no_checksum && inputs.iter().all(|d| !d.header().no_checksum());
    // hearth's header checksums survive when the output has no trailer checksums and
    // every input carries them: both ends are in the input headers, known up front.
    let hearth = if checksums {
        None
    } else {
        match (first.hearth, last.hearth) {
            (Some(a), Some(b)) if inputs.iter().all(|d| d.header().hearth.is_some()) => {
                Some(HearthChecksums {
                    pre_apply: a.pre_apply,
                    post_apply: b.post_apply,
                })
            }
            _ => None,
        }
    };
    if hearth.is_some() {
        for pair in inputs.windows(2) {
            let (a, b) = (pair[0].header(), pair[1].header());
            if let (Some(x), Some(y)) = (a.hearth, b.hearth)
                && b.min_txid == a.max_txid + 1
                && y.pre_apply != x.post_apply
            {
                return Err(LtxError::Compaction {
                    reason: format!(
                        "hearth checksum chain is broken at TXID {:016x}: pre-apply {} but the previous file ends at {}",
                        b.min_txid, y.pre_apply, x.post_apply
                    ),
                });
            }
        }
    }
    let header = Header {
        flags: if checksums {
            0
        } else {
            HEADER_FLAG_NO_CHECKSUM
        },
        page_size: first.page_size,
        commit: last.commit,
        min_txid: first.min_txid,
        max_txid: last.max_txid,
        timestamp_ms: last.timestamp_ms,
        pre_apply_checksum: if checksums {
            first.pre_apply_checksum
        } else {
            Checksum::ZERO
        },
        wal_offset: 0,
        wal_size: 0,
        wal_salt1: 0,
        wal_salt2: 0,
        node_id: opts.node_id,
        hearth,
    };
    let mut enc = Encoder::new(out, header)?;

    let ps = first.page_size as usize;
    let mut bufs: Vec<Vec<u8>> = inputs.iter().map(|_| vec![0u8; ps]).collect();
    let mut cur: Vec<Option<u32>> = Vec::with_capacity(inputs.len());
    for (dec, buf) in inputs.iter_mut().zip(bufs.iter_mut()) {
        cur.push(dec.next_page(buf)?);
    }
    while let Some(pgno) = cur.iter().flatten().min().copied() {
        // The newest input holding this page has the version that wins.
        if let Some(newest) = (0..inputs.len()).rev().find(|&i| cur[i] == Some(pgno))
            && pgno <= header.commit
        {
            enc.write_page(pgno, &bufs[newest])?;
        }
        for i in 0..inputs.len() {
            if cur[i] == Some(pgno) {
                cur[i] = inputs[i].next_page(&mut bufs[i])?;
            }
        }
    }

    let mut summaries = Vec::with_capacity(inputs.len());
    for dec in inputs {
        summaries.push(dec.finish()?);
    }
    let mut post = Checksum::ZERO;
    if checksums {
        for pair in summaries.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.header.min_txid == a.header.max_txid + 1
                && b.header.pre_apply_checksum != a.trailer.post_apply_checksum
            {
                return Err(LtxError::Compaction {
                    reason: format!(
                        "checksum chain is broken at TXID {:016x}: pre-apply {} but the previous file ends at {}",
                        b.header.min_txid,
                        b.header.pre_apply_checksum,
                        a.trailer.post_apply_checksum
                    ),
                });
            }
        }
        if let Some(s) = summaries.last() {
            post = s.trailer.post_apply_checksum;
        }
    }
    enc.finish(post)
}
