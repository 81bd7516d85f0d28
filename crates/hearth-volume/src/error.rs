//! The typed error of this crate, with a verdict on whether retrying the same operation can help.

use std::io;
use std::path::PathBuf;

use crate::manifest::ChunkId;

/// Everything that can go wrong while capturing, storing or applying a tree.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A filesystem call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done, as a verb phrase ("reading", "creating directory").
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Some files kept changing while they were read, even after the configured retries, so no
    /// consistent view of them could be captured.
    #[error("{} file(s) kept changing while being read, first: {}", paths.len(), paths.first().map(|p| p.display().to_string()).unwrap_or_default())]
    Unstable {
        /// The paths (relative to the captured root) that never held still.
        paths: Vec<PathBuf>,
    },
    /// The tree holds a kind of file that cannot be replicated (a socket, or a device node when
    /// devices are refused).
    #[error("cannot replicate {}: {what}", path.display())]
    Unsupported {
        /// The offending path.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// A manifest failed to decode or broke one of the format's rules; it is never applied.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// Bytes offered as a chunk do not hash to the chunk's id; they are not stored.
    #[error("chunk {expected} does not match its content (hashes to {actual})")]
    ChunkMismatch {
        /// The id the bytes were offered under.
        expected: ChunkId,
        /// What they really hash to.
        actual: ChunkId,
    },
    /// Applying needs chunks that the store does not hold.
    #[error("{} chunk(s) missing from the store, first {}", ids.len(), ids.first().map(|i| i.to_string()).unwrap_or_default())]
    MissingChunks {
        /// The missing ids.
        ids: Vec<ChunkId>,
    },
    /// A source file no longer holds the bytes the manifest says it does: it changed after the
    /// capture, which must be taken again.
    #[error("{} changed since it was captured", path.display())]
    SourceChanged {
        /// The path relative to the captured root.
        path: PathBuf,
    },
    /// A btrfs operation failed (the `btrfs` backend).
    #[error(transparent)]
    Btrfs(#[from] crate::btrfs::BtrfsError),
    /// The live path cannot be used as a target (for example its parent does not exist).
    #[error("cannot use {} as a volume: {reason}", path.display())]
    BadTarget {
        /// The live path.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
}

impl VolumeError {
    /// Whether running the same operation again may succeed without anyone changing anything.
    ///
    /// Changing sources and missing chunks are normal in a live system and cured by a new capture
    /// or transfer; input that breaks the rules, and most IO failures such as permissions, are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            VolumeError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::StorageFull
                    | io::ErrorKind::ResourceBusy
                    | io::ErrorKind::NotFound
            ),
            VolumeError::Unstable { .. }
            | VolumeError::MissingChunks { .. }
            | VolumeError::SourceChanged { .. }
            | VolumeError::ChunkMismatch { .. } => true,
            VolumeError::Btrfs(e) => e.is_retryable(),
            VolumeError::Unsupported { .. }
            | VolumeError::InvalidManifest(_)
            | VolumeError::BadTarget { .. } => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        VolumeError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand used throughout the crate.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T, VolumeError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T, VolumeError> {
        self.map_err(|e| VolumeError::io(op, path, e))
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T, VolumeError> {
        self.map_err(|e| VolumeError::io(op, path, e.into()))
    }
}
