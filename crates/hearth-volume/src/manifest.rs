//! The manifest: a canonical, versioned description of one directory tree (paths, kinds,
//! metadata, extended attributes, hard links and the chunks of every file), its binary encoding
//! and the tree hash that lets two sides compare whole trees by one value.
//!
//! The format is specified in `docs/formats/volume-tree.md`. The body is encoded with `postcard`,
//! whose wire format is stable and documented, instead of a hand-written encoder.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::envelope::{self, EnvelopeError};
use crate::error::VolumeError;

/// The version written into every manifest; decoders refuse other versions.
pub const FORMAT_VERSION: u16 = 1;

/// The first eight bytes of an encoded manifest.
const MAGIC: &[u8; 8] = b"HRTHTREE";

/// The BLAKE3 hash of a chunk's bytes, which is also its name in the chunk store.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

/// All 32 bytes go to the hasher in one write (the derived hash adds a length prefix). Not fewer:
/// ids come from the primary's manifest and need not be real BLAKE3 output, so ids that share a
/// prefix could be made to collide under any key, and a keyed hash of the whole id is what keeps
/// a crafted manifest from making the standby's sets quadratic.
impl std::hash::Hash for ChunkId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(&self.0);
    }
}

impl ChunkId {
    /// The id of these bytes.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s)
            .ok()
            .map(|h| ChunkId(*h.as_bytes()))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

/// The BLAKE3 hash of a manifest's canonical body: equal trees have equal tree hashes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TreeHash(pub [u8; 32]);

impl fmt::Display for TreeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&blake3::Hash::from_bytes(self.0).to_hex())
    }
}

impl TreeHash {
    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s)
            .ok()
            .map(|h| TreeHash(*h.as_bytes()))
    }
}

impl fmt::Debug for TreeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TreeHash({self})")
    }
}

/// The FastCDC (2020) parameters a tree was cut with. They are part of the manifest (and so of
/// the tree hash) because the same bytes cut differently give different chunk lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    /// Smallest chunk in bytes (except a file's or data region's last one).
    pub min: u32,
    /// Target average chunk size in bytes.
    pub avg: u32,
    /// Largest chunk in bytes.
    pub max: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
        }
    }
}

/// One chunk of a regular file: `len` bytes at `offset` whose BLAKE3 hash is `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes, never zero.
    pub len: u32,
    /// The chunk's content hash.
    pub id: ChunkId,
}

/// One extended attribute, name and value as raw bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Xattr {
    /// Full name including its namespace, such as `user.comment`.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// Raw value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file of `size` bytes. Bytes not covered by a chunk are a hole (read as zeros
    /// and left unallocated when the tree is applied).
    File {
        /// Length in bytes.
        size: u64,
        /// Chunks in increasing, non-overlapping offset order.
        chunks: Vec<ChunkRef>,
    },
    /// A symbolic link; the target is stored as raw bytes and never followed.
    Symlink {
        /// The link's target.
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// Another name for the regular file at `target` (an earlier path in the same manifest).
    HardLink {
        /// Path of the `File` entry this one links to.
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// A named pipe.
    Fifo,
    /// A character device with its raw device number.
    CharDevice {
        /// `st_rdev`.
        rdev: u64,
    },
    /// A block device with its raw device number.
    BlockDevice {
        /// `st_rdev`.
        rdev: u64,
    },
}

/// One path in the tree with its metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the tree's root, components joined by `/`, raw bytes. The root itself
    /// is the empty path.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits including set-uid, set-gid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, whole seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds part.
    pub mtime_nsec: u32,
    /// Extended attributes sorted by name.
    pub xattrs: Vec<Xattr>,
}

/// A whole tree: every entry sorted by path bytes, the root (empty path) first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// How file contents were cut into chunks.
    pub chunking: ChunkParams,
    /// The entries, sorted by `path` as raw bytes, without duplicates.
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// The entry at `path`, found by binary search: entries are sorted by path (which
    /// [`Manifest::validate`] checks before it relies on this).
    pub fn entry(&self, path: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.as_slice().cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Encodes the manifest: magic, version, postcard body, BLAKE3 of the body.
    pub fn encode(&self) -> Result<Vec<u8>, VolumeError> {
        Ok(envelope::seal(MAGIC, FORMAT_VERSION, &self.body()?))
    }

    /// Decodes and validates an encoded manifest. Anything that breaks the format's rules is an
    /// error, so a decoded manifest is safe to apply.
    pub fn decode(bytes: &[u8]) -> Result<Self, VolumeError> {
        Self::decode_hashed(bytes).map(|(m, _)| m)
    }

    /// [`Manifest::decode`], with the tree hash: the envelope's trailer is the BLAKE3 of the
    /// body, which decoding checks, so the hash costs nothing more.
    pub fn decode_hashed(bytes: &[u8]) -> Result<(Self, TreeHash), VolumeError> {
        let bad = |m: &str| VolumeError::InvalidManifest(m.to_owned());
        let body = envelope::open(MAGIC, FORMAT_VERSION, bytes).map_err(|e| match e {
            EnvelopeError::TooShort => bad("too short"),
            EnvelopeError::WrongMagic => bad("wrong magic bytes"),
            EnvelopeError::Version(v) => VolumeError::InvalidManifest(format!(
                "unsupported version {v}, this build reads {FORMAT_VERSION}"
            )),
            EnvelopeError::Checksum => bad("checksum does not match the body"),
        })?;
        let manifest: Manifest = postcard::from_bytes(body)
            .map_err(|e| VolumeError::InvalidManifest(format!("cannot decode body: {e}")))?;
        // A canonical body re-encodes to the same bytes; anything else (trailing bytes,
        // non-minimal integers) would let two encodings of one tree hash differently.
        if manifest.body()? != body {
            return Err(bad("body is not in canonical form"));
        }
        manifest.validate()?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[bytes.len() - 32..]);
        Ok((manifest, TreeHash(hash)))
    }

    fn body(&self) -> Result<Vec<u8>, VolumeError> {
        postcard::to_stdvec(self)
            .map_err(|e| VolumeError::InvalidManifest(format!("cannot encode: {e}")))
    }

    /// The tree hash: BLAKE3 of the encoded body. Two trees with equal hashes have equal
    /// contents and metadata (as far as the manifest records them).
    pub fn tree_hash(&self) -> Result<TreeHash, VolumeError> {
        Ok(TreeHash(*blake3::hash(&self.body()?).as_bytes()))
    }

    /// [`Manifest::encode`] and [`Manifest::tree_hash`] at the cost of one encoding.
    pub fn encode_and_hash(&self) -> Result<(Vec<u8>, TreeHash), VolumeError> {
        let body = self.body()?;
        let hash = TreeHash(*blake3::hash(&body).as_bytes());
        Ok((envelope::seal(MAGIC, FORMAT_VERSION, &body), hash))
    }

    /// Every chunk id the tree references: the "have" index of a standby holding this tree.
    pub fn chunk_ids(&self) -> HashSet<ChunkId> {
        self.entries
            .iter()
            .flat_map(|e| match &e.kind {
                EntryKind::File { chunks, .. } => chunks.as_slice(),
                _ => &[],
            })
            .map(|c| c.id)
            .collect()
    }

    /// Total logical size of the regular files (hard links counted once).
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e.kind {
                EntryKind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    /// Checks the format's rules: sorted unique paths, the root first, only plain relative
    /// components, every parent an earlier directory, hard links to earlier files, chunks in
    /// order inside their file, xattrs sorted. These rules are what keeps `apply` inside the
    /// target directory, so they are checked on every manifest before it is used.
    pub fn validate(&self) -> Result<(), VolumeError> {
        let bad = |m: String| Err(VolumeError::InvalidManifest(m));
        let c = &self.chunking;
        if !(c.min > 0 && c.min <= c.avg && c.avg <= c.max) {
            return bad(format!("chunk sizes {c:?} are not ordered"));
        }
        let Some(root) = self.entries.first() else {
            return bad("no root entry".into());
        };
        if !root.path.is_empty() || root.kind != EntryKind::Dir {
            return bad("the first entry must be the root directory with an empty path".into());
        }
        // Parents and hard-link targets are looked up by binary search in the sorted entries
        // (checked first) rather than in hash sets of every path, which made up a third of the
        // time a standby spent decoding a manifest of 100,000 files. Most entries share their
        // parent with the entry before, so the last parent found is remembered.
        let kind_at = |path: &[u8]| self.entry(path).map(|e| &e.kind);
        let mut last_dir: &[u8] = b"";
        let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
        for pair in self.entries.windows(2) {
            if pair[0].path >= pair[1].path {
                return bad(format!(
                    "paths not strictly sorted at {}",
                    show(&pair[1].path)
                ));
            }
        }
        for entry in &self.entries {
            if entry.mode & !0o7777 != 0 {
                return bad(format!(
                    "mode of {} has bits beyond 0o7777",
                    show(&entry.path)
                ));
            }
            if entry.mtime_nsec >= 1_000_000_000 {
                return bad(format!("nanoseconds out of range at {}", show(&entry.path)));
            }
            for pair in entry.xattrs.windows(2) {
                if pair[0].name >= pair[1].name {
                    return bad(format!("xattrs of {} not sorted", show(&entry.path)));
                }
            }
            if entry
                .xattrs
                .iter()
                .any(|x| x.name.is_empty() || x.name.contains(&0))
            {
                return bad(format!("bad xattr name at {}", show(&entry.path)));
            }
            if entry.path.is_empty() {
                continue;
            }
            if !entry.path.split(|b| *b == b'/').all(is_plain_component) {
                return bad(format!(
                    "path {:?} is not a plain relative path",
                    show(&entry.path)
                ));
            }
            let parent = match entry.path.iter().rposition(|b| *b == b'/') {
                Some(i) => &entry.path[..i],
                None => b"",
            };
            if parent != last_dir {
                if kind_at(parent) != Some(&EntryKind::Dir) {
                    return bad(format!(
                        "parent of {} is not a directory",
                        show(&entry.path)
                    ));
                }
                last_dir = parent;
            }
            match &entry.kind {
                EntryKind::Dir => {}
                EntryKind::File { size, chunks } => {
                    let mut end = 0u64;
                    for chunk in chunks {
                        if chunk.len == 0 || chunk.offset < end {
                            return bad(format!("chunks of {} overlap", show(&entry.path)));
                        }
                        end = chunk.offset.saturating_add(u64::from(chunk.len));
                    }
                    if end > *size {
                        return bad(format!("chunks of {} run past its size", show(&entry.path)));
                    }
                }
                EntryKind::HardLink { target } => {
                    // An earlier path: entries are sorted, so a smaller one.
                    if target.as_slice() >= entry.path.as_slice()
                        || !matches!(kind_at(target), Some(EntryKind::File { .. }))
                    {
                        return bad(format!(
                            "hard link {} does not point to an earlier file",
                            show(&entry.path)
                        ));
                    }
                }
                EntryKind::Symlink { target } => {
                    if target.is_empty() || target.contains(&0) {
                        return bad(format!("bad symlink target at {}", show(&entry.path)));
                    }
                }
                EntryKind::Fifo | EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => {}
            }
        }
        Ok(())
    }
}

/// Whether the volume path `path` is `top` or beneath it (`a/b` is under `a`, `ab` is not).
pub(crate) fn is_under(path: &[u8], top: &[u8]) -> bool {
    path.starts_with(top) && (path.len() == top.len() || path[top.len()] == b'/')
}

/// A non-empty relative path of plain components: what every entry but the root must have.
pub(crate) fn is_plain_path(path: &[u8]) -> bool {
    !path.is_empty() && path.split(|b| *b == b'/').all(is_plain_component)
}

/// A path component that names an entry inside its directory: not empty, not `.` or `..`, and
/// without NUL (the `/` separator is excluded by splitting).
fn is_plain_component(c: &[u8]) -> bool {
    !c.is_empty() && c != b"." && c != b".." && !c.contains(&0)
}

/// Entries for the unit tests of this crate.
#[cfg(test)]
pub(crate) mod test_support {
    use super::{ChunkId, ChunkRef, Entry, EntryKind};

    /// A regular file at `path` made of `chunks` (id and length), one after another.
    pub(crate) fn file_of(path: &str, chunks: &[(ChunkId, u32)]) -> Entry {
        let mut offset = 0;
        let chunks: Vec<ChunkRef> = chunks
            .iter()
            .map(|&(id, len)| {
                let c = ChunkRef { offset, len, id };
                offset += u64::from(len);
                c
            })
            .collect();
        Entry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File {
                size: offset,
                chunks,
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &[u8], kind: EntryKind) -> Entry {
        Entry {
            path: path.to_vec(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_sec: 1,
            mtime_nsec: 2,
            xattrs: vec![],
        }
    }

    fn file(path: &[u8]) -> Entry {
        entry(
            path,
            EntryKind::File {
                size: 10,
                chunks: vec![ChunkRef {
                    offset: 2,
                    len: 8,
                    id: ChunkId::of(b"12345678"),
                }],
            },
        )
    }

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            chunking: ChunkParams::default(),
            entries,
        }
    }

    #[test]
    fn round_trip_keeps_everything_and_the_hash() {
        let m = manifest(vec![
            entry(b"", EntryKind::Dir),
            entry(b"d", EntryKind::Dir),
            file(b"d/a\nb\xff"),
            entry(
                b"d/l",
                EntryKind::HardLink {
                    target: b"d/a\nb\xff".to_vec(),
                },
            ),
            entry(
                b"s",
                EntryKind::Symlink {
                    target: b"../x".to_vec(),
                },
            ),
        ]);
        let bytes = m.encode().unwrap();
        let back = Manifest::decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.tree_hash().unwrap(), m.tree_hash().unwrap());
        // The envelope's trailer is the tree hash.
        let (hashed, hash) = Manifest::decode_hashed(&bytes).unwrap();
        assert_eq!((hashed, hash), (m.clone(), m.tree_hash().unwrap()));
        let mut other = m.clone();
        other.entries[2].mtime_nsec += 1;
        assert_ne!(other.tree_hash().unwrap(), m.tree_hash().unwrap());
    }

    /// Pins the wire format: the bytes below are quoted in docs/formats/volume-tree.md, and a
    /// change here is a format change that needs a new version.
    #[test]
    fn encoding_matches_the_documented_example() {
        let m = Manifest {
            chunking: ChunkParams {
                min: 16384,
                avg: 65536,
                max: 262144,
            },
            entries: vec![
                Entry {
                    path: vec![],
                    kind: EntryKind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    mtime_sec: 1_700_000_000,
                    mtime_nsec: 5,
                    xattrs: vec![],
                },
                Entry {
                    path: b"a".to_vec(),
                    kind: EntryKind::File {
                        size: 5,
                        chunks: vec![ChunkRef {
                            offset: 0,
                            len: 5,
                            id: ChunkId::of(b"hello"),
                        }],
                    },
                    mode: 0o644,
                    uid: 1000,
                    gid: 1000,
                    mtime_sec: 1_700_000_000,
                    mtime_nsec: 0,
                    xattrs: vec![Xattr {
                        name: b"user.k".to_vec(),
                        value: b"v".to_vec(),
                    }],
                },
                Entry {
                    path: b"l".to_vec(),
                    kind: EntryKind::Symlink {
                        target: b"a".to_vec(),
                    },
                    mode: 0o777,
                    uid: 0,
                    gid: 0,
                    mtime_sec: -1,
                    mtime_nsec: 0,
                    xattrs: vec![],
                },
            ],
        };
        let hex: String = m
            .encode()
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, EXAMPLE_HEX);
    }

    const EXAMPLE_HEX: &str = "48525448545245450100808001808004808010030000ed03000080c49fd50c050001610105010005ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200fa403e807e80780c49fd50c000106757365722e6b0176016c020161ff030000010000c14e75f52d64796b86d866931f83eac8bd4a66b5ec012947f81359c169dea9be";

    #[test]
    fn decode_rejects_damage() {
        let m = manifest(vec![entry(b"", EntryKind::Dir), file(b"f")]);
        let bytes = m.encode().unwrap();
        for i in [0, 9, 12, bytes.len() - 1] {
            let mut broken = bytes.clone();
            broken[i] ^= 1;
            assert!(Manifest::decode(&broken).is_err(), "flip at {i} accepted");
        }
        assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn validate_rejects_paths_that_escape_or_break_order() {
        let cases: Vec<(&str, Vec<Entry>)> = vec![
            ("no root", vec![file(b"f")]),
            ("dotdot", vec![entry(b"", EntryKind::Dir), file(b"..")]),
            (
                "dotdot inside",
                vec![
                    entry(b"", EntryKind::Dir),
                    entry(b"d", EntryKind::Dir),
                    file(b"d/../x"),
                ],
            ),
            ("absolute", vec![entry(b"", EntryKind::Dir), file(b"/etc")]),
            (
                "empty component",
                vec![
                    entry(b"", EntryKind::Dir),
                    entry(b"d", EntryKind::Dir),
                    file(b"d//x"),
                ],
            ),
            (
                "parent is a file",
                vec![entry(b"", EntryKind::Dir), file(b"f"), file(b"f/x")],
            ),
            (
                "parent is a symlink",
                vec![
                    entry(b"", EntryKind::Dir),
                    entry(
                        b"s",
                        EntryKind::Symlink {
                            target: b"/".to_vec(),
                        },
                    ),
                    file(b"s/x"),
                ],
            ),
            (
                "missing parent",
                vec![entry(b"", EntryKind::Dir), file(b"d/x")],
            ),
            (
                "unsorted",
                vec![entry(b"", EntryKind::Dir), file(b"b"), file(b"a")],
            ),
            (
                "duplicate",
                vec![entry(b"", EntryKind::Dir), file(b"a"), file(b"a")],
            ),
            (
                "link to nothing",
                vec![
                    entry(b"", EntryKind::Dir),
                    entry(
                        b"l",
                        EntryKind::HardLink {
                            target: b"z".to_vec(),
                        },
                    ),
                ],
            ),
            (
                "link to a dir",
                vec![
                    entry(b"", EntryKind::Dir),
                    entry(b"d", EntryKind::Dir),
                    entry(
                        b"l",
                        EntryKind::HardLink {
                            target: b"d".to_vec(),
                        },
                    ),
                ],
            ),
            ("nul", vec![entry(b"", EntryKind::Dir), file(b"a\0b")]),
        ];
        for (name, entries) in cases {
            assert!(
                matches!(
                    manifest(entries).validate(),
                    Err(VolumeError::InvalidManifest(_))
                ),
                "{name} accepted"
            );
        }
        let mut too_long = file(b"f");
        if let EntryKind::File { size, .. } = &mut too_long.kind {
            *size = 5;
        }
        assert!(
            manifest(vec![entry(b"", EntryKind::Dir), too_long])
                .validate()
                .is_err()
        );
    }
}
