//! The database side of replication: pin the WAL, turn newly committed frames into local level-0 LTX files,
//! run checkpoints, and notice when continuity with the last captured state is lost.
//!
//! Safety rests on SQLite's own rules (see docs/formats/replica.md and ARCHITECTURE.md):
//! - hearth holds a read transaction ("the pin") on its own connection, so no checkpoint can copy frames
//!   it has not read yet back into the database and then restart the WAL over them;
//! - hearth never opens and closes extra descriptors on the database file, because closing any descriptor
//!   drops all of the process's POSIX locks on it; it keeps one descriptor for reading pages, for its life;
//! - only whole transactions (up to a commit frame whose checksum continues the chain) are captured;
//! - hearth's own checkpoints run under a barrier write transaction, so no commit slips in between the
//!   last capture and the checkpoint.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};

use crate::ltx::{self, Checksum, DbChecksum, Encoder, Header};
use crate::wal::{self, WalHeader, WalPosition};

/// The largest amount of WAL one level-0 file covers, so that one huge transaction burst does not become
/// one unbounded file (Litestream's `MaxSyncWALBytes` is the same 64 MiB).
const MAX_FILE_WAL_BYTES: u64 = 64 << 20;

/// How many uploaded level-0 files are kept to be written over (see `Capture::release`).
const MAX_SPARES: usize = 2;

/// Version of `state.json` in the local meta directory (docs/formats/local-state.md). Version 1 files are
/// read too: they only differ in being rewritten on every capture.
pub const STATE_VERSION: u32 = 2;

/// Why capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("database {path} does not exist")]
    Missing { path: PathBuf },
    #[error(
        "database {path} is in {mode} journal mode and could not be switched to WAL; \
         hearth (like Litestream) needs WAL mode: close other connections or run `PRAGMA journal_mode=WAL` once"
    )]
    NotWal { path: PathBuf, mode: String },
    #[error("open or query database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("read the WAL of {path}: {source}")]
    Wal {
        path: PathBuf,
        source: wal::WalError,
    },
    #[error("write an LTX file for {path}: {source}")]
    Ltx {
        path: PathBuf,
        source: ltx::LtxError,
    },
    #[error("{what} for {path}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("local state {path} is unreadable ({reason}); move it aside to start a new history")]
    BadState { path: PathBuf, reason: String },
}

impl CaptureError {
    /// Whether trying again later can help (busy databases, passing IO trouble) or a person must act.
    pub fn is_retryable(&self) -> bool {
        match self {
            CaptureError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            CaptureError::Io { .. } | CaptureError::Wal { .. } => true,
            _ => false,
        }
    }
}

/// Why the last captured state and the database no longer follow on from each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discontinuity {
    /// No local history: the first capture of this database.
    NoHistory,
    /// The database file at the path is another file than the one captured before.
    DatabaseReplaced,
    /// The WAL no longer holds the frame the last capture ended at (checkpointed, truncated or deleted
    /// while hearth was not watching).
    WalReset,
    /// The database changed in a way the WAL does not explain.
    DatabaseChanged,
    /// A replica is empty while the database has history: it needs a full image to start from.
    NewReplica,
    /// Commits landed between hearth's barrier and its TRUNCATE checkpoint, which may have copied them into
    /// the database and erased them from the WAL before hearth read them.
    TruncateRace,
}

impl std::fmt::Display for Discontinuity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Discontinuity::NoHistory => "no local history yet",
            Discontinuity::DatabaseReplaced => "the database file was replaced",
            Discontinuity::WalReset => {
                "the WAL was checkpointed, truncated or deleted while hearth was not running"
            }
            Discontinuity::DatabaseChanged => {
                "the database changed in a way its WAL does not explain"
            }
            Discontinuity::TruncateRace => "commits landed while hearth truncated the WAL",
            Discontinuity::NewReplica => "a replica is empty and needs a full image to start from",
        })
    }
}

/// Local state that survives restarts: the last captured position (docs/formats/local-state.md).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalState {
    pub version: u32,
    /// TXID of the newest local level-0 file.
    pub txid: u64,
    /// Database checksum after `txid` (LTX's rolling checksum, flag bit set).
    pub checksum: u64,
    /// Database size in pages after `txid`.
    pub commit: u32,
    pub page_size: u32,
    /// Where the next capture continues in the WAL.
    pub wal: Option<WalPosition>,
    /// Identity of the database file captured, to notice a replaced file.
    pub dev: u64,
    pub ino: u64,
    /// When `txid` was captured, in milliseconds since the epoch.
    pub timestamp_ms: i64,
}

/// A level-0 file written by a capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    pub txid: u64,
    pub path: PathBuf,
    pub size: u64,
    pub pages: u32,
    pub transactions: u64,
    /// Set when this file is a full image because continuity was lost.
    pub rebase: Option<Discontinuity>,
}

/// Outcome of one checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointResult {
    pub busy: bool,
    pub wal_frames: i64,
    pub checkpointed: i64,
}

/// The meta directory beside a database: `.<name>-hearth/` (docs/formats/local-state.md).
pub fn meta_dir(db: &Path) -> PathBuf {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    db.with_file_name(format!(".{name}-hearth"))
}

/// Captures one database.
pub struct Capture {
    path: PathBuf,
    wal_path: PathBuf,
    meta: PathBuf,
    // Field order matters: Rust drops fields in order, and the SQLite connections must close before the
    // raw descriptor on the database file, or closing that descriptor would drop SQLite's locks first.
    conn: Connection,
    barrier: Connection,
    db_file: File,
    state: LocalState,
    /// Checksum of each page 1..=commit of the captured image (index pgno - 1), so a new file's post-apply
    /// checksum is known without reading old page versions back.
    page_sums: Vec<Checksum>,
    pinned: bool,
    /// Level-0 files already on every replica, kept under spare names to be written over by the next
    /// captures (see `release`).
    spares: Vec<PathBuf>,
    /// A reason to write a full image at the next sync, found by a checkpoint.
    pending_rebase: Option<Discontinuity>,
}

impl Capture {
    /// Opens the database for capture: WAL mode, hearth's table, the pin, and the local state.
    ///
    /// Returns the capture and, when the old state does not continue, the reason; the first `sync`
    /// then writes a full image.
    pub fn open(
        path: &Path,
        busy_timeout: Duration,
    ) -> Result<(Capture, Option<Discontinuity>), CaptureError> {
        if !path.exists() {
            return Err(CaptureError::Missing {
                path: path.to_path_buf(),
            });
        }
        let sql = |source| CaptureError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = open_connection(path, busy_timeout).map_err(sql)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(CaptureError::NotWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(sql)?;
        persist_wal(&conn).map_err(sql)?;
        // A table of hearth's own that it writes to so the WAL always has a header and a frame to pin on
        // (an empty WAL has no header until the first write, and a pin on an empty WAL does not hold).
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS _hearth_seq (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL)",
        )
        .map_err(sql)?;
        let barrier = open_connection(path, busy_timeout).map_err(sql)?;
        barrier
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(sql)?;

        let io = |what| {
            move |source| CaptureError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let db_file = File::open(path).map_err(io("open the database file for reading pages"))?;
        let meta = meta_dir(path);
        fs::create_dir_all(meta.join("ltx/0")).map_err(io("create the meta directory"))?;
        let mut capture = Capture {
            path: path.to_path_buf(),
            wal_path: wal_path(path),
            meta,
            conn,
            barrier,
            db_file,
            state: LocalState {
                version: STATE_VERSION,
                txid: 0,
                checksum: Checksum::FLAG.0,
                commit: 0,
                page_size: 0,
                wal: None,
                dev: 0,
                ino: 0,
                timestamp_ms: 0,
            },
            page_sums: Vec::new(),
            pinned: false,
            spares: Vec::new(),
            pending_rebase: None,
        };
        capture.spares = (0..MAX_SPARES)
            .map(|i| capture.spare_path(i))
            .filter(|p| p.exists())
            .collect();
        capture.bump_seq()?;
        capture.pin()?;
        let discontinuity = capture.load_state()?;
        Ok((capture, discontinuity))
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The local meta directory.
    pub fn meta(&self) -> &Path {
        &self.meta
    }

    /// The last captured state.
    pub fn state(&self) -> &LocalState {
        &self.state
    }

    /// Path of the local level-0 file for `txid`.
    pub fn local_file(&self, txid: u64) -> PathBuf {
        self.meta
            .join("ltx/0")
            .join(ltx::format_filename(txid, txid))
    }

    /// Size of the WAL file in bytes (0 when missing).
    pub fn wal_size(&self) -> u64 {
        fs::metadata(&self.wal_path).map(|m| m.len()).unwrap_or(0)
    }

    /// Reads the local state and decides whether it continues the database as it is now.
    fn load_state(&mut self) -> Result<Option<Discontinuity>, CaptureError> {
        let stored = read_state(&self.meta)?;
        let (dev, ino) = self.identity()?;
        let mut wal = self.open_wal()?;
        let header = self.read_wal_header(&mut wal)?;
        let Some((mut stored, newer)) = stored else {
            return Ok(Some(Discontinuity::NoHistory));
        };
        // Captured past `state.json`: the newest level-0 file says where in the WAL its capture ended, and
        // the WAL proves whether it still holds that place.
        if let (Some(file), Some(h)) = (&newer, &header) {
            let end = (file.wal_offset + file.wal_size) as u64;
            stored.wal = wal::position_at(
                &mut wal,
                h,
                (file.wal_salt1, file.wal_salt2),
                end,
                file.commit,
            )
            .map_err(|source| self.wal_error(source))?;
        }
        self.state.txid = stored.txid;
        self.state.checksum = stored.checksum;
        self.state.timestamp_ms = stored.timestamp_ms;
        if (stored.dev, stored.ino) != (dev, ino) {
            return Ok(Some(Discontinuity::DatabaseReplaced));
        }
        let holds = match (&header, &stored.wal) {
            (Some(h), Some(pos)) => {
                wal::position_holds(&mut wal, h, pos).map_err(|source| self.wal_error(source))?
            }
            _ => false,
        };
        // Rebuild the page checksums of the image as it is now: the database file plus every committed frame.
        // When the WAL continues our position, that image is the captured state plus frames not yet captured.
        let from = match (&header, holds) {
            (Some(h), true) => stored.wal.unwrap_or_else(|| WalPosition::start(h)),
            (Some(h), false) => WalPosition::start(h),
            (None, _) => return Ok(Some(Discontinuity::WalReset)),
        };
        let Some(h) = header else {
            return Ok(Some(Discontinuity::WalReset));
        };
        if !holds {
            // The WAL was reset. Continuity still holds when the database file alone equals the captured
            // state, and every frame now in the WAL came after it (the WAL was checkpointed and restarted,
            // and nothing was lost).
            let file_sum = self.file_checksum(h.page_size)?;
            if file_sum.0 == stored.checksum {
                self.state.page_size = h.page_size;
                self.state.commit = (self.db_len()? / u64::from(h.page_size)) as u32;
                self.state.wal = Some(from);
                self.state.dev = dev;
                self.state.ino = ino;
                self.rebuild_page_sums(&mut wal, &h, WalPosition::start(&h), false)?;
                return Ok(None);
            }
            return Ok(Some(Discontinuity::WalReset));
        }
        self.state.page_size = h.page_size;
        self.state.commit = stored.commit;
        self.state.wal = Some(from);
        self.state.dev = dev;
        self.state.ino = ino;
        // The page checksums must describe the image at the captured position: the database file may already
        // hold later frames that a checkpoint copied back, but those are in the WAL after our position too,
        // and the next capture overwrites them with the same content.
        self.rebuild_page_sums(&mut wal, &h, WalPosition::start(&h), true)?;
        Ok(None)
    }

    /// Captures newly committed transactions into a level-0 file, or writes a full image after `rebase`.
    pub fn sync(
        &mut self,
        rebase: Option<Discontinuity>,
    ) -> Result<Option<Captured>, CaptureError> {
        if rebase.is_none()
            && let Some(reason) = self.check_identity()?
        {
            return self.snapshot(reason).map(Some);
        }
        if let Some(reason) = rebase {
            return self.snapshot(reason).map(Some);
        }
        let mut wal = self.open_wal()?;
        let Some(header) = self.read_wal_header(&mut wal)? else {
            return Ok(None);
        };
        let mut from = self
            .state
            .wal
            .unwrap_or_else(|| WalPosition::start(&header));
        if (from.salt1, from.salt2) != header.salts() {
            // SQLite restarts the WAL by adding one to salt-1. While hearth holds its pin, a restart can only
            // happen once every frame was copied back, and hearth had read them all before its own
            // checkpoint; any other change means frames were lost.
            if header.salt1 == from.salt1.wrapping_add(1) {
                from = WalPosition::start(&header);
            } else {
                return self.snapshot(Discontinuity::DatabaseChanged).map(Some);
            }
        }
        let scan = wal::scan(&mut wal, &header, from, MAX_FILE_WAL_BYTES)
            .map_err(|source| self.wal_error(source))?;
        if scan.is_empty() {
            self.state.wal = Some(from);
            return Ok(None);
        }
        self.write_delta(&mut wal, &header, scan).map(Some)
    }

    /// Writes the pages of `scan` as the next level-0 file.
    fn write_delta(
        &mut self,
        wal: &mut File,
        header: &WalHeader,
        scan: wal::Scan,
    ) -> Result<Captured, CaptureError> {
        let page_size = header.page_size;
        let txid = self.state.txid + 1;
        let pre_apply = Checksum(self.state.checksum);
        let mut pages: BTreeMap<u32, PageSource> = scan
            .pages
            .iter()
            .map(|(&p, &o)| (p, PageSource::Wal(o)))
            .collect();
        // Pages the database grew by without writing them to the WAL come from the database file.
        for pgno in (self.state.commit + 1)..=scan.commit {
            pages.entry(pgno).or_insert(PageSource::Db);
        }
        let lock = ltx::lock_pgno(page_size);
        pages.retain(|&p, _| p <= scan.commit && p != lock);
        self.page_sums.resize(scan.commit as usize, Checksum(0));
        let timestamp_ms = now_ms();
        let header_ltx = Header {
            flags: 0,
            page_size,
            commit: scan.commit,
            min_txid: txid,
            max_txid: txid,
            timestamp_ms,
            pre_apply_checksum: Checksum(0),
            wal_offset: scan.from.offset as i64,
            wal_size: (scan.to.offset - scan.from.offset) as i64,
            wal_salt1: header.salt1,
            wal_salt2: header.salt2,
            node_id: 0,
            hearth: None,
        };
        let (captured, post_apply) =
            self.write_file(wal, header_ltx, pre_apply, &pages, scan.transactions, None)?;
        self.state.commit = scan.commit;
        self.state.page_size = page_size;
        self.state.wal = Some(scan.to);
        self.advance(txid, post_apply, timestamp_ms);
        Ok(captured)
    }

    /// Writes a full image of the database (file overlaid with committed WAL frames) as the next level-0
    /// file. The TXID sequence goes on, so restores from earlier points still work.
    fn snapshot(&mut self, reason: Discontinuity) -> Result<Captured, CaptureError> {
        if reason == Discontinuity::NoHistory {
            tracing::info!(db = %self.path.display(), "first capture: writing a full image of the database");
        } else {
            tracing::warn!(db = %self.path.display(), %reason, "continuity lost: writing a full image of the database");
        }
        if reason == Discontinuity::DatabaseReplaced {
            self.reopen()?;
        }
        let (dev, ino) = self.identity()?;
        let mut wal = self.open_wal()?;
        let header = self.read_wal_header(&mut wal)?;
        let page_size = match &header {
            Some(h) => h.page_size,
            None => self.db_page_size()?,
        };
        let (wal_pages, commit, to) = match &header {
            Some(h) => {
                let scan = wal::scan(&mut wal, h, WalPosition::start(h), u64::MAX)
                    .map_err(|source| self.wal_error(source))?;
                let commit = if scan.is_empty() {
                    (self.db_len()? / u64::from(page_size)) as u32
                } else {
                    scan.commit
                };
                (scan.pages, commit, Some(scan.to))
            }
            None => (
                BTreeMap::new(),
                (self.db_len()? / u64::from(page_size)) as u32,
                None,
            ),
        };
        let txid = self.state.txid + 1;
        let timestamp_ms = now_ms();
        let header_ltx = Header {
            flags: 0,
            page_size,
            commit,
            min_txid: txid,
            max_txid: txid,
            timestamp_ms,
            // The previous image's checksum: applying this full image on top of it yields the new one.
            pre_apply_checksum: if txid == 1 {
                Checksum(0)
            } else {
                Checksum(self.state.checksum)
            },
            wal_offset: 0,
            wal_size: 0,
            wal_salt1: 0,
            wal_salt2: 0,
            node_id: 0,
            hearth: None,
        };
        let lock = ltx::lock_pgno(page_size);
        let pages: BTreeMap<u32, PageSource> = (1..=commit)
            .filter(|&p| p != lock)
            .map(|p| {
                (
                    p,
                    wal_pages
                        .get(&p)
                        .map_or(PageSource::Db, |&o| PageSource::Wal(o)),
                )
            })
            .collect();
        self.page_sums = vec![Checksum(0); commit as usize];
        let pre_apply = header_ltx.pre_apply_checksum;
        let header_ltx = Header {
            pre_apply_checksum: Checksum(0),
            ..header_ltx
        };
        let (captured, post_apply) =
            self.write_file(&mut wal, header_ltx, pre_apply, &pages, 0, Some(reason))?;
        self.state.commit = commit;
        self.state.page_size = page_size;
        self.state.wal = to;
        self.state.dev = dev;
        self.state.ino = ino;
        self.advance(txid, post_apply, timestamp_ms);
        self.save_state()?;
        Ok(captured)
    }

    /// Runs a PASSIVE checkpoint under a barrier so no commit slips in between the last capture and the
    /// checkpoint; captures everything first. Returns what SQLite reported.
    ///
    /// hearth never runs RESTART (it blocks writers behind long readers, Litestream #724). TRUNCATE is
    /// left to a later increment; the WAL file is reused after each restart, so its size stays bounded by
    /// the largest burst between two checkpoints.
    pub fn checkpoint(
        &mut self,
        truncate: bool,
    ) -> Result<(CheckpointResult, Vec<Captured>), CaptureError> {
        let mut captured = Vec::new();
        captured.extend(self.sync(None)?);
        let sql = |source| CaptureError::Sqlite {
            path: self.path.clone(),
            source,
        };
        self.barrier.execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
        let result = (|| {
            // Nobody else can commit now; capture what was committed between the first sync and the barrier.
            while let Some(c) = self.sync(None)? {
                captured.push(c);
            }
            self.unpin()?;
            let r = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok(CheckpointResult {
                        busy: r.get::<_, i64>(0)? != 0,
                        wal_frames: r.get(1)?,
                        checkpointed: r.get(2)?,
                    })
                })
                .map_err(|source| CaptureError::Sqlite {
                    path: self.path.clone(),
                    source,
                });
            // For a TRUNCATE afterwards: the commit counter as the barrier leaves it.
            let version = self.data_version();
            self.pin()?;
            r.and_then(|r| Ok((r, version?)))
        })();
        let rollback =
            self.barrier
                .execute_batch("ROLLBACK")
                .map_err(|source| CaptureError::Sqlite {
                    path: self.path.clone(),
                    source,
                });
        let (r, version) = result?;
        rollback?;
        if !truncate {
            return Ok((r, captured));
        }
        // TRUNCATE needs the write lock, which the barrier held, so it runs after the barrier and waits at most
        // the busy timeout for readers and writers. A commit in between may be copied into the database and
        // erased from the WAL unread; the commit counter tells, and then the next capture is a full image.
        self.unpin()?;
        let truncated = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                Ok(CheckpointResult {
                    busy: row.get::<_, i64>(0)? != 0,
                    wal_frames: row.get(1)?,
                    checkpointed: row.get(2)?,
                })
            });
        let after = self.data_version();
        self.bump_seq()?;
        self.pin()?;
        let truncated = truncated.map_err(|source| CaptureError::Sqlite {
            path: self.path.clone(),
            source,
        })?;
        if !truncated.busy && after? != version {
            self.pending_rebase = Some(Discontinuity::TruncateRace);
        }
        Ok((truncated, captured))
    }

    /// SQLite's counter of commits by other connections, as seen by hearth's connection.
    fn data_version(&self) -> Result<i64, CaptureError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|source| CaptureError::Sqlite {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes `pages` as the level-0 file `header.min_txid`, in two passes: the first reads every page to
    /// learn the post-apply checksum, which hearth records in the header (see `ltx::HearthChecksums` for why
    /// it is not in the format's own fields), the second encodes them.
    fn write_file(
        &mut self,
        wal: &mut File,
        header: Header,
        pre_apply: Checksum,
        pages: &BTreeMap<u32, PageSource>,
        transactions: u64,
        rebase: Option<Discontinuity>,
    ) -> Result<(Captured, Checksum), CaptureError> {
        let mut buf = vec![0u8; header.page_size as usize];
        for (&pgno, source) in pages {
            self.read_page(wal, *source, pgno, &mut buf)?;
            self.page_sums[(pgno - 1) as usize] = ltx::page_checksum(pgno, &buf);
        }
        // The page checksums describe the whole image, so the post-apply checksum is their XOR; this stays
        // right even when the map was built from an image that already held some of these pages.
        let post_apply = self.image_checksum();
        let header = Header {
            flags: ltx::HEADER_FLAG_NO_CHECKSUM,
            hearth: Some(ltx::HearthChecksums {
                pre_apply,
                post_apply,
            }),
            ..header
        };
        let txid = header.min_txid;
        let (tmp, recycled, mut enc) = self.create_file(txid, header)?;
        for (&pgno, source) in pages {
            self.read_page(wal, *source, pgno, &mut buf)?;
            enc.write_page(pgno, &buf)
                .map_err(|source| self.ltx_error(source))?;
        }
        let captured = self.finish_file(
            (tmp, recycled),
            enc,
            Checksum(0),
            txid,
            transactions,
            rebase,
        )?;
        Ok((captured, post_apply))
    }

    /// The LTX checksum of the captured image, from the page checksums.
    fn image_checksum(&self) -> Checksum {
        let mut sums = DbChecksum::new();
        for c in &self.page_sums {
            sums.toggle(*c);
        }
        sums.value()
    }

    /// Continues the TXID sequence of a replica after `txid` (with database checksum `checksum`): used when
    /// the database was restored from that replica or when `--force` starts a new image over old history.
    pub fn continue_after(&mut self, txid: u64, checksum: u64) {
        self.state.txid = txid;
        self.state.checksum = checksum;
    }

    /// Writes hearth's sequence row, which gives the WAL a header and a frame to pin on.
    fn bump_seq(&mut self) -> Result<(), CaptureError> {
        self.conn
            .execute(
                "INSERT INTO _hearth_seq (id, seq) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET seq = seq + 1",
                [],
            )
            .map(|_| ())
            .map_err(|source| CaptureError::Sqlite { path: self.path.clone(), source })
    }

    fn pin(&mut self) -> Result<(), CaptureError> {
        if self.pinned {
            return Ok(());
        }
        let sql = |source| CaptureError::Sqlite {
            path: self.path.clone(),
            source,
        };
        self.conn.execute_batch("BEGIN").map_err(sql)?;
        self.conn
            .query_row("SELECT COUNT(1) FROM _hearth_seq", [], |_| Ok(()))
            .map_err(sql)?;
        self.pinned = true;
        Ok(())
    }

    fn unpin(&mut self) -> Result<(), CaptureError> {
        if self.pinned {
            self.conn
                .execute_batch("ROLLBACK")
                .map_err(|source| CaptureError::Sqlite {
                    path: self.path.clone(),
                    source,
                })?;
            self.pinned = false;
        }
        Ok(())
    }

    /// Reopens everything after the database file was replaced; the old descriptor is closed only after
    /// the old connections, for the lock reason given on `Capture`.
    fn reopen(&mut self) -> Result<(), CaptureError> {
        let (fresh, _) = Capture::open(&self.path, Duration::from_secs(1))?;
        let old = std::mem::replace(self, fresh);
        let state = old.state.clone();
        drop(old);
        self.state.txid = state.txid;
        self.state.checksum = state.checksum;
        Ok(())
    }

    /// Whether the database file at the path is still the one we hold.
    fn check_identity(&mut self) -> Result<Option<Discontinuity>, CaptureError> {
        let on_disk = match fs::metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Some(Discontinuity::DatabaseReplaced));
            }
            Err(source) => {
                return Err(CaptureError::Io {
                    path: self.path.clone(),
                    what: "stat the database",
                    source,
                });
            }
        };
        let held = self.identity()?;
        Ok((on_disk != held).then_some(Discontinuity::DatabaseReplaced))
    }

    fn identity(&self) -> Result<(u64, u64), CaptureError> {
        let m = self.db_file.metadata().map_err(|source| CaptureError::Io {
            path: self.path.clone(),
            what: "stat the database",
            source,
        })?;
        Ok((m.dev(), m.ino()))
    }

    fn db_len(&self) -> Result<u64, CaptureError> {
        self.db_file
            .metadata()
            .map(|m| m.len())
            .map_err(|source| CaptureError::Io {
                path: self.path.clone(),
                what: "stat the database",
                source,
            })
    }

    fn db_page_size(&self) -> Result<u32, CaptureError> {
        let size: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(|source| CaptureError::Sqlite {
                path: self.path.clone(),
                source,
            })?;
        Ok(size as u32)
    }

    fn open_wal(&self) -> Result<File, CaptureError> {
        // The WAL is a separate file: opening and closing it does not touch the locks on the database file.
        File::open(&self.wal_path).map_err(|source| CaptureError::Io {
            path: self.wal_path.clone(),
            what: "open the WAL",
            source,
        })
    }

    fn read_wal_header(&self, wal: &mut File) -> Result<Option<WalHeader>, CaptureError> {
        wal::read_header(wal).map_err(|source| self.wal_error(source))
    }

    /// The checksum of the database file alone, without the WAL.
    fn file_checksum(&self, page_size: u32) -> Result<Checksum, CaptureError> {
        let mut file = &self.db_file;
        file.seek(SeekFrom::Start(0))
            .map_err(|source| CaptureError::Io {
                path: self.path.clone(),
                what: "read the database",
                source,
            })?;
        ltx::checksum_database(io::BufReader::new(file), page_size)
            .map_err(|source| self.ltx_error(source))
    }

    /// Recomputes the page checksums of the image "database file + committed WAL frames".
    fn rebuild_page_sums(
        &mut self,
        wal: &mut File,
        header: &WalHeader,
        from: WalPosition,
        include_wal: bool,
    ) -> Result<(), CaptureError> {
        let page_size = header.page_size;
        let file_pages = (self.db_len()? / u64::from(page_size)) as u32;
        let scan = if include_wal {
            Some(wal::scan(wal, header, from, u64::MAX).map_err(|source| self.wal_error(source))?)
        } else {
            None
        };
        let commit = match &scan {
            Some(s) if !s.is_empty() => s.commit,
            _ => file_pages,
        };
        let lock = ltx::lock_pgno(page_size);
        let mut buf = vec![0u8; page_size as usize];
        self.page_sums = vec![Checksum(0); commit as usize];
        for pgno in 1..=commit {
            if pgno == lock {
                continue;
            }
            let source = scan
                .as_ref()
                .and_then(|s| s.pages.get(&pgno))
                .map_or(PageSource::Db, |&o| PageSource::Wal(o));
            self.read_page(wal, source, pgno, &mut buf)?;
            self.page_sums[(pgno - 1) as usize] = ltx::page_checksum(pgno, &buf);
        }
        Ok(())
    }

    fn read_page(
        &self,
        wal: &mut File,
        source: PageSource,
        pgno: u32,
        buf: &mut [u8],
    ) -> Result<(), CaptureError> {
        match source {
            PageSource::Wal(offset) => {
                wal::read_page(wal, offset, buf).map_err(|source| self.wal_error(source))
            }
            PageSource::Db => {
                let offset = u64::from(pgno - 1) * buf.len() as u64;
                let mut file = &self.db_file;
                let read = file
                    .seek(SeekFrom::Start(offset))
                    .and_then(|_| file.read_exact(buf));
                match read {
                    Ok(()) => Ok(()),
                    // A page past the end of the file that the WAL does not hold either reads as zeros,
                    // as SQLite itself treats it.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        buf.fill(0);
                        Ok(())
                    }
                    Err(source) => Err(CaptureError::Io {
                        path: self.path.clone(),
                        what: "read a database page",
                        source,
                    }),
                }
            }
        }
    }

    fn create_file(
        &mut self,
        txid: u64,
        header: Header,
    ) -> Result<(PathBuf, bool, Encoder<io::BufWriter<File>>), CaptureError> {
        let tmp = self.local_file(txid).with_extension("ltx.tmp");
        // A spare is written over in place and cut to size in `finish_file`; when it cannot be taken (it
        // vanished), a new file does as well.
        let recycled = self.spares.pop().and_then(|spare| {
            fs::rename(&spare, &tmp).ok()?;
            fs::OpenOptions::new().write(true).open(&tmp).ok()
        });
        let was_recycled = recycled.is_some();
        let file = match recycled {
            Some(file) => file,
            None => File::create(&tmp).map_err(|source| CaptureError::Io {
                path: tmp.clone(),
                what: "create a level-0 file",
                source,
            })?,
        };
        let enc = Encoder::new(io::BufWriter::new(file), header)
            .map_err(|source| self.ltx_error(source))?;
        Ok((tmp, was_recycled, enc))
    }

    /// Finishes the file that `create_file` began at `tmp` (`recycled` when it was written over a spare).
    fn finish_file(
        &self,
        (tmp, recycled): (PathBuf, bool),
        enc: Encoder<io::BufWriter<File>>,
        post_apply: Checksum,
        txid: u64,
        transactions: u64,
        rebase: Option<Discontinuity>,
    ) -> Result<Captured, CaptureError> {
        let finished = enc
            .finish(post_apply)
            .map_err(|source| self.ltx_error(source))?;
        let io = |what| {
            let path = tmp.clone();
            move |source| CaptureError::Io { path, what, source }
        };
        let file = finished
            .writer
            .into_inner()
            .map_err(|e| io("flush a level-0 file")(e.into_error()))?;
        // A recycled file may be longer than what was written over it; a new one is exactly this long.
        if recycled {
            file.set_len(finished.size)
                .map_err(io("cut a recycled level-0 file to size"))?;
        }
        file.sync_all().map_err(io("fsync a level-0 file"))?;
        let path = self.local_file(txid);
        fs::rename(&tmp, &path).map_err(io("rename a level-0 file"))?;
        sync_dir(&self.meta.join("ltx/0")).map_err(io("fsync the level-0 directory"))?;
        Ok(Captured {
            txid,
            path,
            size: finished.size,
            pages: finished.page_count,
            transactions,
            rebase,
        })
    }

    /// Lets go of the local level-0 files that every replica holds (`shipped` is the lowest TXID uploaded
    /// to all of them), except the newest, which records the captured position.
    ///
    /// Up to `MAX_SPARES` of them are renamed to spare names rather than deleted, and the next captures
    /// write over them. Why: creating a file and deleting one for every capture was about a fifth of the
    /// replicator's time with a hundred databases (inode allocation, freeing blocks, and discard requests
    /// on file systems mounted with `discard`); writing over allocated blocks costs none of that. A spare
    /// is never read: its name is not a level-0 file name.
    pub fn release(&mut self, local: &[(u64, PathBuf)], shipped: u64) {
        let newest = local.last().map_or(0, |(t, _)| *t);
        for (txid, path) in local {
            if *txid > shipped || *txid >= newest {
                continue;
            }
            let free = (0..MAX_SPARES)
                .map(|i| self.spare_path(i))
                .find(|p| !self.spares.contains(p));
            let kept = free.filter(|spare| fs::rename(path, spare).is_ok());
            match kept {
                Some(spare) => self.spares.push(spare),
                None => {
                    let _ = fs::remove_file(path);
                }
            }
        }
    }

    fn spare_path(&self, i: usize) -> PathBuf {
        self.meta.join("ltx/0").join(format!(".spare-{i}"))
    }

    /// Makes `txid` the captured position. Its level-0 file is already on disk, and it is the durable record
    /// of the position: `state.json` is only rewritten by `save_state`, after a full image.
    fn advance(&mut self, txid: u64, checksum: Checksum, timestamp_ms: i64) {
        self.state.txid = txid;
        self.state.checksum = checksum.0;
        self.state.timestamp_ms = timestamp_ms;
    }

    /// Writes `state.json` durably. Needed after a full image, which starts a new base (database identity,
    /// WAL position) that no level-0 header records.
    fn save_state(&mut self) -> Result<(), CaptureError> {
        let path = self.meta.join("state.json");
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(|e| CaptureError::BadState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes).map_err(|source| CaptureError::Io {
            path,
            what: "save local state",
            source,
        })
    }

    /// Local level-0 files by TXID.
    pub fn local_files(&self) -> Result<Vec<(u64, PathBuf)>, CaptureError> {
        list_local_files(&self.meta)
    }

    fn wal_error(&self, source: wal::WalError) -> CaptureError {
        CaptureError::Wal {
            path: self.wal_path.clone(),
            source,
        }
    }

    fn ltx_error(&self, source: ltx::LtxError) -> CaptureError {
        CaptureError::Ltx {
            path: self.path.clone(),
            source,
        }
    }
}

/// The local state in `meta`: `state.json`, rolled forward to the newest level-0 file when a capture
/// went past it (docs/formats/local-state.md). `None` when nothing was captured yet.
///
/// A level-0 file is written to a temporary name, fsynced and renamed before the capture moves on, so the
/// newest one is durable and its header holds the position. When the state was rolled forward, the
/// returned state's `wal` is `None` and that header comes with it: only the WAL can tell whether the
/// position still holds there, and the checksum chain's value at it.
pub fn read_state(meta: &Path) -> Result<Option<(LocalState, Option<Header>)>, CaptureError> {
    let path = meta.join("state.json");
    let bad = |reason: String| CaptureError::BadState {
        path: path.clone(),
        reason,
    };
    let mut state: LocalState = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CaptureError::Io {
                path,
                what: "read local state",
                source,
            });
        }
    };
    if !(1..=STATE_VERSION).contains(&state.version) {
        return Err(bad(format!(
            "version {} is not one this hearth reads (1 to {STATE_VERSION})",
            state.version
        )));
    }
    let Some((txid, file)) = list_local_files(meta)?
        .pop()
        .filter(|(t, _)| *t > state.txid)
    else {
        return Ok(Some((state, None)));
    };
    let bad_file = |reason: String| CaptureError::BadState {
        path: file.clone(),
        reason: format!("{reason}; move the file aside to capture that part of the WAL again"),
    };
    let mut prefix = [0u8; ltx::HEADER_SIZE];
    File::open(&file)
        .and_then(|mut f| f.read_exact(&mut prefix))
        .map_err(|e| bad_file(format!("cannot read its header: {e}")))?;
    let header = ltx::peek_header(&prefix).map_err(|e| bad_file(e.to_string()))?;
    let sums = header
        .hearth
        .filter(|_| header.max_txid == txid)
        .ok_or_else(|| bad_file("not a level-0 file written by hearth's capture".into()))?;
    state.txid = txid;
    state.checksum = sums.post_apply.0;
    state.commit = header.commit;
    state.page_size = header.page_size;
    state.timestamp_ms = header.timestamp_ms;
    state.wal = None;
    Ok(Some((state, Some(header))))
}

/// Local level-0 files in a meta directory, by TXID.
pub fn list_local_files(meta: &Path) -> Result<Vec<(u64, PathBuf)>, CaptureError> {
    let dir = meta.join("ltx/0");
    let mut files = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(source) => {
            return Err(CaptureError::Io {
                path: dir,
                what: "list level-0 files",
                source,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(|source| CaptureError::Io {
            path: dir.clone(),
            what: "list level-0 files",
            source,
        })?;
        if let Some(name) = entry.file_name().to_str()
            && let Ok((min, max)) = ltx::parse_filename(name)
            && min == max
        {
            files.push((min, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

#[derive(Clone, Copy, Debug)]
enum PageSource {
    Wal(u64),
    Db,
}

fn open_connection(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(busy_timeout)?;
    Ok(conn)
}

/// Keeps the WAL file when hearth's connection is the last to close, so a closing app and hearth never race
/// to delete it (SQLITE_FCNTL_PERSIST_WAL, as Litestream sets).
#[allow(unsafe_code)]
fn persist_wal(conn: &Connection) -> rusqlite::Result<()> {
    let mut on: std::os::raw::c_int = 1;
    // SAFETY: `conn.handle()` is a valid open connection for the duration of the call, the database name is a
    // NUL-terminated string, and SQLITE_FCNTL_PERSIST_WAL takes a pointer to an int that lives across the call.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&mut on as *mut std::os::raw::c_int).cast(),
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rc),
            Some("set SQLITE_FCNTL_PERSIST_WAL".into()),
        ))
    }
}

/// The WAL path of a database.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Writes `bytes` to `path` via a temporary name, fsync and rename, then fsyncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Fsyncs a directory so a rename in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
