//! The standby's content-addressed chunk store: `<dir>/chunks/<first two hex>/<64 hex>`, written
//! through `<dir>/tmp/` with fsync and rename, and checked against the hash both on the way in
//! and on the way out. A store can also hold checked chunks in memory only ([`ChunkStore::hold`]),
//! for a small sync whose chunks are cheaper to send again than to write, sync, read and delete.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{IoContext, VolumeError};
use crate::manifest::{ChunkId, EntryKind, Manifest};

/// When a stored chunk becomes durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Every chunk is fsynced before the rename that names it, so once [`ChunkStore::put`]
    /// returns the chunk survives a crash, and a crash never leaves a torn chunk under its name.
    /// Costs one fsync per chunk (milliseconds each on many disks).
    #[default]
    EachChunk,
    /// Chunks are renamed into place without an fsync; [`ChunkStore::sync`] makes everything
    /// written so far durable with one `syncfs`. The caller must call it before telling the
    /// sender the chunks are stored. A crash before that can leave a torn chunk under its name;
    /// every read checks the hash, so such a chunk is found, moved to `corrupt/` and sent again,
    /// never applied.
    Batch,
}

/// Bytes that were checked to hash to their chunk id. Only [`VerifiedChunk::new`] makes one, so
/// holding one proves the check was done (once) before the bytes are stored.
#[derive(Clone, Debug)]
pub struct VerifiedChunk {
    id: ChunkId,
    data: Vec<u8>,
}

impl VerifiedChunk {
    /// Checks `data` against `id`: [`VolumeError::ChunkMismatch`] when they differ.
    pub fn new(id: ChunkId, data: Vec<u8>) -> Result<Self, VolumeError> {
        let actual = ChunkId::of(&data);
        if actual != id {
            return Err(VolumeError::ChunkMismatch {
                expected: id,
                actual,
            });
        }
        Ok(VerifiedChunk { id, data })
    }

    /// The chunk's length.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// A directory of chunks named by their BLAKE3 hash.
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
    counter: AtomicU64,
    durability: Durability,
    /// Checked chunks kept in memory only (see [`ChunkStore::hold`]).
    held: Mutex<HashMap<ChunkId, Vec<u8>>>,
}

impl ChunkStore {
    /// Opens the store at `dir` with [`Durability::EachChunk`].
    pub fn open(dir: &Path) -> Result<Self, VolumeError> {
        Self::open_with(dir, Durability::EachChunk)
    }

    /// Opens (creating if needed) the store at `dir`. Temporary files left by an interrupted
    /// write are removed: they were never renamed into place, so no one relies on them.
    pub fn open_with(dir: &Path, durability: Durability) -> Result<Self, VolumeError> {
        fs::create_dir_all(dir.join("chunks")).ctx("creating", dir)?;
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).ctx("creating", &tmp)?;
        for leftover in fs::read_dir(&tmp).ctx("listing", &tmp)? {
            let leftover = leftover.ctx("listing", &tmp)?;
            fs::remove_file(leftover.path()).ctx("removing", &leftover.path())?;
        }
        Ok(ChunkStore {
            root: dir.to_owned(),
            counter: AtomicU64::new(0),
            durability,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Whether the chunk is stored (or held).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.is_held(id) || self.path_of(id).is_file()
    }

    fn is_held(&self, id: &ChunkId) -> bool {
        self.held.lock().is_ok_and(|h| h.contains_key(id))
    }

    /// Keeps a checked chunk in memory instead of writing it: it is never durable, and it is gone
    /// with this `ChunkStore` value (a standby opens one per connection). For a small sync (a
    /// standby holds at most a few tens of MB this way, see [`ChunkStore::held_bytes`] and
    /// [`ChunkStore::spill`]) writing each chunk as a file, syncing, reading it back and deleting
    /// it cost more than sending it again after a crash would.
    pub fn hold(&self, chunk: VerifiedChunk) {
        if let Ok(mut held) = self.held.lock() {
            held.insert(chunk.id, chunk.data);
        }
    }

    /// Bytes of the chunks held in memory.
    pub fn held_bytes(&self) -> u64 {
        self.held
            .lock()
            .map(|h| h.values().map(|d| d.len() as u64).sum())
            .unwrap_or(0)
    }

    /// Writes every held chunk to the store (as [`ChunkStore::put_verified`]) and holds nothing
    /// more: for when more data arrives than a small sync was expected to need.
    pub fn spill(&self) -> Result<(), VolumeError> {
        let held = match self.held.lock() {
            Ok(mut h) => std::mem::take(&mut *h),
            Err(_) => return Ok(()),
        };
        for (id, data) in held {
            self.put_verified(&VerifiedChunk { id, data })?;
        }
        Ok(())
    }

    /// Stores `data` as chunk `id`. The bytes must hash to `id`, otherwise nothing is written
    /// and [`VolumeError::ChunkMismatch`] is returned. Returns whether the chunk was new. With
    /// [`Durability::EachChunk`] the chunk is durable when this returns: its file is fsynced
    /// before the rename that names it, so a crash leaves either no chunk or a whole one.
    pub fn put(&self, id: &ChunkId, data: &[u8]) -> Result<bool, VolumeError> {
        VerifiedChunk::new(*id, data.to_vec()).and_then(|c| self.put_verified(&c))
    }

    /// Stores a chunk whose bytes were already checked against its id (see [`VerifiedChunk`]),
    /// so they are not hashed a second time. Otherwise as [`ChunkStore::put`].
    pub fn put_verified(&self, chunk: &VerifiedChunk) -> Result<bool, VolumeError> {
        let (id, data) = (&chunk.id, chunk.data.as_slice());
        let dest = self.path_of(id);
        if dest.is_file() {
            return Ok(false);
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.{}.{n}", id.to_hex(), std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx("creating", &tmp)?;
        file.write_all(data).ctx("writing", &tmp)?;
        if self.durability == Durability::EachChunk {
            file.sync_all().ctx("syncing", &tmp)?;
        }
        drop(file);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).ctx("creating", parent)?;
        }
        fs::rename(&tmp, &dest).ctx("renaming into place", &dest)?;
        Ok(true)
    }

    /// Reads a chunk and checks it against its id. A stored chunk that no longer matches (disk
    /// corruption) is moved to `<dir>/corrupt/` so the next transfer sends it again, and the
    /// read fails with [`VolumeError::ChunkMismatch`].
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>, VolumeError> {
        if let Ok(held) = self.held.lock()
            && let Some(data) = held.get(id)
        {
            return Ok(data.clone());
        }
        let path = self.path_of(id);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VolumeError::MissingChunks { ids: vec![*id] });
            }
            Err(e) => return Err(VolumeError::io("reading", path, e)),
        };
        let actual = ChunkId::of(&data);
        if actual != *id {
            let corrupt = self.root.join("corrupt");
            fs::create_dir_all(&corrupt).ctx("creating", &corrupt)?;
            fs::rename(&path, corrupt.join(id.to_hex())).ctx("moving aside", &path)?;
            return Err(VolumeError::ChunkMismatch {
                expected: *id,
                actual,
            });
        }
        Ok(data)
    }

    /// The ids of all stored (and held) chunks: what a standby tells the primary it has.
    pub fn index(&self) -> Result<HashSet<ChunkId>, VolumeError> {
        let mut out: HashSet<ChunkId> = self
            .held
            .lock()
            .map(|h| h.keys().copied().collect())
            .unwrap_or_default();
        let chunks = self.root.join("chunks");
        for fan in fs::read_dir(&chunks).ctx("listing", &chunks)? {
            let fan = fan.ctx("listing", &chunks)?.path();
            if !fan.is_dir() {
                continue;
            }
            for item in fs::read_dir(&fan).ctx("listing", &fan)? {
                let item = item.ctx("listing", &fan)?;
                if let Some(id) = item.file_name().to_str().and_then(ChunkId::from_hex) {
                    out.insert(id);
                }
            }
        }
        Ok(out)
    }

    /// The chunks `manifest` needs that are not stored.
    pub fn missing(&self, manifest: &Manifest) -> Vec<ChunkId> {
        // One listing of the store rather than a `stat` per chunk: between syncs the store is
        // empty, and a manifest can name hundreds of thousands of chunks (a `stat` of each was a
        // seventh of a standby's time on an incremental sync of 100,000 files).
        let stored = self.index().ok();
        let has = |id: &ChunkId| match &stored {
            Some(set) => set.contains(id),
            None => self.contains(id),
        };
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for entry in &manifest.entries {
            if let EntryKind::File { chunks, .. } = &entry.kind {
                for c in chunks {
                    if seen.insert(c.id) && !has(&c.id) {
                        out.push(c.id);
                    }
                }
            }
        }
        out
    }

    /// Removes every chunk not in `keep` (typically the chunk ids of the live tree after a
    /// successful apply) and returns how many were removed.
    pub fn retain(&self, keep: &HashSet<ChunkId>) -> Result<u64, VolumeError> {
        let mut removed = 0;
        if let Ok(mut held) = self.held.lock() {
            let before = held.len();
            held.retain(|id, _| keep.contains(id));
            removed += (before - held.len()) as u64;
        }
        let mut fans = HashSet::new();
        for id in self.index()? {
            if !keep.contains(&id) {
                let path = self.path_of(&id);
                fs::remove_file(&path).ctx("removing", &path)?;
                removed += 1;
                if let Some(fan) = path.parent() {
                    fans.insert(fan.to_owned());
                }
            }
        }
        // Emptied fan-out folders go too: listing the store (every sync does, several times)
        // reads each folder, and 256 empty ones read cold cost more than the rest of a small sync's
        // bookkeeping. One still holding a chunk stays (`remove_dir` refuses it).
        for fan in fans {
            match fs::remove_dir(&fan) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {}
                Err(e) => return Err(VolumeError::io("removing", fan, e)),
            }
        }
        Ok(removed)
    }

    /// Makes the store's directory entries durable (one `syncfs`), for callers that acknowledge
    /// a batch of chunks to the sender.
    pub fn sync(&self) -> Result<(), VolumeError> {
        let dir = File::open(&self.root).ctx("opening", &self.root)?;
        rustix::fs::syncfs(&dir).ctx("syncing", &self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_checks_the_hash_and_get_detects_rot() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let id = ChunkId::of(b"hello");
        assert!(matches!(
            store.put(&id, b"hellO"),
            Err(VolumeError::ChunkMismatch { .. })
        ));
        assert!(!store.contains(&id));
        assert!(store.put(&id, b"hello").unwrap());
        assert!(!store.put(&id, b"hello").unwrap());
        assert_eq!(store.get(&id).unwrap(), b"hello");
        assert_eq!(store.index().unwrap(), HashSet::from([id]));
        fs::write(store.path_of(&id), b"jello").unwrap();
        assert!(matches!(
            store.get(&id),
            Err(VolumeError::ChunkMismatch { .. })
        ));
        assert!(
            !store.contains(&id),
            "a rotten chunk must be moved out of the way"
        );
        assert!(matches!(
            store.get(&id),
            Err(VolumeError::MissingChunks { .. })
        ));
    }

    #[test]
    fn held_chunks_count_as_stored_but_are_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open_with(dir.path(), Durability::Batch).unwrap();
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        store.hold(VerifiedChunk::new(a, b"a".to_vec()).unwrap());
        store.put(&b, b"b").unwrap();
        assert!(store.contains(&a) && store.contains(&b));
        assert_eq!(store.get(&a).unwrap(), b"a");
        assert_eq!(store.index().unwrap(), HashSet::from([a, b]));
        let m = Manifest {
            chunking: crate::manifest::ChunkParams::default(),
            entries: vec![crate::manifest::test_support::file_of(
                "f",
                &[(a, 1), (b, 1), (ChunkId::of(b"c"), 1)],
            )],
        };
        assert_eq!(store.missing(&m), vec![ChunkId::of(b"c")]);
        assert!(!store.path_of(&a).exists(), "a held chunk is not written");
        assert_eq!(store.held_bytes(), 1);
        // Another store on the same folder (a later connection) does not have it.
        let other = ChunkStore::open_with(dir.path(), Durability::Batch).unwrap();
        assert!(!other.contains(&a) && other.contains(&b));
        // Spilled, it is written like any stored chunk.
        store.spill().unwrap();
        assert_eq!(store.held_bytes(), 0);
        assert!(store.path_of(&a).is_file() && store.contains(&a));
        assert!(other.contains(&a));
        assert_eq!(store.retain(&HashSet::new()).unwrap(), 2);
        assert!(!store.contains(&a) && !store.contains(&b));
    }

    #[test]
    fn batch_mode_stores_the_same_and_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open_with(dir.path(), Durability::Batch).unwrap();
        let id = ChunkId::of(b"x");
        assert!(matches!(
            store.put(&id, b"y"),
            Err(VolumeError::ChunkMismatch { .. })
        ));
        assert!(store.put(&id, b"x").unwrap());
        store.sync().unwrap();
        assert_eq!(store.get(&id).unwrap(), b"x");
    }

    #[test]
    fn open_clears_temporaries_and_retain_drops_unreferenced() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        fs::write(dir.path().join("tmp/half-written"), b"x").unwrap();
        let a = ChunkId::of(b"a");
        let b = ChunkId::of(b"b");
        store.put(&a, b"a").unwrap();
        store.put(&b, b"b").unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.retain(&HashSet::from([a])).unwrap(), 1);
        assert!(store.contains(&a) && !store.contains(&b));
        // The emptied fan-out folder is gone, the one still in use stays.
        assert!(!store.path_of(&b).parent().unwrap().exists());
        assert!(store.path_of(&a).parent().unwrap().exists());
        assert_eq!(store.retain(&HashSet::new()).unwrap(), 1);
        assert_eq!(fs::read_dir(dir.path().join("chunks")).unwrap().count(), 0);
        assert!(store.put(&b, b"b").unwrap(), "a chunk can be stored again");
    }
}
