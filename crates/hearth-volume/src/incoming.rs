//! Files that reach a standby before their manifest: on a first sync the primary streams file
//! data while it is still walking its tree, and the standby writes each file at its own path in
//! `.<name>.hearth-incoming/`, a tree of its own. When every received file holds exactly what the
//! manifest says of it and nothing else is there ([`Incoming::fits`]), apply takes the whole
//! folder as the start of the new tree with one rename ([`Incoming::move_to`]) and only sets
//! metadata; otherwise it moves each file that fits into the new tree and reads the other checked
//! chunks from where they are. Either way no byte is written twice.
//!
//! Why a tree and not a flat folder of hashed names (protocol 4 and 5 before this change): on the
//! benchmark's first sync of 100,000 files, moving each received file into the new tree took
//! 1.0-1.3 s of renames, which barely run in parallel (they serialize in the kernel), out of a
//! 2 s build.
//!
//! Nothing here is trusted because it is on disk. A chunk is recorded only after its bytes hashed
//! to its id and were written at their offset; files left by an earlier, interrupted session are
//! read and checked against the offered manifest before any of their chunks count
//! ([`Incoming::check_against`]), and such a folder never becomes the new tree whole (this
//! session does not know everything in it). Paths come from the primary, are plain (checked before
//! they reach here), and are opened beneath the folder without following any symlink (`openat2`
//! with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so nothing is written outside it. A path that
//! was a file early in the primary's walk and a folder later (or the other way round) voids what
//! was received under the old kind.
//!
//! The files are not fsynced as they are written; apply's `syncfs` makes the tree they end up in
//! durable, and a crash before that only costs a re-check (a torn file fails its hashes).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;

use crate::apply::join;
use crate::error::{IoContext, VolumeError};
use crate::manifest::{ChunkId, ChunkRef, EntryKind, Manifest, is_under};

/// Received files of one volume and the chunks known to be in them.
#[derive(Debug)]
pub struct Incoming {
    /// The folder's own name: what [`Incoming::exists`] and [`Incoming::remove`] are about.
    home: PathBuf,
    /// Where the received tree is now: `home`, or the new tree after [`Incoming::move_to`].
    root: PathBuf,
    /// `root` opened as a path handle (it follows the folder when it is renamed).
    fd: Option<OwnedFd>,
    /// Whether this value created the folder, and so knows everything in it.
    made_here: bool,
    /// Verified chunks per file, by the file's path in the volume.
    files: HashMap<Vec<u8>, Vec<ChunkRef>>,
    /// Folders made for the files, by path in the volume.
    dirs: HashSet<Vec<u8>>,
    /// Where each verified chunk can be read: the path of the file holding it, its offset and
    /// length.
    located: HashMap<ChunkId, (Vec<u8>, u64, u32)>,
    /// Files apply moved one by one, and where they went.
    moved: HashMap<Vec<u8>, PathBuf>,
    /// The file being written and its path in the volume.
    current: Option<(Vec<u8>, File)>,
    /// Checked chunks of `current` not yet written: a run of adjacent ones, written with one
    /// `pwritev` ([`Incoming::flush`]).
    pending: Vec<(u64, ChunkId, Vec<u8>)>,
    /// Bytes written this session.
    written: u64,
}

/// Bytes of adjacent chunks gathered before they are written with one `pwritev`. Writing each
/// chunk on its own cost the standby about twice the kernel time per byte on ext4 (on a 1.6 GB
/// test: 0.9 s against 0.4 s with caches dropped), mostly zeroing the parts of new page-cache
/// blocks a write did not cover, which the next chunk's write then filled. (On the benchmark's
/// tree, whose files are mostly one or two chunks, the gain was lost in the noise.)
const WRITE_RUN_BYTES: usize = 4 << 20;

/// `pwritev` of all of `bufs` at `offset`, again after short writes.
fn write_all_vectored_at(file: &File, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut bufs: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
    let mut first = 0;
    while first < bufs.len() {
        let slices: Vec<io::IoSlice<'_>> =
            bufs[first..].iter().map(|b| io::IoSlice::new(b)).collect();
        let mut n = match rustix::io::pwritev(file, &slices, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += n as u64;
        while n > 0 {
            let b = bufs[first];
            if n >= b.len() {
                n -= b.len();
                first += 1;
            } else {
                bufs[first] = &b[n..];
                n = 0;
            }
        }
    }
    Ok(())
}

impl Incoming {
    /// The received files kept in `dir` (created on the first write).
    pub fn new(dir: PathBuf) -> Self {
        Incoming {
            root: dir.clone(),
            home: dir,
            fd: None,
            made_here: false,
            files: HashMap::new(),
            dirs: HashSet::new(),
            located: HashMap::new(),
            moved: HashMap::new(),
            current: None,
            pending: Vec::new(),
            written: 0,
        }
    }

    /// Whether the folder exists (something was received and not yet applied).
    pub fn exists(&self) -> bool {
        self.home.exists()
    }

    /// Bytes of verified chunks written in this session.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The folder, opened (and first created if `create`); `None` when it does not exist.
    fn root_fd(&mut self, create: bool) -> Result<Option<&OwnedFd>, VolumeError> {
        if self.fd.is_none() {
            if create {
                match fs::create_dir(&self.home) {
                    Ok(()) => self.made_here = true,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(VolumeError::io("creating", &self.home, e)),
                }
            }
            match rustix::fs::open(
                &self.root,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => self.fd = Some(fd),
                Err(Errno::NOENT) if !create => return Ok(None),
                Err(e) => return Err(VolumeError::io("opening", &self.root, e.into())),
            }
        }
        Ok(self.fd.as_ref())
    }

    /// Opens `rel` beneath the folder without following any symlink.
    fn open_beneath(&self, rel: &[u8], flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
        let Some(fd) = &self.fd else {
            return Err(Errno::NOENT);
        };
        let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
        rustix::fs::openat2(
            fd,
            OsStr::from_bytes(rel),
            flags | OFlags::CLOEXEC,
            mode,
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
    }

    fn err(&self, verb: &'static str, rel: &[u8], e: Errno) -> VolumeError {
        VolumeError::io(verb, join(&self.root, rel), e.into())
    }

    /// Forgets what was received for the file at `path`.
    fn forget_file(&mut self, path: &[u8]) {
        if let Some(old) = self.files.remove(path) {
            for c in old {
                if self.located.get(&c.id).is_some_and(|(p, _, _)| p == path) {
                    self.located.remove(&c.id);
                }
            }
        }
        self.moved.remove(path);
    }

    /// Forgets everything received at or beneath `top`.
    fn forget_tree(&mut self, top: &[u8]) {
        self.files.retain(|p, _| !is_under(p, top));
        self.dirs.retain(|p| !is_under(p, top));
        self.located.retain(|_, (p, _, _)| !is_under(p, top));
        self.moved.retain(|p, _| !is_under(p, top));
    }

    /// Makes the folders above `path`, replacing a file received earlier where a folder must be
    /// now (the primary's tree changed while it was walked).
    fn make_parents(&mut self, path: &[u8]) -> Result<(), VolumeError> {
        let mut end = 0;
        while let Some(k) = path[end..].iter().position(|b| *b == b'/') {
            let dir = &path[..end + k];
            let (parent, name) = match dir.iter().rposition(|b| *b == b'/') {
                Some(j) => (&dir[..j], &dir[j + 1..]),
                None => (&b""[..], dir),
            };
            let pfd = self
                .open_beneath(parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
                .map_err(|e| self.err("opening without following symlinks", parent, e))?;
            let name = OsStr::from_bytes(name);
            match rustix::fs::mkdirat(&pfd, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(Errno::EXIST) => {
                    let st = rustix::fs::statat(&pfd, name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| self.err("inspecting", dir, e))?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                        self.forget_file(dir);
                        rustix::fs::unlinkat(&pfd, name, AtFlags::empty())
                            .map_err(|e| self.err("removing", dir, e))?;
                        rustix::fs::mkdirat(&pfd, name, Mode::from_raw_mode(0o700))
                            .map_err(|e| self.err("creating", dir, e))?;
                    }
                }
                Err(e) => return Err(self.err("creating", dir, e)),
            }
            self.dirs.insert(dir.to_vec());
            end += k + 1;
        }
        Ok(())
    }

    /// Creates (or empties) the file at `path`, making its folders first when needed.
    fn create_file(&mut self, path: &[u8]) -> Result<File, VolumeError> {
        let flags = OFlags::CREATE | OFlags::RDWR | OFlags::TRUNC;
        let mode = Mode::from_raw_mode(0o600);
        match self.open_beneath(path, flags, mode) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(Errno::NOENT | Errno::NOTDIR) => self.make_parents(path)?,
            Err(Errno::ISDIR) => {
                // A folder earlier in the walk: what it held is void. It is hearth's own, and it
                // was just reached without following a symlink.
                self.open_beneath(path, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
                    .map_err(|e| self.err("opening without following symlinks", path, e))?;
                self.forget_tree(path);
                let abs = join(&self.root, path);
                fs::remove_dir_all(&abs).ctx("removing", &abs)?;
            }
            Err(e) => return Err(self.err("creating", path, e)),
        }
        self.open_beneath(path, flags, mode)
            .map(File::from)
            .map_err(|e| self.err("creating", path, e))
    }

    /// Starts (or starts again) the file at `path` in the volume: whatever was received for it
    /// before is void.
    pub fn begin(&mut self, path: &[u8]) -> Result<(), VolumeError> {
        self.finish()?;
        self.forget_file(path);
        self.root_fd(true)?;
        let file = self.create_file(path)?;
        self.files.insert(path.to_vec(), Vec::new());
        self.current = Some((path.to_vec(), file));
        Ok(())
    }

    /// Writes one chunk of the file last begun, after checking that `data` hashes to `id`.
    /// Adjacent chunks are gathered and written together, up to [`WRITE_RUN_BYTES`] (see
    /// there); [`Incoming::flush`] writes what is gathered, and a chunk counts only once written.
    pub fn write(&mut self, offset: u64, id: ChunkId, data: Vec<u8>) -> Result<(), VolumeError> {
        let actual = ChunkId::of(&data);
        if actual != id {
            return Err(VolumeError::ChunkMismatch {
                expected: id,
                actual,
            });
        }
        let Some((path, _)) = &self.current else {
            return Err(VolumeError::InvalidManifest(
                "file data without a file to put it in".into(),
            ));
        };
        if u32::try_from(data.len()).is_err() {
            return Err(VolumeError::InvalidManifest(
                "a chunk of 4 GiB or more".into(),
            ));
        }
        let end = match self.pending.last() {
            Some((o, _, d)) => Some(o + d.len() as u64),
            None => self
                .files
                .get(path)
                .and_then(|refs| refs.last())
                .map(|last| last.offset + u64::from(last.len)),
        };
        if end.is_some_and(|end| offset < end) {
            return Err(VolumeError::InvalidManifest(
                "file data out of order (chunks must come in increasing offsets)".into(),
            ));
        }
        // A hole (sparse file) ends the run: the run is written at one offset.
        if end != Some(offset) && !self.pending.is_empty() {
            self.flush()?;
        }
        self.pending.push((offset, id, data));
        if self.pending.iter().map(|(_, _, d)| d.len()).sum::<usize>() >= WRITE_RUN_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the chunks [`Incoming::write`] gathered, and from then on counts them.
    pub fn flush(&mut self) -> Result<(), VolumeError> {
        let Some((path, file)) = &self.current else {
            return Ok(());
        };
        let Some(&(start, _, _)) = self.pending.first() else {
            return Ok(());
        };
        let bufs: Vec<&[u8]> = self.pending.iter().map(|(_, _, d)| d.as_slice()).collect();
        write_all_vectored_at(file, &bufs, start).ctx("writing", &join(&self.root, path))?;
        let path = path.clone();
        let refs = self.files.entry(path.clone()).or_default();
        for (offset, id, data) in self.pending.drain(..) {
            let len = data.len() as u32;
            self.located
                .entry(id)
                .or_insert((path.clone(), offset, len));
            refs.push(ChunkRef { offset, len, id });
            self.written += u64::from(len);
        }
        Ok(())
    }

    /// Writes what is gathered for the file being written and closes it.
    fn finish(&mut self) -> Result<(), VolumeError> {
        self.flush()?;
        self.current = None;
        Ok(())
    }

    /// Checks files left by an earlier session against `manifest`: for each regular file of the
    /// manifest whose received copy exists but is not known to this session, every chunk at its
    /// offset is read and hashed, and only those that match count. Returns the bytes that did.
    pub fn check_against(&mut self, manifest: &Manifest) -> Result<u64, VolumeError> {
        self.finish()?;
        if self.root_fd(false)?.is_none() {
            return Ok(0);
        }
        let mut found = 0u64;
        for entry in &manifest.entries {
            let EntryKind::File { chunks, .. } = &entry.kind else {
                continue;
            };
            if self.files.contains_key(&entry.path) {
                continue;
            }
            let file = match self.open_beneath(&entry.path, OFlags::RDONLY, Mode::empty()) {
                Ok(fd) => File::from(fd),
                // Not received, or something else than a file is there now.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::ISDIR) => continue,
                Err(e) => return Err(self.err("opening", &entry.path, e)),
            };
            let name = join(&self.root, &entry.path);
            let md = file.metadata().ctx("inspecting", &name)?;
            if !md.is_file() {
                continue;
            }
            let have = md.len();
            let mut good = Vec::new();
            let mut buf = Vec::new();
            for c in chunks {
                if c.offset + u64::from(c.len) > have {
                    break;
                }
                buf.resize(c.len as usize, 0);
                file.read_exact_at(&mut buf, c.offset)
                    .ctx("reading", &name)?;
                if ChunkId::of(&buf) == c.id {
                    self.located
                        .entry(c.id)
                        .or_insert((entry.path.clone(), c.offset, c.len));
                    found += u64::from(c.len);
                    good.push(*c);
                }
            }
            self.files.insert(entry.path.clone(), good);
        }
        Ok(found)
    }

    /// Whether a verified copy of chunk `id` is here.
    pub fn has_chunk(&self, id: &ChunkId) -> bool {
        self.located.contains_key(id)
    }

    /// Every verified chunk.
    pub fn chunk_ids(&self) -> HashSet<ChunkId> {
        self.located.keys().copied().collect()
    }

    /// Whether the folder can become the tree of `manifest` whole: this value made it (so it
    /// knows everything in it), every file in it holds exactly its entry's chunks, and every
    /// folder in it is a folder of the manifest. Entries of the manifest it lacks are built as
    /// usual.
    pub fn fits(&self, manifest: &Manifest) -> bool {
        self.made_here
            && self.fd.is_some()
            && self.root == self.home
            && self.files.iter().all(|(path, got)| {
                matches!(manifest.entry(path).map(|e| &e.kind),
                    Some(EntryKind::File { chunks, .. }) if chunks == got)
            })
            && self
                .dirs
                .iter()
                .all(|path| matches!(manifest.entry(path).map(|e| &e.kind), Some(EntryKind::Dir)))
    }

    /// Renames the folder to `dest` (which must not exist), to be built on as the new tree when
    /// it [`fits`](Incoming::fits); its files stay claimable and readable there.
    pub fn move_to(&mut self, dest: &Path) -> Result<(), VolumeError> {
        self.finish()?;
        rustix::fs::renameat_with(CWD, &self.root, CWD, dest, RenameFlags::NOREPLACE)
            .ctx("moving the received files to", dest)?;
        self.root = dest.to_owned();
        Ok(())
    }

    /// When the received copy of `path` holds exactly `chunks` (all verified), it is no longer
    /// offered to anyone else and where it is now is returned; apply moves it into the new tree
    /// unless it is there already (after [`Incoming::move_to`]), and then only sets its size and
    /// metadata. Chunks gathered but not yet written do not count.
    pub fn claim(&mut self, path: &[u8], chunks: &[ChunkRef]) -> Option<PathBuf> {
        if self.files.get(path).map(Vec::as_slice) != Some(chunks) {
            return None;
        }
        if self.current.as_ref().is_some_and(|(p, _)| p == path) {
            self.pending.clear();
            self.current = None;
        }
        self.files.remove(path);
        Some(self.location(path))
    }

    /// Records that the received file at `path` was moved to `to`, where later files of the same
    /// apply may read its chunks.
    pub fn relocate(&mut self, path: &[u8], to: &Path) {
        self.moved.insert(path.to_vec(), to.to_owned());
    }

    fn location(&self, path: &[u8]) -> PathBuf {
        match self.moved.get(path) {
            Some(p) => p.clone(),
            None => join(&self.root, path),
        }
    }

    /// Reads a verified chunk, checking its hash again (a file may have changed since); `None`
    /// when no good copy is here.
    pub fn read_chunk(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let (path, offset, len) = self.located.get(id)?;
        let file = File::open(self.location(path)).ok()?;
        let mut buf = vec![0u8; *len as usize];
        file.read_exact_at(&mut buf, *offset).ok()?;
        (ChunkId::of(&buf) == *id).then_some(buf)
    }

    /// Removes the folder and everything in it: after an apply, what is left are copies of the
    /// primary's data that the tree did not need. A folder that became the new tree
    /// ([`Incoming::move_to`]) is no longer here and is not touched.
    pub fn remove(&mut self) -> Result<(), VolumeError> {
        self.current = None;
        self.pending.clear();
        self.fd = None;
        self.made_here = false;
        self.files.clear();
        self.dirs.clear();
        self.located.clear();
        self.moved.clear();
        self.root = self.home.clone();
        match fs::remove_dir_all(&self.home) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VolumeError::io("removing", &self.home, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::manifest::test_support::file_of;
    use crate::manifest::{ChunkParams, Entry};

    fn dir_entry(path: &[u8]) -> Entry {
        Entry {
            path: path.to_vec(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            chunking: ChunkParams::default(),
            entries,
        }
    }

    #[test]
    fn verified_chunks_are_kept_and_bad_ones_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut inc = Incoming::new(tmp.path().join("in"));
        assert!(!inc.exists());
        let (a, b) = (b"first chunk".to_vec(), b"second".to_vec());
        let (ia, ib) = (ChunkId::of(&a), ChunkId::of(&b));
        // Data before any file is refused.
        assert!(inc.write(0, ia, a.clone()).is_err());
        inc.begin(b"dir/f").unwrap();
        // Each file is at its own path in the folder.
        assert!(tmp.path().join("in/dir/f").is_file());
        inc.write(0, ia, a.clone()).unwrap();
        // Wrong bytes for an id: refused, nothing recorded.
        let err = inc.write(100, ib, b"other".to_vec()).unwrap_err();
        assert!(matches!(err, VolumeError::ChunkMismatch { .. }), "{err}");
        // Out of order: refused.
        assert!(inc.write(0, ib, b.clone()).is_err());
        inc.write(100, ib, b.clone()).unwrap();
        // The hole before the second chunk ended the first run, which was written; the second is
        // gathered, and counts only once written.
        assert!(inc.has_chunk(&ia) && !inc.has_chunk(&ib));
        inc.flush().unwrap();
        assert!(inc.has_chunk(&ia) && inc.has_chunk(&ib));
        assert_eq!(inc.read_chunk(&ib).unwrap(), b);

        // Starting the same file again voids what was received for it.
        inc.begin(b"dir/f").unwrap();
        assert!(!inc.has_chunk(&ia));
        inc.write(0, ia, a.clone()).unwrap();
        inc.flush().unwrap();
        let chunks = vec![ChunkRef {
            offset: 0,
            len: a.len() as u32,
            id: ia,
        }];
        // Only an exact match is claimed.
        assert!(inc.claim(b"dir/f", &[]).is_none());
        let from = inc.claim(b"dir/f", &chunks).unwrap();
        assert_eq!(from, tmp.path().join("in/dir/f"));
        let dest = tmp.path().join("dest");
        fs::rename(&from, &dest).unwrap();
        inc.relocate(b"dir/f", &dest);
        assert_eq!(fs::read(&dest).unwrap(), a);
        // Its chunk is still readable, from where it went.
        assert_eq!(inc.read_chunk(&ia).unwrap(), a);
        inc.remove().unwrap();
        assert!(!inc.exists());
        assert!(dest.exists());
    }

    #[test]
    fn a_later_session_counts_only_chunks_that_hash_right() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("in");
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let ids: Vec<ChunkId> = data.chunks(100).map(ChunkId::of).collect();
        let entry = file_of("d/f", &[(ids[0], 100), (ids[1], 100), (ids[2], 100)]);
        let EntryKind::File { chunks, .. } = entry.kind.clone() else {
            unreachable!()
        };
        let m = manifest(vec![dir_entry(b""), dir_entry(b"d"), entry]);
        {
            let mut inc = Incoming::new(dir.clone());
            inc.begin(b"d/f").unwrap();
            inc.write(0, ids[0], data[..100].to_vec()).unwrap();
            inc.write(100, ids[1], data[100..200].to_vec()).unwrap();
            inc.flush().unwrap();
            // The session ends before the last chunk.
        }
        // Damage the second chunk on disk, as a crash before any flush might.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("d/f"))
            .unwrap();
        f.write_all_at(b"xx", 150).unwrap();
        let mut inc = Incoming::new(dir);
        assert_eq!(inc.check_against(&m).unwrap(), 100);
        assert!(inc.has_chunk(&ids[0]));
        assert!(!inc.has_chunk(&ids[1]) && !inc.has_chunk(&ids[2]));
        // Not whole: not claimed. And a folder this session did not make never becomes the
        // tree whole, even where what it knows of fits.
        assert!(inc.claim(b"d/f", &chunks).is_none());
        assert!(!inc.fits(&m));
    }

    #[test]
    fn received_files_become_the_tree_only_when_they_are_exactly_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (b"aaaa".to_vec(), b"bbbbbb".to_vec());
        let (ia, ib) = (ChunkId::of(&a), ChunkId::of(&b));
        let tree = |extra: Vec<Entry>| {
            let mut e = vec![
                dir_entry(b""),
                dir_entry(b"x"),
                file_of("x/a", &[(ia, 4)]),
                dir_entry(b"x/y"),
                file_of("x/y/b", &[(ib, 6)]),
            ];
            e.extend(extra);
            e.sort_by(|l, r| l.path.cmp(&r.path));
            manifest(e)
        };
        let receive = |name: &str| {
            let mut inc = Incoming::new(tmp.path().join(name));
            inc.begin(b"x/a").unwrap();
            inc.write(0, ia, a.clone()).unwrap();
            inc.begin(b"x/y/b").unwrap();
            inc.write(0, ib, b.clone()).unwrap();
            inc.flush().unwrap();
            inc
        };
        let mut inc = receive("in1");
        // Entries it lacks (an empty folder, a file not streamed) are built as usual.
        assert!(inc.fits(&tree(vec![dir_entry(b"z"), file_of("z/c", &[(ia, 4)])])));
        // Other chunks for a file, or a folder where the manifest has a file: no.
        assert!(!inc.fits(&manifest(vec![
            dir_entry(b""),
            dir_entry(b"x"),
            file_of("x/a", &[(ib, 6)]),
            dir_entry(b"x/y"),
            file_of("x/y/b", &[(ib, 6)]),
        ])));
        assert!(!inc.fits(&manifest(vec![
            dir_entry(b""),
            dir_entry(b"x"),
            file_of("x/a", &[(ia, 4)]),
            file_of("x/y", &[(ib, 6)]),
        ])));
        // Moved whole: claims name the files where they now are, chunks are read from there,
        // and removing the received files leaves the moved tree alone.
        let dest = tmp.path().join("staging");
        inc.move_to(&dest).unwrap();
        assert!(!inc.exists());
        let xa = [ChunkRef {
            offset: 0,
            len: 4,
            id: ia,
        }];
        assert_eq!(inc.claim(b"x/a", &xa), Some(dest.join("x/a")));
        assert_eq!(inc.read_chunk(&ib).unwrap(), b);
        inc.remove().unwrap();
        assert_eq!(fs::read(dest.join("x/y/b")).unwrap(), b);

        // A file the manifest no longer has (deleted during the walk) keeps the folder from
        // becoming the tree.
        let mut inc = receive("in2");
        inc.begin(b"gone").unwrap();
        assert!(!inc.fits(&tree(vec![])));
        assert!(inc.fits(&tree(vec![file_of("gone", &[])])));
    }

    #[test]
    fn a_path_that_changed_kind_during_the_walk_voids_what_it_held() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("in");
        let mut inc = Incoming::new(root.clone());
        let (a, b) = (b"file then folder".to_vec(), b"inside".to_vec());
        let (ia, ib) = (ChunkId::of(&a), ChunkId::of(&b));
        // "p" is a file, then a folder holding "p/q".
        inc.begin(b"p").unwrap();
        inc.write(0, ia, a.clone()).unwrap();
        inc.begin(b"p/q").unwrap();
        inc.write(0, ib, b.clone()).unwrap();
        inc.flush().unwrap();
        assert!(!inc.has_chunk(&ia) && inc.has_chunk(&ib));
        assert!(root.join("p").is_dir());
        // And a file again.
        inc.begin(b"p").unwrap();
        assert!(!inc.has_chunk(&ib));
        assert!(root.join("p").is_file());
        let m = manifest(vec![dir_entry(b""), file_of("p", &[])]);
        assert!(inc.fits(&m));
    }

    #[test]
    fn nothing_is_written_through_a_symlink_in_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("in");
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let mut inc = Incoming::new(root.clone());
        inc.begin(b"f").unwrap();
        // Someone plants symlinks in hearth's folder.
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        std::os::unix::fs::symlink(outside.join("g"), root.join("g")).unwrap();
        assert!(inc.begin(b"d/x").is_err());
        assert!(inc.begin(b"g").is_err());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn adjacent_chunks_are_written_together_and_holes_stay_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("in");
        let mut inc = Incoming::new(root.clone());
        let parts: Vec<Vec<u8>> = (1..=4u8).map(|k| vec![k; 1000 * usize::from(k)]).collect();
        let ids: Vec<ChunkId> = parts.iter().map(|p| ChunkId::of(p)).collect();
        inc.begin(b"f").unwrap();
        // Two adjacent chunks, a hole of 5000 bytes, two more adjacent ones.
        inc.write(0, ids[0], parts[0].clone()).unwrap();
        inc.write(1000, ids[1], parts[1].clone()).unwrap();
        inc.write(8000, ids[2], parts[2].clone()).unwrap();
        // Behind the gathered run: refused.
        assert!(inc.write(10_000, ids[3], parts[3].clone()).is_err());
        inc.write(11_000, ids[3], parts[3].clone()).unwrap();
        // The next file writes this one's run.
        inc.begin(b"g").unwrap();
        let got = fs::read(root.join("f")).unwrap();
        let mut want = vec![0u8; 15_000];
        want[..1000].copy_from_slice(&parts[0]);
        want[1000..3000].copy_from_slice(&parts[1]);
        want[8000..11_000].copy_from_slice(&parts[2]);
        want[11_000..].copy_from_slice(&parts[3]);
        assert_eq!(got, want);
        for id in &ids {
            assert!(inc.has_chunk(id));
        }
        assert_eq!(inc.written(), 10_000);
        // A run reaching the bound is written without waiting for the file's end.
        let big = vec![7u8; WRITE_RUN_BYTES];
        inc.write(0, ChunkId::of(&big), big.clone()).unwrap();
        assert_eq!(
            fs::metadata(root.join("g")).unwrap().len(),
            big.len() as u64
        );
    }
}
