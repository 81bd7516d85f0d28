//! Manifest deltas: what turns one manifest into another, so that a primary offering a standby a
//! tree that descends from the standby's live one sends the entries that changed instead of the
//! whole manifest (14 MB for 100,000 files, on every pass, however small the change).
//!
//! The standby rebuilds the whole manifest from its live one and the delta, and accepts it only
//! when the result has the offered tree hash: a delta is a way of sending a manifest, never a
//! second source of truth. The format is in `docs/formats/volume-tree.md` ("Manifest deltas").

use serde::{Deserialize, Serialize};

use crate::envelope::{self, EnvelopeError};
use crate::error::VolumeError;
use crate::manifest::{ChunkParams, Entry, Manifest};

/// The version written into every delta; decoders refuse other versions.
pub const DELTA_VERSION: u16 = 1;

/// The first eight bytes of an encoded delta.
const MAGIC: &[u8; 8] = b"HRTHDELT";

/// One change at one path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The entry at this path is gone (only the entry: what was under a removed directory is
    /// removed by changes of its own).
    Remove(#[serde(with = "serde_bytes")] Vec<u8>),
    /// This entry is new, or replaces the one at its path.
    Put(Entry),
}

impl Change {
    fn path(&self) -> &[u8] {
        match self {
            Change::Remove(p) => p,
            Change::Put(e) => &e.path,
        }
    }
}

/// The changes from a base manifest to a new one, sorted by path, at most one per path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDelta {
    /// The new manifest's chunk parameters.
    pub chunking: ChunkParams,
    /// The changes.
    pub changes: Vec<Change>,
}

impl ManifestDelta {
    /// The delta from `base` to `new`: one merge of the two sorted entry lists.
    pub fn between(base: &Manifest, new: &Manifest) -> Self {
        let mut changes = Vec::new();
        let mut olds = base.entries.iter().peekable();
        for n in &new.entries {
            while let Some(o) = olds.next_if(|o| o.path < n.path) {
                changes.push(Change::Remove(o.path.clone()));
            }
            match olds.next_if(|o| o.path == n.path) {
                Some(o) if o == n => {}
                _ => changes.push(Change::Put(n.clone())),
            }
        }
        changes.extend(olds.map(|o| Change::Remove(o.path.clone())));
        ManifestDelta {
            chunking: new.chunking,
            changes,
        }
    }

    /// The manifest this delta makes of `base`. Fails when the changes are not sorted, name a
    /// path twice, or remove a path `base` does not have; the result is validated like any
    /// decoded manifest.
    pub fn apply(&self, base: &Manifest) -> Result<Manifest, VolumeError> {
        let bad = |m: String| VolumeError::InvalidManifest(format!("delta: {m}"));
        for pair in self.changes.windows(2) {
            if pair[0].path() >= pair[1].path() {
                return Err(bad(format!(
                    "changes not strictly sorted at {}",
                    String::from_utf8_lossy(pair[1].path())
                )));
            }
        }
        let mut entries = Vec::with_capacity(base.entries.len() + self.changes.len());
        let mut olds = base.entries.iter().peekable();
        for change in &self.changes {
            let path = change.path();
            while let Some(o) = olds.next_if(|o| o.path.as_slice() < path) {
                entries.push(o.clone());
            }
            let replaced = olds.next_if(|o| o.path.as_slice() == path);
            match change {
                Change::Remove(_) if replaced.is_none() => {
                    return Err(bad(format!(
                        "removes {}, which the base tree does not have",
                        String::from_utf8_lossy(path)
                    )));
                }
                Change::Remove(_) => {}
                Change::Put(e) => entries.push(e.clone()),
            }
        }
        entries.extend(olds.cloned());
        let m = Manifest {
            chunking: self.chunking,
            entries,
        };
        m.validate()?;
        Ok(m)
    }

    /// Encodes the delta: magic, version, postcard body, BLAKE3 of the body.
    pub fn encode(&self) -> Result<Vec<u8>, VolumeError> {
        let body = postcard::to_stdvec(self)
            .map_err(|e| VolumeError::InvalidManifest(format!("cannot encode a delta: {e}")))?;
        Ok(envelope::seal(MAGIC, DELTA_VERSION, &body))
    }

    /// Decodes an encoded delta (its entries are checked when it is applied).
    pub fn decode(bytes: &[u8]) -> Result<Self, VolumeError> {
        let bad = |m: String| VolumeError::InvalidManifest(format!("delta: {m}"));
        let body = envelope::open(MAGIC, DELTA_VERSION, bytes).map_err(|e| match e {
            EnvelopeError::TooShort => bad("too short".into()),
            EnvelopeError::WrongMagic => bad("wrong magic bytes".into()),
            EnvelopeError::Version(v) => bad(format!(
                "unsupported version {v}, this build reads {DELTA_VERSION}"
            )),
            EnvelopeError::Checksum => bad("checksum does not match the body".into()),
        })?;
        let (delta, rest) = postcard::take_from_bytes::<ManifestDelta>(body)
            .map_err(|e| bad(format!("cannot decode body: {e}")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the body".into()));
        }
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChunkId, ChunkRef, EntryKind};

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime_sec: 3,
            mtime_nsec: 4,
            xattrs: vec![],
        }
    }

    fn file(path: &str, content: &[u8]) -> Entry {
        entry(
            path,
            EntryKind::File {
                size: content.len() as u64,
                chunks: vec![ChunkRef {
                    offset: 0,
                    len: content.len() as u32,
                    id: ChunkId::of(content),
                }],
            },
        )
    }

    fn manifest(entries: Vec<Entry>) -> Manifest {
        let mut entries = entries;
        entries.insert(0, entry("", EntryKind::Dir));
        let m = Manifest {
            chunking: ChunkParams::default(),
            entries,
        };
        m.validate().unwrap();
        m
    }

    #[test]
    fn a_delta_rebuilds_the_new_manifest_exactly() {
        let base = manifest(vec![
            entry("a", EntryKind::Dir),
            file("a/x", b"1"),
            file("a/y", b"2"),
            entry("b", EntryKind::Dir),
            file("b/z", b"3"),
            file("c", b"4"),
        ]);
        let mut touched = file("a/y", b"2");
        touched.mtime_sec = 9;
        let cases: Vec<(&str, Manifest, usize)> = vec![
            ("nothing changed", base.clone(), 0),
            (
                "content, metadata, a new file and a removed folder",
                manifest(vec![
                    entry("a", EntryKind::Dir),
                    file("a/x", b"changed"),
                    touched,
                    file("a/z", b"new"),
                    file("c", b"4"),
                ]),
                // a/x, a/y, a/z put; b and b/z removed.
                5,
            ),
            (
                "a file becomes a folder",
                manifest(vec![
                    entry("a", EntryKind::Dir),
                    file("a/x", b"1"),
                    file("a/y", b"2"),
                    entry("b", EntryKind::Dir),
                    file("b/z", b"3"),
                    entry("c", EntryKind::Dir),
                    file("c/d", b"5"),
                ]),
                2,
            ),
            ("everything removed", manifest(vec![]), 6),
        ];
        for (name, new, changes) in cases {
            let delta = ManifestDelta::between(&base, &new);
            assert_eq!(delta.changes.len(), changes, "{name}");
            let back = ManifestDelta::decode(&delta.encode().unwrap()).unwrap();
            assert_eq!(back, delta, "{name}");
            let rebuilt = back.apply(&base).unwrap();
            assert_eq!(rebuilt, new, "{name}");
            assert_eq!(rebuilt.tree_hash().unwrap(), new.tree_hash().unwrap());
        }
    }

    #[test]
    fn a_delta_that_does_not_fit_its_base_is_refused() {
        let base = manifest(vec![file("a", b"1"), file("b", b"2")]);
        let unsorted = ManifestDelta {
            chunking: ChunkParams::default(),
            changes: vec![Change::Put(file("b", b"3")), Change::Put(file("a", b"3"))],
        };
        let twice = ManifestDelta {
            chunking: ChunkParams::default(),
            changes: vec![Change::Remove(b"a".to_vec()), Change::Put(file("a", b"3"))],
        };
        let absent = ManifestDelta {
            chunking: ChunkParams::default(),
            changes: vec![Change::Remove(b"zz".to_vec())],
        };
        let orphan = ManifestDelta {
            chunking: ChunkParams::default(),
            changes: vec![Change::Put(file("d/x", b"3"))],
        };
        let escape = ManifestDelta {
            chunking: ChunkParams::default(),
            changes: vec![Change::Put(file("../x", b"3"))],
        };
        for (name, delta, says) in [
            ("unsorted", unsorted, "not strictly sorted"),
            ("a path twice", twice, "not strictly sorted"),
            ("removes what is not there", absent, "does not have"),
            ("a file without its folder", orphan, "not a directory"),
            (
                "a path outside the tree",
                escape,
                "not a plain relative path",
            ),
        ] {
            let err = delta.apply(&base).unwrap_err().to_string();
            assert!(err.contains(says), "{name}: {err}");
        }
        let mut bytes = ManifestDelta::between(&base, &base).encode().unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(ManifestDelta::decode(&bytes).is_err());
        assert!(ManifestDelta::decode(&base.encode().unwrap()).is_err());
    }
}
