//! The pure diff (which chunks a standby lacks, and where the primary can read each one) and
//! the primary-side read of one wanted chunk, checked against its id.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::error::{IoContext, VolumeError};
use crate::manifest::{ChunkId, EntryKind, Manifest};

/// One chunk the standby lacks and the first place in the primary's tree that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkWant {
    /// The chunk.
    pub id: ChunkId,
    /// Its length.
    pub len: u32,
    /// Relative path of a file containing it.
    pub path: Vec<u8>,
    /// Offset of the chunk in that file.
    pub offset: u64,
}

/// The outcome of [`missing_chunks`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransferPlan {
    /// Chunks to send, each once, in the order they first appear in the manifest (so a
    /// standby's store fills file by file, which keeps a resumed transfer's order stable).
    pub wants: Vec<ChunkWant>,
    /// Bytes to send.
    pub bytes: u64,
    /// Distinct chunks the new tree references.
    pub chunks_total: u64,
    /// Bytes of distinct chunks the new tree references.
    pub bytes_total: u64,
}

/// Which chunks of `new` are not in `have`. `have` is the standby's chunk index
/// ([`crate::ChunkStore::index`]) or, lacking one, [`Manifest::chunk_ids`] of its last tree.
pub fn missing_chunks(new: &Manifest, have: &HashSet<ChunkId>) -> TransferPlan {
    let mut seen = HashSet::new();
    let mut plan = TransferPlan::default();
    for entry in &new.entries {
        let EntryKind::File { chunks, .. } = &entry.kind else {
            continue;
        };
        for chunk in chunks {
            if !seen.insert(chunk.id) {
                continue;
            }
            plan.chunks_total += 1;
            plan.bytes_total += u64::from(chunk.len);
            if have.contains(&chunk.id) {
                continue;
            }
            plan.bytes += u64::from(chunk.len);
            plan.wants.push(ChunkWant {
                id: chunk.id,
                len: chunk.len,
                path: entry.path.clone(),
                offset: chunk.offset,
            });
        }
    }
    plan
}

/// Reads a wanted chunk from the captured tree at `root` and checks it still hashes to its id.
/// A mismatch means the file changed after the capture: [`VolumeError::SourceChanged`].
pub fn read_chunk(root: &Path, want: &ChunkWant) -> Result<Vec<u8>, VolumeError> {
    let rel = PathBuf::from(OsStr::from_bytes(&want.path));
    let abs = root.join(&rel);
    let fd = match rustix::fs::open(
        &abs,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP) => {
            return Err(VolumeError::SourceChanged { path: rel });
        }
        Err(e) => return Err(VolumeError::io("opening", abs, e.into())),
    };
    let file = File::from(fd);
    let mut data = vec![0u8; want.len as usize];
    match file.read_exact_at(&mut data, want.offset) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(VolumeError::SourceChanged { path: rel });
        }
        Err(e) => return Err(e).ctx("reading", &abs),
    }
    if ChunkId::of(&data) != want.id {
        return Err(VolumeError::SourceChanged { path: rel });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChunkParams, Entry};

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn file(path: &str, ids: &[u8]) -> Entry {
        let chunks: Vec<(ChunkId, u32)> = ids.iter().map(|n| (id(*n), 10)).collect();
        crate::manifest::test_support::file_of(path, &chunks)
    }

    fn tree(files: Vec<Entry>) -> Manifest {
        let mut entries = vec![Entry {
            path: vec![],
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            xattrs: vec![],
        }];
        entries.extend(files);
        Manifest {
            chunking: ChunkParams::default(),
            entries,
        }
    }

    #[test]
    fn data_driven_cases() {
        // (name, standby's tree, primary's tree, wanted ids in order, bytes)
        let cases: Vec<(&str, Manifest, Manifest, Vec<u8>, u64)> = vec![
            (
                "empty standby wants all, once each",
                tree(vec![]),
                tree(vec![file("a", &[1, 2, 1]), file("b", &[2, 3])]),
                vec![1, 2, 3],
                30,
            ),
            (
                "same tree wants nothing",
                tree(vec![file("a", &[1, 2])]),
                tree(vec![file("a", &[1, 2])]),
                vec![],
                0,
            ),
            (
                "moved file wants nothing",
                tree(vec![file("a", &[1, 2])]),
                tree(vec![file("z", &[1, 2])]),
                vec![],
                0,
            ),
            (
                "edit in the middle wants one",
                tree(vec![file("a", &[1, 2, 3])]),
                tree(vec![file("a", &[1, 9, 3])]),
                vec![9],
                10,
            ),
            (
                "deletions want nothing",
                tree(vec![file("a", &[1]), file("b", &[2])]),
                tree(vec![file("a", &[1])]),
                vec![],
                0,
            ),
        ];
        for (name, old, new, want, bytes) in cases {
            let plan = missing_chunks(&new, &old.chunk_ids());
            let got: Vec<ChunkId> = plan.wants.iter().map(|w| w.id).collect();
            let want: Vec<ChunkId> = want.into_iter().map(id).collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(plan.bytes, bytes, "{name}");
        }
    }

    #[test]
    fn wants_point_at_the_first_holder() {
        let new = tree(vec![file("a", &[5, 6]), file("b", &[6, 7])]);
        let plan = missing_chunks(&new, &HashSet::new());
        assert_eq!(plan.wants[1].path, b"a".to_vec());
        assert_eq!(plan.wants[1].offset, 10);
        assert_eq!(plan.wants[2].path, b"b".to_vec());
        assert_eq!(plan.chunks_total, 3);
        assert_eq!(plan.bytes_total, 30);
    }
}
