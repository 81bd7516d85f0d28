//! Reading SQLite's write-ahead log: the header, frames, salts and the checksum chain, stopping at whole transactions.
//!
//! The WAL format is SQLite's (<https://www.sqlite.org/fileformat2.html#walformat>). We read it ourselves
//! rather than through SQLite because SQLite has no API that hands out committed frames; the reader here
//! follows SQLite's own rule for which frames are valid: salts equal to the header's, a checksum that
//! continues the chain, and only frames up to the last commit frame count.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom};

/// Size of the WAL file header.
pub const WAL_HEADER_SIZE: u64 = 32;
/// Size of the header in front of each frame's page.
pub const FRAME_HEADER_SIZE: u64 = 24;

const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;

/// Why a WAL could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("the WAL header is {0} bytes long; a WAL header needs 32")]
    ShortHeader(usize),
    #[error("the WAL header has magic {0:#010x}, which is not SQLite's WAL magic")]
    BadMagic(u32),
    #[error("the WAL header's page size {0} is not a power of two between 512 and 65536")]
    BadPageSize(u32),
    #[error("the WAL header's checksum does not match its contents")]
    BadHeaderChecksum,
    #[error("read the WAL")]
    Io(#[from] io::Error),
}

/// The 32-byte header at the start of a WAL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    pub magic: u32,
    pub format_version: u32,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum1: u32,
    pub checksum2: u32,
}

impl WalHeader {
    /// Parses and validates a WAL header, including its own checksum.
    pub fn parse(bytes: &[u8]) -> Result<WalHeader, WalError> {
        if bytes.len() < WAL_HEADER_SIZE as usize {
            return Err(WalError::ShortHeader(bytes.len()));
        }
        let word =
            |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let header = WalHeader {
            magic: word(0),
            format_version: word(4),
            page_size: word(8),
            checkpoint_seq: word(12),
            salt1: word(16),
            salt2: word(20),
            checksum1: word(24),
            checksum2: word(28),
        };
        if header.magic != MAGIC_LE && header.magic != MAGIC_BE {
            return Err(WalError::BadMagic(header.magic));
        }
        let ps = header.page_size;
        // SQLite stores a page size of 65536 as 1 in the database header, but the WAL header holds it whole.
        if !(512..=65536).contains(&ps) || !ps.is_power_of_two() {
            return Err(WalError::BadPageSize(ps));
        }
        let sum = checksum(header.big_endian(), (0, 0), &bytes[..24]);
        if sum != (header.checksum1, header.checksum2) {
            return Err(WalError::BadHeaderChecksum);
        }
        Ok(header)
    }

    /// Whether the checksums of this WAL are computed over big-endian words.
    pub fn big_endian(&self) -> bool {
        self.magic == MAGIC_BE
    }

    /// The salts that every valid frame of this WAL generation carries.
    pub fn salts(&self) -> (u32, u32) {
        (self.salt1, self.salt2)
    }

    /// The checksum that the first frame's checksum continues from.
    pub fn checksum(&self) -> (u32, u32) {
        (self.checksum1, self.checksum2)
    }

    /// Size in bytes of one frame (header and page).
    pub fn frame_size(&self) -> u64 {
        FRAME_HEADER_SIZE + u64::from(self.page_size)
    }
}

/// SQLite's WAL checksum: a Fletcher-like sum over pairs of 32-bit words.
///
/// `data.len()` must be a multiple of 8, which holds for the header prefix, frame header prefix and pages.
pub fn checksum(big_endian: bool, seed: (u32, u32), data: &[u8]) -> (u32, u32) {
    let (mut s1, mut s2) = seed;
    for pair in data.chunks_exact(8) {
        let (x0, x1) = if big_endian {
            (
                u32::from_be_bytes([pair[0], pair[1], pair[2], pair[3]]),
                u32::from_be_bytes([pair[4], pair[5], pair[6], pair[7]]),
            )
        } else {
            (
                u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]),
                u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]),
            )
        };
        s1 = s1.wrapping_add(x0).wrapping_add(s2);
        s2 = s2.wrapping_add(x1).wrapping_add(s1);
    }
    (s1, s2)
}

/// A place in a WAL: the byte offset just past a commit frame and the checksum chain's value there.
///
/// A position is only meaningful together with the salts of the WAL generation it was taken in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WalPosition {
    pub salt1: u32,
    pub salt2: u32,
    pub offset: u64,
    pub checksum1: u32,
    pub checksum2: u32,
}

impl WalPosition {
    /// The position at the start of a WAL generation, before its first frame.
    pub fn start(header: &WalHeader) -> WalPosition {
        WalPosition {
            salt1: header.salt1,
            salt2: header.salt2,
            offset: WAL_HEADER_SIZE,
            checksum1: header.checksum1,
            checksum2: header.checksum2,
        }
    }
}

/// The committed transactions found by one scan of a WAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scan {
    /// Where the scan started.
    pub from: WalPosition,
    /// Just past the last commit frame read; equals `from` when nothing new was committed.
    pub to: WalPosition,
    /// For each page written by the scanned transactions, the offset of its newest frame's page data.
    pub pages: BTreeMap<u32, u64>,
    /// Database size in pages after the last scanned commit; 0 when nothing was committed.
    pub commit: u32,
    /// How many transactions (commit frames) were read.
    pub transactions: u64,
}

impl Scan {
    /// Whether the scan found any committed transaction.
    pub fn is_empty(&self) -> bool {
        self.transactions == 0
    }
}

/// Reads whole committed transactions from `from` onwards, stopping at the first invalid frame,
/// after at most `max_bytes` of frames (rounded up to a whole transaction), or at the end of the file.
///
/// Frames of a transaction whose commit frame is not (yet) valid are not returned: a reader that
/// comes back later will find them once the transaction commits.
pub fn scan<R: Read + Seek>(
    wal: &mut R,
    header: &WalHeader,
    from: WalPosition,
    max_bytes: u64,
) -> Result<Scan, WalError> {
    let mut result = Scan {
        from,
        to: from,
        pages: BTreeMap::new(),
        commit: 0,
        transactions: 0,
    };
    if from.salt1 != header.salt1 || from.salt2 != header.salt2 {
        // The caller's position belongs to another WAL generation; nothing here continues it.
        return Ok(result);
    }
    let frame_size = header.frame_size() as usize;
    let big_endian = header.big_endian();
    let mut frame = vec![0u8; frame_size];
    let mut offset = from.offset;
    let mut sum = (from.checksum1, from.checksum2);
    let mut pending: Vec<(u32, u64)> = Vec::new();
    wal.seek(SeekFrom::Start(offset))?;
    loop {
        if !read_full(wal, &mut frame)? {
            break;
        }
        let word =
            |i: usize| u32::from_be_bytes([frame[i], frame[i + 1], frame[i + 2], frame[i + 3]]);
        let (pgno, commit, salt1, salt2, c1, c2) =
            (word(0), word(4), word(8), word(12), word(16), word(20));
        if salt1 != header.salt1 || salt2 != header.salt2 || pgno == 0 {
            break;
        }
        let next = checksum(
            big_endian,
            checksum(big_endian, sum, &frame[..8]),
            &frame[24..],
        );
        if next != (c1, c2) {
            break;
        }
        sum = next;
        pending.push((pgno, offset + FRAME_HEADER_SIZE));
        offset += frame_size as u64;
        if commit != 0 {
            result.pages.extend(pending.drain(..));
            result.commit = commit;
            result.transactions += 1;
            result.to = WalPosition {
                salt1: header.salt1,
                salt2: header.salt2,
                offset,
                checksum1: sum.0,
                checksum2: sum.1,
            };
            if offset - from.offset >= max_bytes {
                break;
            }
        }
    }
    Ok(result)
}

/// Reads the header of the WAL, or `None` when the WAL is shorter than a header (empty or missing).
pub fn read_header<R: Read + Seek>(wal: &mut R) -> Result<Option<WalHeader>, WalError> {
    let mut bytes = [0u8; WAL_HEADER_SIZE as usize];
    wal.seek(SeekFrom::Start(0))?;
    if !read_full(wal, &mut bytes)? {
        return Ok(None);
    }
    WalHeader::parse(&bytes).map(Some)
}

/// The position just past the commit frame that ends at `offset` in the WAL generation with `salts`,
/// after `commit` pages, with the checksum chain validated from the start of the WAL; `None` when the WAL
/// no longer holds that commit (it was restarted, rewritten or cut short since).
///
/// This is how a capture finds its place again from a level-0 file's header, which records the salts and
/// the WAL range it covers but not the checksum chain's value.
pub fn position_at<R: Read + Seek>(
    wal: &mut R,
    header: &WalHeader,
    salts: (u32, u32),
    offset: u64,
    commit: u32,
) -> Result<Option<WalPosition>, WalError> {
    if salts != header.salts() || offset <= WAL_HEADER_SIZE {
        return Ok(None);
    }
    // The scan stops at the first commit at or past `offset`, so it ends exactly there only when a commit
    // frame does.
    let found = scan(
        wal,
        header,
        WalPosition::start(header),
        offset - WAL_HEADER_SIZE,
    )?;
    Ok((found.to.offset == offset && found.commit == commit).then_some(found.to))
}

/// Checks that `pos` still lies on the checksum chain of the WAL: the frame that ends at `pos.offset`
/// carries `pos`'s checksum and salts. This tells a WAL that was only appended to from one that was
/// restarted or overwritten since `pos` was taken.
pub fn position_holds<R: Read + Seek>(
    wal: &mut R,
    header: &WalHeader,
    pos: &WalPosition,
) -> Result<bool, WalError> {
    if (pos.salt1, pos.salt2) != header.salts() {
        return Ok(false);
    }
    if pos.offset == WAL_HEADER_SIZE {
        return Ok((pos.checksum1, pos.checksum2) == header.checksum());
    }
    let frame_size = header.frame_size();
    if pos.offset < WAL_HEADER_SIZE + frame_size
        || !(pos.offset - WAL_HEADER_SIZE).is_multiple_of(frame_size)
    {
        return Ok(false);
    }
    let mut frame_header = [0u8; FRAME_HEADER_SIZE as usize];
    wal.seek(SeekFrom::Start(pos.offset - frame_size))?;
    if !read_full(wal, &mut frame_header)? {
        return Ok(false);
    }
    let word = |i: usize| {
        u32::from_be_bytes([
            frame_header[i],
            frame_header[i + 1],
            frame_header[i + 2],
            frame_header[i + 3],
        ])
    };
    Ok(word(8) == pos.salt1
        && word(12) == pos.salt2
        && word(16) == pos.checksum1
        && word(20) == pos.checksum2)
}

/// Reads one page's data at `offset` of the WAL.
pub fn read_page<R: Read + Seek>(
    wal: &mut R,
    offset: u64,
    page: &mut [u8],
) -> Result<(), WalError> {
    wal.seek(SeekFrom::Start(offset))?;
    wal.read_exact(page)?;
    Ok(())
}

/// Fills `buf` entirely, or returns `Ok(false)` when the reader ends first (a torn tail is not an error).
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// Opens a database in WAL mode with checkpoints off, so every write stays in the WAL.
    fn wal_db(dir: &std::path::Path) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(dir.join("db")).unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
        conn
    }

    #[test]
    fn scans_committed_transactions_written_by_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let conn = wal_db(dir.path());
        for i in 0..5 {
            conn.execute("INSERT INTO t VALUES (randomblob(?1))", [100 * (i + 1)])
                .unwrap();
        }
        let mut wal = File::open(dir.path().join("db-wal")).unwrap();
        let header = read_header(&mut wal).unwrap().unwrap();
        assert_eq!(header.page_size, 4096);
        let scan = scan(&mut wal, &header, WalPosition::start(&header), u64::MAX).unwrap();
        // One transaction for CREATE TABLE and five inserts.
        assert_eq!(scan.transactions, 6);
        assert_eq!(
            scan.to.offset,
            std::fs::metadata(dir.path().join("db-wal")).unwrap().len()
        );
        assert!(scan.pages.contains_key(&1));
        assert!(scan.commit >= 2);
        assert!(position_holds(&mut wal, &header, &scan.to).unwrap());

        // A second scan from the end finds nothing new, then finds exactly the next transaction.
        let again = super::scan(&mut wal, &header, scan.to, u64::MAX).unwrap();
        assert!(again.is_empty());
        conn.execute("INSERT INTO t VALUES (x'00')", []).unwrap();
        let next = super::scan(&mut wal, &header, scan.to, u64::MAX).unwrap();
        assert_eq!(next.transactions, 1);
    }

    #[test]
    fn finds_a_position_again_from_salts_offset_and_commit_only() {
        let dir = tempfile::tempdir().unwrap();
        let conn = wal_db(dir.path());
        let mut ends = Vec::new();
        let wal_len = || std::fs::metadata(dir.path().join("db-wal")).unwrap().len();
        for i in 0..4 {
            conn.execute("INSERT INTO t VALUES (randomblob(?1))", [3000 * (i + 1)])
                .unwrap();
            ends.push(wal_len());
        }
        let mut wal = File::open(dir.path().join("db-wal")).unwrap();
        let header = read_header(&mut wal).unwrap().unwrap();
        let full = scan(&mut wal, &header, WalPosition::start(&header), u64::MAX).unwrap();
        let second = ends[1];
        let upto = scan(
            &mut wal,
            &header,
            WalPosition::start(&header),
            second - WAL_HEADER_SIZE,
        )
        .unwrap();
        assert_eq!(upto.to.offset, second);
        let salts = header.salts();
        let other = (salts.0.wrapping_add(1), salts.1);
        let frame = header.frame_size();
        // (what, salts, offset, commit, expected position)
        let cases = [
            (
                "the end of the WAL",
                salts,
                full.to.offset,
                full.commit,
                Some(full.to),
            ),
            (
                "an earlier commit",
                salts,
                second,
                upto.commit,
                Some(upto.to),
            ),
            ("another WAL generation", other, second, upto.commit, None),
            (
                "an offset inside a transaction",
                salts,
                second - frame,
                upto.commit,
                None,
            ),
            (
                "a different database size",
                salts,
                second,
                upto.commit + 1,
                None,
            ),
            (
                "past the end of the WAL",
                salts,
                full.to.offset + frame,
                full.commit,
                None,
            ),
            ("the WAL header itself", salts, WAL_HEADER_SIZE, 0, None),
        ];
        for (what, salts, offset, commit, expected) in cases {
            let found = position_at(&mut wal, &header, salts, offset, commit).unwrap();
            assert_eq!(found, expected, "{what}");
            if let Some(pos) = found {
                assert!(position_holds(&mut wal, &header, &pos).unwrap(), "{what}");
            }
        }
    }

    #[test]
    fn stops_at_a_torn_or_corrupt_frame_and_never_returns_half_a_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let conn = wal_db(dir.path());
        conn.execute("INSERT INTO t VALUES (randomblob(10))", [])
            .unwrap();
        conn.execute("INSERT INTO t VALUES (randomblob(10))", [])
            .unwrap();
        // Read while the connection is open: closing the last connection checkpoints and deletes the WAL.
        let bytes = std::fs::read(dir.path().join("db-wal")).unwrap();
        drop(conn);
        let header = WalHeader::parse(&bytes).unwrap();
        let full = scan(
            &mut io::Cursor::new(&bytes),
            &header,
            WalPosition::start(&header),
            u64::MAX,
        )
        .unwrap();
        assert_eq!(full.transactions, 3);

        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Damage, u64)> = vec![
            (
                "torn last frame",
                Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 100)),
                2,
            ),
            (
                "flipped byte in last page",
                Box::new(|b: &mut Vec<u8>| *b.last_mut().unwrap() ^= 1),
                2,
            ),
            (
                "wrong salt on the first frame",
                Box::new(|b: &mut Vec<u8>| b[32 + 8] ^= 1),
                0,
            ),
        ];
        for (name, damage, expected) in cases {
            let mut damaged = bytes.clone();
            damage(&mut damaged);
            let got = scan(
                &mut io::Cursor::new(&damaged),
                &header,
                WalPosition::start(&header),
                u64::MAX,
            )
            .unwrap();
            assert_eq!(got.transactions, expected, "{name}");
            assert!(got.to.offset <= full.to.offset, "{name}");
        }
    }

    #[test]
    fn rejects_bad_headers() {
        let dir = tempfile::tempdir().unwrap();
        let conn = wal_db(dir.path());
        let bytes = std::fs::read(dir.path().join("db-wal")).unwrap();
        drop(conn);
        assert!(WalHeader::parse(&bytes).is_ok());
        let mut bad_magic = bytes.clone();
        bad_magic[0] = 0;
        assert!(matches!(
            WalHeader::parse(&bad_magic),
            Err(WalError::BadMagic(_))
        ));
        let mut bad_sum = bytes.clone();
        bad_sum[17] ^= 1;
        assert!(matches!(
            WalHeader::parse(&bad_sum),
            Err(WalError::BadHeaderChecksum)
        ));
        assert!(matches!(
            WalHeader::parse(&bytes[..10]),
            Err(WalError::ShortHeader(10))
        ));
        assert!(
            read_header(&mut io::Cursor::new(Vec::new()))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_restarted_wal_breaks_the_old_position() {
        let dir = tempfile::tempdir().unwrap();
        let conn = wal_db(dir.path());
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let mut wal = File::open(dir.path().join("db-wal")).unwrap();
        let header = read_header(&mut wal).unwrap().unwrap();
        let end = scan(&mut wal, &header, WalPosition::start(&header), u64::MAX)
            .unwrap()
            .to;
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
            .unwrap();
        conn.execute("INSERT INTO t VALUES (2)", []).unwrap();
        let restarted = read_header(&mut wal).unwrap().unwrap();
        assert_ne!(restarted.salts(), header.salts());
        assert!(!position_holds(&mut wal, &restarted, &end).unwrap());
        let fresh = scan(&mut wal, &restarted, end, u64::MAX).unwrap();
        assert!(
            fresh.is_empty(),
            "a position from another generation continues nothing"
        );
    }
}
