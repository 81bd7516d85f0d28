//! Data-driven tests of the LTX encoder, decoder, checksums, compaction, apply and file names.

// Helper functions outside #[test] bodies are test code too; clippy.toml's
// allow-unwrap-in-tests does not reach them, so allow unwrap for the whole file.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use hearth_sqlite::ltx::{
    self, Checksum, CompactOptions, DbChecksum, Decoder, Encoder, HEADER_FLAG_NO_CHECKSUM, Header,
    LtxError, apply, checksum_database, compact, format_filename, page_checksum, parse_filename,
    peek_header,
};

/// Pages as (page number, bytes), ascending.
type Pages = Vec<(u32, Vec<u8>)>;
/// A check that an error is the expected one.
type Check = fn(&LtxError) -> bool;

/// A deterministic page whose content depends on the page number and a version tag,
/// with some repetition so LZ4 has something to compress and some noise so it is not trivial.
fn page(page_size: u32, pgno: u32, version: u8) -> Vec<u8> {
    let mut x: u32 = pgno.wrapping_mul(2_654_435_761) ^ u32::from(version).wrapping_mul(40_503);
    (0..page_size as usize)
        .map(|i| {
            if i % 64 < 40 {
                (i as u8) ^ version
            } else {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            }
        })
        .collect()
}

fn header(page_size: u32, commit: u32, min: u64, max: u64, checksums: bool) -> Header {
    Header {
        flags: if checksums {
            0
        } else {
            HEADER_FLAG_NO_CHECKSUM
        },
        page_size,
        commit,
        min_txid: min,
        max_txid: max,
        timestamp_ms: 1_700_000_000_000 + max as i64,
        pre_apply_checksum: Checksum::ZERO,
        ..Header::default()
    }
}

/// Encodes a file; returns its bytes.
fn encode(h: Header, pages: &[(u32, Vec<u8>)], post: Checksum) -> Vec<u8> {
    let mut enc = Encoder::new(Vec::new(), h).unwrap();
    for (pgno, data) in pages {
        enc.write_page(*pgno, data).unwrap();
    }
    let fin = enc.finish(post).unwrap();
    assert_eq!(fin.size, fin.writer.len() as u64);
    assert_eq!(fin.page_count as usize, pages.len());
    assert_eq!(fin.trailer.post_apply_checksum, post);
    fin.writer
}

/// Decodes a whole file into (header, pages, summary).
fn decode(bytes: &[u8]) -> Result<(Header, Pages, ltx::DecodeSummary), LtxError> {
    let mut dec = Decoder::new(bytes)?;
    let h = *dec.header();
    let mut buf = vec![0u8; h.page_size as usize];
    let mut pages = Vec::new();
    while let Some(pgno) = dec.next_page(&mut buf)? {
        pages.push((pgno, buf.clone()));
    }
    let s = dec.finish()?;
    Ok((h, pages, s))
}

fn db_checksum(pages: &[(u32, Vec<u8>)]) -> Checksum {
    let mut s = DbChecksum::new();
    for (p, d) in pages {
        s.add_page(*p, d);
    }
    s.value()
}

/// A small valid snapshot with checksums, used by the corruption sweeps.
fn sample_snapshot() -> Vec<u8> {
    let pages: Vec<_> = (1..=3).map(|p| (p, page(512, p, 1))).collect();
    encode(header(512, 3, 1, 4, true), &pages, db_checksum(&pages))
}

#[test]
fn round_trips() {
    struct Case {
        name: &'static str,
        page_size: u32,
        commit: u32,
        min: u64,
        max: u64,
        pgnos: Vec<u32>,
        checksums: bool,
    }
    let cases = vec![
        Case {
            name: "snapshot 512",
            page_size: 512,
            commit: 5,
            min: 1,
            max: 1,
            pgnos: (1..=5).collect(),
            checksums: true,
        },
        Case {
            name: "snapshot 4096 no checksum",
            page_size: 4096,
            commit: 3,
            min: 1,
            max: 7,
            pgnos: vec![1, 2, 3],
            checksums: false,
        },
        Case {
            name: "snapshot 64k",
            page_size: 65536,
            commit: 2,
            min: 1,
            max: 2,
            pgnos: vec![1, 2],
            checksums: true,
        },
        Case {
            name: "incremental sparse",
            page_size: 4096,
            commit: 100,
            min: 8,
            max: 9,
            pgnos: vec![1, 7, 50, 100],
            checksums: true,
        },
        Case {
            name: "incremental no checksum",
            page_size: 1024,
            commit: 10,
            min: 3,
            max: 3,
            pgnos: vec![2, 10],
            checksums: false,
        },
        Case {
            name: "incremental without pages",
            page_size: 4096,
            commit: 4,
            min: 5,
            max: 5,
            pgnos: vec![],
            checksums: true,
        },
        Case {
            name: "empty database snapshot",
            page_size: 4096,
            commit: 0,
            min: 1,
            max: 1,
            pgnos: vec![],
            checksums: true,
        },
    ];
    for c in cases {
        let pages: Vec<_> = c
            .pgnos
            .iter()
            .map(|&p| (p, page(c.page_size, p, 3)))
            .collect();
        let mut h = header(c.page_size, c.commit, c.min, c.max, c.checksums);
        h.wal_offset = 32;
        h.wal_size = 4152;
        h.wal_salt1 = 0xdead_beef;
        h.wal_salt2 = 7;
        h.node_id = 42;
        let post = if !c.checksums {
            Checksum::ZERO
        } else if c.min == 1 {
            db_checksum(&pages)
        } else {
            h.pre_apply_checksum = Checksum(Checksum::FLAG.0 | 0x1234);
            Checksum(Checksum::FLAG.0 | 0x5678)
        };
        let bytes = encode(h, &pages, post);
        let (h2, pages2, s) = decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(h2, h, "{}", c.name);
        assert_eq!(pages2, pages, "{}", c.name);
        assert_eq!(s.trailer.post_apply_checksum, post, "{}", c.name);
        assert_eq!(s.size, bytes.len() as u64, "{}", c.name);
        assert_eq!(s.page_count as usize, pages.len(), "{}", c.name);
        assert_eq!(peek_header(&bytes[..100]).unwrap(), h, "{}", c.name);
        // Integers are big-endian at the documented offsets.
        assert_eq!(&bytes[0..4], b"LTX1");
        assert_eq!(&bytes[8..12], &c.page_size.to_be_bytes());
        assert_eq!(&bytes[16..24], &c.min.to_be_bytes());
        assert_eq!(&bytes[72..80], &42u64.to_be_bytes());
        assert!(bytes[80..100].iter().all(|&b| b == 0));
    }
}

#[test]
fn encoder_rejects_bad_page_sequences() {
    // (name, min txid, commit, page size, pages to write, index of the page that must fail, check)
    type Case = (&'static str, u64, u32, u32, Vec<u32>, usize, Check);
    let cases: Vec<Case> = vec![
        ("descending", 2, 10, 4096, vec![3, 2], 1, |e| {
            matches!(e, LtxError::PageOutOfOrder { prev: 3, pgno: 2 })
        }),
        ("duplicate", 2, 10, 4096, vec![3, 3], 1, |e| {
            matches!(e, LtxError::PageOutOfOrder { prev: 3, pgno: 3 })
        }),
        ("zero", 2, 10, 4096, vec![0], 0, |e| {
            matches!(e, LtxError::ZeroPageNumber)
        }),
        ("beyond commit", 2, 10, 4096, vec![11], 0, |e| {
            matches!(
                e,
                LtxError::PageBeyondCommit {
                    pgno: 11,
                    commit: 10
                }
            )
        }),
        ("lock page 4k", 2, 300_000, 4096, vec![262_145], 0, |e| {
            matches!(e, LtxError::LockPage { pgno: 262_145 })
        }),
        ("lock page 64k", 2, 20_000, 65536, vec![16_385], 0, |e| {
            matches!(e, LtxError::LockPage { pgno: 16_385 })
        }),
        ("snapshot must start at 1", 1, 10, 4096, vec![2], 0, |e| {
            matches!(
                e,
                LtxError::SnapshotGap {
                    expected: 1,
                    found: Some(2)
                }
            )
        }),
        ("snapshot gap", 1, 10, 4096, vec![1, 3], 1, |e| {
            matches!(
                e,
                LtxError::SnapshotGap {
                    expected: 2,
                    found: Some(3)
                }
            )
        }),
    ];
    for (name, min, commit, ps, pgnos, fail_at, check) in cases {
        let mut h = header(ps, commit, min, min, true);
        if min > 1 {
            h.pre_apply_checksum = Checksum::FLAG;
        }
        let mut enc = Encoder::new(Vec::new(), h).unwrap();
        for (i, p) in pgnos.iter().enumerate() {
            let r = enc.write_page(*p, &vec![0u8; ps as usize]);
            if i == fail_at {
                let e = r.expect_err(name);
                assert!(check(&e), "{name}: unexpected error {e:?}");
                assert!(!e.is_retryable(), "{name}");
            } else {
                r.unwrap_or_else(|e| panic!("{name}: page {p}: {e}"));
            }
        }
    }
    // A wrong-sized buffer.
    let mut enc = Encoder::new(Vec::new(), header(4096, 3, 1, 1, true)).unwrap();
    assert!(matches!(
        enc.write_page(1, &[0u8; 512]),
        Err(LtxError::PageSizeMismatch {
            len: 512,
            page_size: 4096
        })
    ));
    // The snapshot skips the lock page: 16384 is followed by 16386 at 64 KiB pages.
    let mut enc = Encoder::new(std::io::sink(), header(65536, 16_386, 1, 1, false)).unwrap();
    let zero = vec![0u8; 65536];
    for p in (1..=16_386).filter(|&p| p != 16_385) {
        enc.write_page(p, &zero).unwrap();
    }
    enc.finish(Checksum::ZERO).unwrap();
}

#[test]
fn encoder_finish_rules() {
    // A snapshot that stops before its commit size.
    let mut enc = Encoder::new(Vec::new(), header(512, 3, 1, 1, false)).unwrap();
    enc.write_page(1, &page(512, 1, 0)).unwrap();
    assert!(matches!(
        enc.finish(Checksum::ZERO),
        Err(LtxError::SnapshotGap {
            expected: 2,
            found: None
        })
    ));
    // A snapshot whose post-apply checksum is not the checksum of its pages.
    let mut enc = Encoder::new(Vec::new(), header(512, 1, 1, 1, true)).unwrap();
    enc.write_page(1, &page(512, 1, 0)).unwrap();
    assert!(matches!(
        enc.finish(Checksum(Checksum::FLAG.0 | 99)),
        Err(LtxError::PostApplyChecksumMismatch { .. })
    ));
    // A no-checksum file with a checksum, and a checksum file without one.
    let enc = Encoder::new(Vec::new(), header(512, 0, 1, 1, false)).unwrap();
    assert!(matches!(
        enc.finish(Checksum::FLAG),
        Err(LtxError::InvalidTrailer { .. })
    ));
    let mut h = header(512, 0, 2, 2, true);
    h.pre_apply_checksum = Checksum::FLAG;
    let enc = Encoder::new(Vec::new(), h).unwrap();
    assert!(matches!(
        enc.finish(Checksum(5)),
        Err(LtxError::InvalidTrailer { .. })
    ));
    // An empty database must end at exactly the flag-only checksum.
    let enc = Encoder::new(Vec::new(), h).unwrap();
    assert!(matches!(
        enc.finish(Checksum(Checksum::FLAG.0 | 1)),
        Err(LtxError::InvalidTrailer { .. })
    ));
}

#[test]
fn header_validation() {
    type Edit = fn(&mut Header);
    let cases: Vec<(&str, Edit, Check)> = vec![
        (
            "version 1 LZ4 flag",
            |h| h.flags |= 1,
            |e| matches!(e, LtxError::UnsupportedVersion { flags: 1 }),
        ),
        (
            "unknown flag",
            |h| h.flags |= 1 << 9,
            |e| matches!(e, LtxError::UnsupportedVersion { .. }),
        ),
        (
            "page size 1000",
            |h| h.page_size = 1000,
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
        (
            "page size 256",
            |h| h.page_size = 256,
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
        (
            "min txid 0",
            |h| h.min_txid = 0,
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
        (
            "min above max",
            |h| {
                h.min_txid = 5;
                h.max_txid = 4
            },
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
        (
            "negative wal offset",
            |h| h.wal_offset = -1,
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
        (
            "salt without offset",
            |h| h.wal_salt1 = 1,
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
        (
            "wal size without offset",
            |h| h.wal_size = 10,
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
        (
            "snapshot with pre-apply",
            |h| h.pre_apply_checksum = Checksum::FLAG,
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
        (
            "incremental without pre-apply",
            |h| h.min_txid = 2,
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
        (
            "pre-apply without flag bit",
            |h| {
                h.min_txid = 2;
                h.pre_apply_checksum = Checksum(3)
            },
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
        (
            "no-checksum with pre-apply",
            |h| {
                h.min_txid = 2;
                h.flags = HEADER_FLAG_NO_CHECKSUM;
                h.pre_apply_checksum = Checksum::FLAG
            },
            |e| matches!(e, LtxError::InvalidHeader { .. }),
        ),
    ];
    for (name, edit, check) in cases {
        let mut h = header(4096, 1, 1, 2, true);
        edit(&mut h);
        let e = Encoder::new(Vec::new(), h)
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(check(&e), "{name}: {e:?}");
        // The same header on disk is rejected by the decoder and by peek_header.
        let bytes = h.to_bytes();
        let e = peek_header(&bytes).expect_err(name);
        assert!(check(&e), "{name}: {e:?}");
    }
    assert!(matches!(
        peek_header(b"LTX1"),
        Err(LtxError::Truncated { what: "header" })
    ));
    let mut bytes = header(4096, 1, 1, 1, true).to_bytes();
    bytes[0..4].copy_from_slice(b"SQLi");
    assert!(matches!(peek_header(&bytes), Err(LtxError::BadMagic { found }) if &found == b"SQLi"));
}

#[test]
fn every_truncation_is_detected() {
    let bytes = sample_snapshot();
    decode(&bytes).unwrap();
    for len in 0..bytes.len() {
        let e = decode(&bytes[..len])
            .map(|_| ())
            .expect_err(&format!("prefix {len} accepted"));
        assert!(
            matches!(e, LtxError::Truncated { .. }),
            "prefix of {len} bytes gave {e:?}"
        );
        assert!(e.is_retryable());
    }
}

#[test]
fn every_bit_flip_is_detected() {
    let bytes = sample_snapshot();
    let original = decode(&bytes).unwrap();
    // Byte ranges holding LZ4 payloads: after each 10-byte frame header and size prefix.
    let mut payloads = Vec::new();
    let mut off = 100;
    for _ in 0..3 {
        let clen = u32::from_be_bytes(bytes[off + 6..off + 10].try_into().unwrap()) as usize;
        payloads.push(off + 10..off + 10 + clen);
        off += 10 + clen;
    }
    let mut harmless = 0;
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            match decode(&b) {
                Err(e) => assert!(!matches!(e, LtxError::Io(_)), "byte {i}: {e:?}"),
                // The file checksum covers the decompressed pages, not the LZ4 bytes (as
                // the format defines), so a flip may only go unnoticed if it leaves the
                // decoded content exactly as it was: an LZ4 match offset that points at
                // identical earlier bytes.
                Ok(decoded) => {
                    assert!(
                        payloads.iter().any(|r| r.contains(&i)),
                        "flip in byte {i} outside the LZ4 payloads accepted"
                    );
                    assert_eq!(
                        decoded, original,
                        "flip of bit {bit} in byte {i} changed content unnoticed"
                    );
                    harmless += 1;
                }
            }
        }
    }
    assert!(harmless < 20, "{harmless} flips went unnoticed");
}

#[test]
fn named_corruptions() {
    let good = sample_snapshot();
    let len = good.len();
    type Mutate = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutate, Check)> = vec![
        ("bad magic", Box::new(|b| b[0] = b'X'), |e| {
            matches!(e, LtxError::BadMagic { .. })
        }),
        ("version 1 flag", Box::new(|b| b[7] |= 1), |e| {
            matches!(e, LtxError::UnsupportedVersion { .. })
        }),
        ("file checksum", Box::new(move |b| b[len - 1] ^= 1), |e| {
            matches!(e, LtxError::FileChecksumMismatch { .. })
        }),
        (
            "post-apply checksum",
            Box::new(move |b| b[len - 9] ^= 1),
            |e| matches!(e, LtxError::FileChecksumMismatch { .. }),
        ),
        ("reserved header byte", Box::new(|b| b[90] = 1), |e| {
            matches!(e, LtxError::FileChecksumMismatch { .. })
        }),
        ("trailing data", Box::new(|b| b.push(0)), |e| {
            matches!(e, LtxError::TrailingData)
        }),
        // Without the size flag the payload is read as a legacy LZ4 frame, which it is not.
        ("size flag cleared", Box::new(|b| b[105] = 0), |e| {
            matches!(e, LtxError::BadPageData { pgno: 1, .. })
        }),
        ("unknown page flag", Box::new(|b| b[105] = 3), |e| {
            matches!(e, LtxError::UnsupportedPageFlags { pgno: 1, flags: 3 })
        }),
        ("page 1 renumbered", Box::new(|b| b[103] = 2), |e| {
            matches!(
                e,
                LtxError::SnapshotGap {
                    expected: 1,
                    found: Some(2)
                }
            )
        }),
        ("compressed size huge", Box::new(|b| b[106] = 0x7f), |e| {
            matches!(e, LtxError::BadPageData { pgno: 1, .. })
        }),
        // Index size field: the 8 bytes before the trailer.
        (
            "index size field",
            Box::new(move |b| b[len - 17] ^= 1),
            |e| matches!(e, LtxError::BadPageIndex { .. }),
        ),
    ];
    for (name, mutate, check) in cases {
        let mut b = good.clone();
        mutate(&mut b);
        let e = decode(&b).map(|_| ()).expect_err(name);
        assert!(check(&e), "{name}: {e:?}");
        assert!(!e.is_retryable(), "{name}");
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn snapshot_post_apply_must_match_pages() {
    // Forge a snapshot whose trailer checksum is consistent with the file but not with
    // the pages: encode it as a no-checksum file first is not possible, so rewrite the
    // trailer and recompute the file checksum the way the format defines it.
    let pages: Vec<_> = (1..=2).map(|p| (p, page(512, p, 1))).collect();
    let mut bytes = encode(header(512, 2, 1, 1, true), &pages, db_checksum(&pages));
    let n = bytes.len();
    let wrong = Checksum::FLAG.0 | 77;
    bytes[n - 16..n - 8].copy_from_slice(&wrong.to_be_bytes());
    // File checksum: CRC over header, frames with decompressed data, index, post-apply.
    let mut d = GO_ISO.digest();
    d.update(&bytes[..100]);
    let mut off = 100;
    for (_, data) in &pages {
        let clen = u32::from_be_bytes(bytes[off + 6..off + 10].try_into().unwrap()) as usize;
        d.update(&bytes[off..off + 10]);
        d.update(data);
        off += 10 + clen;
    }
    d.update(&bytes[off..n - 8]);
    let file = Checksum::FLAG.0 | d.finalize();
    bytes[n - 8..].copy_from_slice(&file.to_be_bytes());
    assert!(matches!(
        decode(&bytes),
        Err(LtxError::PostApplyChecksumMismatch { .. })
    ));
}

/// Go's crc64.ISO, spelled out independently of the library under test.
static GO_ISO: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_GO_ISO);

#[test]
fn page_checksum_definition() {
    let data = page(4096, 7, 2);
    let mut d = GO_ISO.digest();
    d.update(&7u32.to_be_bytes());
    d.update(&data);
    assert_eq!(page_checksum(7, &data), Checksum(d.finalize() | (1 << 63)));
    // The whole-file checksum equals the XOR of the page checksums.
    let pages: Vec<_> = (1..=4).map(|p| (p, page(1024, p, 5))).collect();
    let image: Vec<u8> = pages.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(
        checksum_database(&image[..], 1024).unwrap(),
        db_checksum(&pages)
    );
    assert_eq!(checksum_database(&[][..], 1024).unwrap(), Checksum::FLAG);
}

#[test]
fn filenames() {
    assert_eq!(
        format_filename(1, 5),
        "0000000000000001-0000000000000005.ltx"
    );
    assert_eq!(
        format_filename(0xabc, u64::MAX),
        "0000000000000abc-ffffffffffffffff.ltx"
    );
    assert_eq!(
        parse_filename("0000000000000001-0000000000000005.ltx").unwrap(),
        (1, 5)
    );
    assert_eq!(
        ltx::replica_file_path(9, 1, 5),
        "ltx/9/0000000000000001-0000000000000005.ltx"
    );
    assert_eq!(
        ltx::replica_s3_key(10, 1, 5),
        "000a/0000000000000001-0000000000000005.ltx"
    );
    let bad = [
        "",
        "0000000000000001-0000000000000005",
        "0000000000000001-0000000000000005.ltx.tmp",
        "0000000000000001_0000000000000005.ltx",
        "000000000000000A-0000000000000005.ltx",
        "000000000000001-00000000000000005.ltx",
        "0000000000000000-0000000000000005.ltx",
        "0000000000000006-0000000000000005.ltx",
        "+000000000000001-0000000000000005.ltx",
        "00000000000000g1-0000000000000005.ltx",
    ];
    for name in bad {
        assert!(
            matches!(parse_filename(name), Err(LtxError::BadFilename { .. })),
            "{name:?} accepted"
        );
    }
}

/// Builds the file for one step of a simulated database history: `changes` are
/// (pgno, version) pairs written on top of `db`, then the database is cut to `commit`.
fn step(
    db: &mut Vec<(u32, Vec<u8>)>,
    txid: u64,
    commit: u32,
    changes: &[(u32, u8)],
    ps: u32,
) -> Vec<u8> {
    let pre = db_checksum(db);
    let mut pages = Vec::new();
    for &(p, v) in changes {
        let data = page(ps, p, v);
        match db.iter_mut().find(|(q, _)| *q == p) {
            Some(slot) => slot.1 = data.clone(),
            None => db.push((p, data.clone())),
        }
        pages.push((p, data));
    }
    db.retain(|(p, _)| *p <= commit);
    db.sort_by_key(|(p, _)| *p);
    let mut h = header(ps, commit, txid, txid, true);
    if txid > 1 {
        h.pre_apply_checksum = pre;
    }
    encode(h, &pages, db_checksum(db))
}

fn history(ps: u32) -> (Vec<Vec<u8>>, Pages) {
    let mut db = Vec::new();
    let files = vec![
        step(&mut db, 1, 4, &[(1, 1), (2, 1), (3, 1), (4, 1)], ps),
        step(&mut db, 2, 6, &[(2, 2), (5, 2), (6, 2)], ps),
        step(&mut db, 3, 5, &[(1, 3), (5, 3)], ps),
        step(&mut db, 4, 7, &[(3, 4), (6, 4), (7, 4)], ps),
    ];
    (files, db)
}

#[test]
fn compaction_merges_like_litestream() {
    let ps = 512;
    let (files, db) = history(ps);
    // Snapshot + all incrementals gives a snapshot of the final database.
    let decs: Vec<_> = files
        .iter()
        .map(|f| Decoder::new(&f[..]).unwrap())
        .collect();
    let out = compact(decs, Vec::new(), CompactOptions::default()).unwrap();
    assert_eq!(
        (out.header.min_txid, out.header.max_txid, out.header.commit),
        (1, 4, 7)
    );
    assert_eq!(out.header.timestamp_ms, 1_700_000_000_004);
    assert_eq!(out.header.pre_apply_checksum, Checksum::ZERO);
    let (_, pages, s) = decode(&out.writer).unwrap();
    assert_eq!(s.trailer.post_apply_checksum, db_checksum(&db));
    let expected: Vec<_> = db.clone();
    assert_eq!(expected.len(), 7);
    assert_eq!(pages, expected);

    // Incrementals only: newest version wins, pages beyond the final commit are dropped.
    let decs: Vec<_> = files[1..3]
        .iter()
        .map(|f| Decoder::new(&f[..]).unwrap())
        .collect();
    let out = compact(decs, Vec::new(), CompactOptions::default()).unwrap();
    let (h, pages, s) = decode(&out.writer).unwrap();
    assert_eq!((h.min_txid, h.max_txid, h.commit), (2, 3, 5));
    assert_eq!(
        h.pre_apply_checksum,
        peek_header(&files[1]).unwrap().pre_apply_checksum
    );
    assert_eq!(
        s.trailer.post_apply_checksum,
        decode(&files[2]).unwrap().2.trailer.post_apply_checksum
    );
    assert_eq!(
        pages,
        vec![
            (1, page(ps, 1, 3)),
            (2, page(ps, 2, 2)),
            (5, page(ps, 5, 3))
        ]
    );

    // Litestream's mode: no checksums in the output.
    let decs: Vec<_> = files
        .iter()
        .map(|f| Decoder::new(&f[..]).unwrap())
        .collect();
    let out = compact(
        decs,
        Vec::new(),
        CompactOptions {
            no_checksum: true,
            node_id: 0,
        },
    )
    .unwrap();
    let (h, pages, s) = decode(&out.writer).unwrap();
    assert!(h.no_checksum());
    assert_eq!(s.trailer.post_apply_checksum, Checksum::ZERO);
    assert_eq!(pages, db);
}

#[test]
fn compaction_errors() {
    let (files, _) = history(512);
    let dec = |i: usize| Decoder::new(&files[i][..]).unwrap();
    let cases: Vec<(&str, Vec<Decoder<&[u8]>>)> = vec![
        ("empty", vec![]),
        ("gap", vec![dec(0), dec(2)]),
        ("backwards", vec![dec(1), dec(0)]),
    ];
    for (name, decs) in cases {
        assert!(
            matches!(
                compact(decs, Vec::new(), CompactOptions::default()),
                Err(LtxError::Compaction { .. })
            ),
            "{name}"
        );
    }
    // Page sizes differ.
    let other = encode(
        header(1024, 1, 2, 2, false),
        &[(1, page(1024, 1, 0))],
        Checksum::ZERO,
    );
    let decs = vec![
        Decoder::new(&files[0][..]).unwrap(),
        Decoder::new(&other[..]).unwrap(),
    ];
    assert!(matches!(
        compact(decs, Vec::new(), CompactOptions::default()),
        Err(LtxError::Compaction { .. })
    ));
    // A broken checksum chain: TXID 2 made from a different database than TXID 1 ended at.
    let mut h = header(512, 6, 2, 2, true);
    h.pre_apply_checksum = Checksum(Checksum::FLAG.0 | 1);
    let forged = encode(h, &[(2, page(512, 2, 2))], Checksum(Checksum::FLAG.0 | 2));
    let decs = vec![
        Decoder::new(&files[0][..]).unwrap(),
        Decoder::new(&forged[..]).unwrap(),
    ];
    assert!(matches!(
        compact(decs, Vec::new(), CompactOptions::default()),
        Err(LtxError::Compaction { .. })
    ));
}

#[test]
fn apply_tracks_the_database_checksum() {
    let ps = 512;
    let (files, db) = history(ps);
    let mut image = Cursor::new(Vec::new());
    let mut sum = None;
    for f in &files {
        let a = apply(Decoder::new(&f[..]).unwrap(), &mut image, sum).unwrap();
        assert_eq!(a.checksum, Some(a.summary.trailer.post_apply_checksum));
        sum = a.checksum;
        let len = image.get_ref().len() as u64;
        assert_eq!(len, u64::from(a.summary.header.commit) * u64::from(ps));
        assert_eq!(
            checksum_database(&image.get_ref()[..], ps).unwrap(),
            sum.unwrap()
        );
    }
    let expected: Vec<u8> = db.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(image.get_ref(), &expected);

    // Applying to the wrong database is refused before anything is written.
    let mut wrong = Cursor::new(vec![7u8; 4 * ps as usize]);
    let wrong_sum = checksum_database(&wrong.get_ref()[..], ps).unwrap();
    let before = wrong.get_ref().clone();
    let e = apply(
        Decoder::new(&files[1][..]).unwrap(),
        &mut wrong,
        Some(wrong_sum),
    )
    .unwrap_err();
    assert!(
        matches!(e, LtxError::PreApplyChecksumMismatch { .. }),
        "{e:?}"
    );
    assert_eq!(wrong.get_ref(), &before);

    // Without a starting checksum the pages still land; the checksum is unknown.
    let mut image = Cursor::new(Vec::new());
    apply(Decoder::new(&files[0][..]).unwrap(), &mut image, None).unwrap();
    let a = apply(Decoder::new(&files[1][..]).unwrap(), &mut image, None).unwrap();
    assert_eq!(a.checksum, None);
    assert_eq!(image.get_ref().len(), 6 * ps as usize);

    // A file that grows the database past pages it does not carry leaves zero pages,
    // and those count in the checksum.
    let mut db2 = Vec::new();
    let s1 = step(&mut db2, 1, 2, &[(1, 1), (2, 1)], ps);
    let pre = db_checksum(&db2);
    let mut h = header(ps, 5, 2, 2, true);
    h.pre_apply_checksum = pre;
    let mut grown = db2.clone();
    grown.push((3, vec![0u8; ps as usize]));
    grown.push((4, page(ps, 4, 9)));
    grown.push((5, vec![0u8; ps as usize]));
    let s2 = encode(h, &[(4, page(ps, 4, 9))], db_checksum(&grown));
    let mut image = Cursor::new(Vec::new());
    let a1 = apply(Decoder::new(&s1[..]).unwrap(), &mut image, None).unwrap();
    let a2 = apply(Decoder::new(&s2[..]).unwrap(), &mut image, a1.checksum).unwrap();
    assert_eq!(a2.checksum, Some(db_checksum(&grown)));
    assert_eq!(
        checksum_database(&image.get_ref()[..], ps).unwrap(),
        db_checksum(&grown)
    );
}

fn hearth_header(ps: u32, commit: u32, txid: u64, pre: Checksum, post: Checksum) -> Header {
    let mut h = header(ps, commit, txid, txid, false);
    h.hearth = Some(ltx::HearthChecksums {
        pre_apply: pre,
        post_apply: post,
    });
    h
}

/// The history of `history()` with hearth's header checksums instead of trailer ones.
fn hearth_history(ps: u32) -> (Vec<Vec<u8>>, Pages) {
    let (files, db) = history(ps);
    let files = files
        .iter()
        .map(|f| {
            let (h, pages, s) = decode(f).unwrap();
            let pre = if h.is_snapshot() {
                Checksum::ZERO
            } else {
                h.pre_apply_checksum
            };
            let h2 = hearth_header(ps, h.commit, h.min_txid, pre, s.trailer.post_apply_checksum);
            encode(h2, &pages, Checksum::ZERO)
        })
        .collect();
    (files, db)
}

#[test]
fn hearth_header_checksums() {
    let ps = 512;
    let (files, db) = hearth_history(ps);
    // Layout: magic at 80, pre-apply at 84, post-apply at 92, big-endian.
    let h = peek_header(&files[1]).unwrap();
    let x = h.hearth.unwrap();
    assert_eq!(&files[1][80..84], b"HRT1");
    assert_eq!(&files[1][84..92], &x.pre_apply.0.to_be_bytes());
    assert_eq!(&files[1][92..100], &x.post_apply.0.to_be_bytes());
    assert!(h.no_checksum());
    assert_eq!(
        &files[1][40..48],
        &[0u8; 8],
        "the format's pre-apply field stays zero"
    );

    // Apply carries and checks the chain, as with trailer checksums.
    let mut image = Cursor::new(Vec::new());
    let mut sum = None;
    for f in &files {
        let a = apply(Decoder::new(&f[..]).unwrap(), &mut image, sum).unwrap();
        assert_eq!(
            a.checksum,
            Some(a.summary.header.hearth.unwrap().post_apply)
        );
        sum = a.checksum;
    }
    assert_eq!(sum, Some(db_checksum(&db)));
    let mut wrong = Cursor::new(vec![1u8; 4 * ps as usize]);
    let ws = checksum_database(&wrong.get_ref()[..], ps).unwrap();
    assert!(matches!(
        apply(Decoder::new(&files[1][..]).unwrap(), &mut wrong, Some(ws)),
        Err(LtxError::PreApplyChecksumMismatch { .. })
    ));

    // Compaction keeps them (pre of the first, post of the last) in Litestream's mode.
    let decs: Vec<_> = files[1..]
        .iter()
        .map(|f| Decoder::new(&f[..]).unwrap())
        .collect();
    let out = compact(
        decs,
        Vec::new(),
        CompactOptions {
            no_checksum: true,
            node_id: 0,
        },
    )
    .unwrap();
    let x = out.header.hearth.unwrap();
    assert_eq!(
        x.pre_apply,
        peek_header(&files[1]).unwrap().hearth.unwrap().pre_apply
    );
    assert_eq!(x.post_apply, db_checksum(&db));
    let decs: Vec<_> = files
        .iter()
        .map(|f| Decoder::new(&f[..]).unwrap())
        .collect();
    let out = compact(decs, Vec::new(), CompactOptions::default()).unwrap();
    let (h, pages, _) = decode(&out.writer).unwrap();
    assert_eq!(h.hearth.unwrap().post_apply, db_checksum(&db));
    assert_eq!(pages, db);
    // A broken chain is refused.
    let forged = encode(
        hearth_header(
            ps,
            6,
            2,
            Checksum(Checksum::FLAG.0 | 1),
            Checksum(Checksum::FLAG.0 | 2),
        ),
        &[(2, page(ps, 2, 2))],
        Checksum::ZERO,
    );
    let decs = vec![
        Decoder::new(&files[0][..]).unwrap(),
        Decoder::new(&forged[..]).unwrap(),
    ];
    assert!(matches!(
        compact(decs, Vec::new(), CompactOptions::default()),
        Err(LtxError::Compaction { .. })
    ));
    // A file without them in the mix drops them from the output.
    let plain = encode(
        header(ps, 7, 5, 5, false),
        &[(1, page(ps, 1, 9))],
        Checksum::ZERO,
    );
    let decs = vec![
        Decoder::new(&files[3][..]).unwrap(),
        Decoder::new(&plain[..]).unwrap(),
    ];
    assert_eq!(
        compact(decs, Vec::new(), CompactOptions::default())
            .unwrap()
            .header
            .hearth,
        None
    );
}

#[test]
fn hearth_header_checksum_rules() {
    let ps = 512;
    let real = Checksum(Checksum::FLAG.0 | 5);
    let cases: Vec<(&str, Header)> = vec![
        ("without the no-checksum flag", {
            let mut h = hearth_header(ps, 1, 2, real, real);
            h.flags = 0;
            h.pre_apply_checksum = real;
            h
        }),
        (
            "post-apply without flag bit",
            hearth_header(ps, 1, 2, real, Checksum(5)),
        ),
        (
            "pre-apply without flag bit",
            hearth_header(ps, 1, 2, Checksum(5), real),
        ),
        (
            "snapshot with pre-apply",
            hearth_header(ps, 1, 1, real, real),
        ),
        (
            "empty database with a page checksum",
            hearth_header(ps, 0, 2, real, real),
        ),
    ];
    for (name, h) in cases {
        assert!(
            matches!(
                Encoder::new(Vec::new(), h),
                Err(LtxError::InvalidHeader { .. })
            ),
            "{name}"
        );
        assert!(
            matches!(
                peek_header(&h.to_bytes()),
                Err(LtxError::InvalidHeader { .. })
            ),
            "{name}"
        );
    }
    // A snapshot whose declared post-apply checksum is not its pages' checksum.
    let mut enc = Encoder::new(Vec::new(), hearth_header(ps, 1, 1, Checksum::ZERO, real)).unwrap();
    enc.write_page(1, &page(ps, 1, 1)).unwrap();
    assert!(matches!(
        enc.finish(Checksum::ZERO),
        Err(LtxError::PostApplyChecksumMismatch { .. })
    ));
    // Unknown bytes in the reserved area are ignored, like ltx v0.5.2 does, but still
    // covered by the file checksum.
    let mut b = header(ps, 1, 1, 1, false).to_bytes();
    b[80..84].copy_from_slice(b"XXXX");
    assert_eq!(peek_header(&b).unwrap().hearth, None);
}

#[test]
fn hearth_checksums_can_be_set_at_finish() {
    let ps = 1024;
    let (files, _) = hearth_history(ps);
    for f in &files {
        let (h, pages, _) = decode(f).unwrap();
        let x = h.hearth.unwrap();
        // Same file written with the checksums unknown until the end, behind a prefix
        // so the header rewrite must be relative to where the file started.
        let mut plain = h;
        plain.hearth = None;
        let mut out = Cursor::new(b"prefix".to_vec());
        out.set_position(6);
        let mut enc = Encoder::new(out, plain).unwrap();
        for (p, d) in &pages {
            enc.write_page(*p, d).unwrap();
        }
        let fin = enc.finish_with_hearth_checksums(x).unwrap();
        assert_eq!(fin.header.hearth, Some(x));
        assert_eq!(fin.size, f.len() as u64);
        let bytes = fin.writer.into_inner();
        assert_eq!(&bytes[..6], b"prefix");
        assert!(bytes[6..] == f[..], "differs from the up-front encoding");
    }
    // Checksums at finish need the no-checksum flag, and a snapshot's must match its pages.
    let mut h = header(ps, 1, 2, 2, true);
    h.pre_apply_checksum = Checksum::FLAG;
    let enc = Encoder::new(Cursor::new(Vec::new()), h).unwrap();
    let x = ltx::HearthChecksums {
        pre_apply: Checksum::FLAG,
        post_apply: Checksum::FLAG,
    };
    assert!(matches!(
        enc.finish_with_hearth_checksums(x),
        Err(LtxError::InvalidHeader { .. })
    ));
    let mut enc = Encoder::new(Cursor::new(Vec::new()), header(ps, 1, 1, 1, false)).unwrap();
    enc.write_page(1, &page(ps, 1, 1)).unwrap();
    let x = ltx::HearthChecksums {
        pre_apply: Checksum::ZERO,
        post_apply: Checksum(Checksum::FLAG.0 | 3),
    };
    assert!(matches!(
        enc.finish_with_hearth_checksums(x),
        Err(LtxError::PostApplyChecksumMismatch { .. })
    ));
}
