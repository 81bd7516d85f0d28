//! Files that reach a standby before their manifest: on a first sync the primary streams file
//! data while it is still walking its tree, and the standby writes it straight into
//! `.<name>.hearth-incoming/`, so apply can move whole files into the new tree instead of
//! writing every byte twice (into the chunk store, then into the tree).
//!
//! Nothing here is trusted because it is on disk. A chunk is recorded only after its bytes hashed
//! to its id and were written at their offset; files left by an earlier, interrupted session are
//! read and checked against the offered manifest before any of their chunks count
//! ([`Incoming::check_against`]). Files are named by the BLAKE3 of their path inside the volume,
//! so the directory is flat: no path from the primary is ever used as a path here, and a file that
//! turned into a directory during the primary's walk cannot collide with anything.
//!
//! The files are not fsynced as they are written; apply's `syncfs` makes the tree they end up in
//! durable, and a crash before that only costs a re-check (a torn file fails its hashes).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, RenameFlags};

use crate::error::{IoContext, VolumeError};
use crate::manifest::{ChunkId, ChunkRef, EntryKind, Manifest};

/// Received files of one volume and the chunks known to be in them.
#[derive(Debug)]
pub struct Incoming {
    dir: PathBuf,
    /// Verified chunks per file, by the file's path in the volume.
    files: HashMap<Vec<u8>, Vec<ChunkRef>>,
    /// Where each verified chunk can be read (a file here, or where apply moved it).
    located: HashMap<ChunkId, (PathBuf, u64, u32)>,
    /// The file being written and its path in the volume.
    current: Option<(Vec<u8>, File)>,
    /// Bytes written this session.
    written: u64,
}

impl Incoming {
    /// The received files kept in `dir` (created on the first write).
    pub fn new(dir: PathBuf) -> Self {
        Incoming {
            dir,
            files: HashMap::new(),
            located: HashMap::new(),
            current: None,
            written: 0,
        }
    }

    /// Whether the directory exists (something was received and not yet applied).
    pub fn exists(&self) -> bool {
        self.dir.exists()
    }

    /// Bytes of verified chunks written in this session.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn name(&self, path: &[u8]) -> PathBuf {
        self.dir.join(blake3::hash(path).to_hex().as_str())
    }

    /// Starts (or starts again) the file at `path` in the volume: whatever was received for it
    /// before is void.
    pub fn begin(&mut self, path: &[u8]) -> Result<(), VolumeError> {
        self.current = None;
        if let Some(old) = self.files.remove(path) {
            let name = self.name(path);
            for c in old {
                if self.located.get(&c.id).is_some_and(|(p, _, _)| *p == name) {
                    self.located.remove(&c.id);
                }
            }
        }
        match fs::create_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(VolumeError::io("creating", &self.dir, e)),
        }
        let name = self.name(path);
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&name)
            .ctx("creating", &name)?;
        self.files.insert(path.to_vec(), Vec::new());
        self.current = Some((path.to_vec(), file));
        Ok(())
    }

    /// Writes one chunk of the file last begun, after checking that `data` hashes to `id`.
    pub fn write(&mut self, offset: u64, id: ChunkId, data: &[u8]) -> Result<(), VolumeError> {
        let actual = ChunkId::of(data);
        if actual != id {
            return Err(VolumeError::ChunkMismatch {
                expected: id,
                actual,
            });
        }
        let Some((path, file)) = &self.current else {
            return Err(VolumeError::InvalidManifest(
                "file data without a file to put it in".into(),
            ));
        };
        let len = u32::try_from(data.len())
            .map_err(|_| VolumeError::InvalidManifest("a chunk of 4 GiB or more".into()))?;
        let refs = self.files.get(path).map(Vec::as_slice).unwrap_or_default();
        if refs
            .last()
            .is_some_and(|last| offset < last.offset + u64::from(last.len))
        {
            return Err(VolumeError::InvalidManifest(
                "file data out of order (chunks must come in increasing offsets)".into(),
            ));
        }
        let name = self.name(path);
        file.write_all_at(data, offset).ctx("writing", &name)?;
        let path = path.clone();
        self.located.entry(id).or_insert((name, offset, len));
        self.files
            .entry(path)
            .or_default()
            .push(ChunkRef { offset, len, id });
        self.written += u64::from(len);
        Ok(())
    }

    /// Checks files left by an earlier session against `manifest`: for each regular file of the
    /// manifest whose received copy exists but is not known to this session, every chunk at its
    /// offset is read and hashed, and only those that match count. Returns the bytes that did.
    pub fn check_against(&mut self, manifest: &Manifest) -> Result<u64, VolumeError> {
        self.current = None;
        if !self.exists() {
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
            let name = self.name(&entry.path);
            let file = match OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&name)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(VolumeError::io("opening", &name, e)),
            };
            let have = file.metadata().ctx("inspecting", &name)?.len();
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
                        .or_insert((name.clone(), c.offset, c.len));
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

    /// When the received copy of `path` holds exactly `chunks` (all verified), moves it to `dest`
    /// (which must not exist) and returns true; apply then only sets its size and metadata.
    pub fn take_exact(
        &mut self,
        path: &[u8],
        chunks: &[ChunkRef],
        dest: &Path,
    ) -> Result<bool, VolumeError> {
        let Some(from) = self.claim(path, chunks) else {
            return Ok(false);
        };
        rustix::fs::renameat_with(CWD, &from, CWD, dest, RenameFlags::NOREPLACE)
            .ctx("moving a received file to", dest)?;
        self.relocate(chunks, &from, dest);
        Ok(true)
    }

    /// [`Incoming::take_exact`] in two steps, so that the caller can rename without holding this
    /// (apply builds on several threads): when the received copy of `path` holds exactly
    /// `chunks`, it is no longer offered to anyone else and its name is returned.
    pub fn claim(&mut self, path: &[u8], chunks: &[ChunkRef]) -> Option<PathBuf> {
        if self.files.get(path).map(Vec::as_slice) != Some(chunks) {
            return None;
        }
        if self.current.as_ref().is_some_and(|(p, _)| p == path) {
            self.current = None;
        }
        self.files.remove(path);
        Some(self.name(path))
    }

    /// Records that the file `from` (with `chunks`) was moved to `to`, where later files of the
    /// same apply may read its chunks.
    pub fn relocate(&mut self, chunks: &[ChunkRef], from: &Path, to: &Path) {
        for c in chunks {
            if let Some(loc) = self.located.get_mut(&c.id)
                && loc.0 == from
            {
                loc.0 = to.to_owned();
            }
        }
    }

    /// Reads a verified chunk, checking its hash again (a file may have changed since); `None`
    /// when no good copy is here.
    pub fn read_chunk(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let (path, offset, len) = self.located.get(id)?;
        let file = File::open(path).ok()?;
        let mut buf = vec![0u8; *len as usize];
        file.read_exact_at(&mut buf, *offset).ok()?;
        (ChunkId::of(&buf) == *id).then_some(buf)
    }

    /// Removes the directory and everything in it: after an apply, what is left are copies of
    /// the primary's data that the tree did not need.
    pub fn remove(&mut self) -> Result<(), VolumeError> {
        self.current = None;
        self.files.clear();
        self.located.clear();
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VolumeError::io("removing", &self.dir, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::manifest::{ChunkParams, Entry};

    fn file_entry(path: &[u8], chunks: Vec<ChunkRef>, size: u64) -> Entry {
        Entry {
            path: path.to_vec(),
            kind: EntryKind::File { size, chunks },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }

    fn dir_entry() -> Entry {
        Entry {
            path: Vec::new(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
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
        assert!(inc.write(0, ia, &a).is_err());
        inc.begin(b"dir/f").unwrap();
        inc.write(0, ia, &a).unwrap();
        // Wrong bytes for an id: refused, nothing recorded.
        let err = inc.write(100, ib, b"other").unwrap_err();
        assert!(matches!(err, VolumeError::ChunkMismatch { .. }), "{err}");
        // Out of order: refused.
        assert!(inc.write(0, ib, &b).is_err());
        inc.write(100, ib, &b).unwrap();
        assert!(inc.has_chunk(&ia) && inc.has_chunk(&ib));
        assert_eq!(inc.read_chunk(&ib).unwrap(), b);

        // Starting the same file again voids what was received for it.
        inc.begin(b"dir/f").unwrap();
        assert!(!inc.has_chunk(&ia));
        inc.write(0, ia, &a).unwrap();
        let chunks = vec![ChunkRef {
            offset: 0,
            len: a.len() as u32,
            id: ia,
        }];
        // Only an exact match is moved.
        let dest = tmp.path().join("dest");
        assert!(!inc.take_exact(b"dir/f", &[], &dest).unwrap());
        assert!(inc.take_exact(b"dir/f", &chunks, &dest).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), a);
        // Its chunk is still readable, from where it went.
        assert_eq!(inc.read_chunk(&ia).unwrap(), a);
        inc.remove().unwrap();
        assert!(!inc.exists());
    }

    #[test]
    fn a_later_session_counts_only_chunks_that_hash_right() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("in");
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let c1 = ChunkRef {
            offset: 0,
            len: 100,
            id: ChunkId::of(&data[..100]),
        };
        let c2 = ChunkRef {
            offset: 100,
            len: 100,
            id: ChunkId::of(&data[100..200]),
        };
        let c3 = ChunkRef {
            offset: 200,
            len: 100,
            id: ChunkId::of(&data[200..]),
        };
        {
            let mut inc = Incoming::new(dir.clone());
            inc.begin(b"f").unwrap();
            inc.write(0, c1.id, &data[..100]).unwrap();
            inc.write(100, c2.id, &data[100..200]).unwrap();
            // The session ends before the last chunk.
        }
        // Damage the second chunk on disk, as a crash before any flush might.
        let name = dir.join(blake3::hash(b"f").to_hex().as_str());
        let f = OpenOptions::new().write(true).open(&name).unwrap();
        f.write_all_at(b"xx", 150).unwrap();
        let manifest = Manifest {
            chunking: ChunkParams::default(),
            entries: vec![dir_entry(), file_entry(b"f", vec![c1, c2, c3], 300)],
        };
        let mut inc = Incoming::new(dir);
        assert_eq!(inc.check_against(&manifest).unwrap(), 100);
        assert!(inc.has_chunk(&c1.id));
        assert!(!inc.has_chunk(&c2.id) && !inc.has_chunk(&c3.id));
        // Not whole: not moved.
        assert!(
            !inc.take_exact(b"f", &[c1, c2, c3], &tmp.path().join("d"))
                .unwrap()
        );
    }
}
