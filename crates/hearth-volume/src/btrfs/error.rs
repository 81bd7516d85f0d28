//! The typed error of the btrfs backend, with a verdict on whether retrying the same operation can help.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Everything that can go wrong in the btrfs backend's local work.
#[derive(Debug, thiserror::Error)]
pub enum BtrfsError {
    /// The `btrfs` program could not be started at all (not installed, not executable).
    #[error(
        "cannot run the btrfs tool ({program}): {source}; install btrfs-progs (scripts/install-deps)"
    )]
    ToolMissing {
        /// The program that was looked for.
        program: String,
        /// Why starting it failed.
        #[source]
        source: io::Error,
    },
    /// `btrfs …` ran and failed (non-zero exit or killed by a signal); `stderr` is what it said.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for the message.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// The tool's output did not have the expected shape (a different btrfs-progs version, or a bug).
    #[error("unexpected output from `{command}`: {reason}")]
    Parse {
        /// The command line.
        command: String,
        /// What was wrong.
        reason: String,
    },
    /// A filesystem call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done, as a verb phrase.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The path is not on a btrfs filesystem.
    #[error("{} is not on a btrfs filesystem", path.display())]
    NotBtrfs {
        /// The path.
        path: PathBuf,
    },
    /// The path is not a btrfs subvolume (the btrfs backend replicates subvolumes only).
    #[error(
        "{} is not a btrfs subvolume; make it one (`btrfs subvolume create`, then move the data in) or use the files backend",
        path.display()
    )]
    NotASubvolume {
        /// The path.
        path: PathBuf,
    },
    /// The volume has subvolumes inside it. btrfs snapshots stop at subvolume boundaries, so their contents
    /// would arrive on the standby as empty folders; hearth refuses instead.
    #[error(
        "volume {} contains nested subvolume(s) {}: btrfs snapshots do not include them (they would arrive as empty folders); replicate each as its own volume, or turn it into a plain folder",
        volume.display(),
        nested.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NestedSubvolumes {
        /// The volume.
        volume: PathBuf,
        /// The nested subvolumes' paths.
        nested: Vec<PathBuf>,
    },
    /// A subvolume that must be read-only (a snapshot to send, a parent) is writable.
    #[error("{} is not read-only, so it cannot be sent or used as a parent", path.display())]
    NotReadOnly {
        /// The path.
        path: PathBuf,
    },
    /// A send stream ended without its end command: it was cut short, so it is not applied.
    #[error("the send stream {reason}")]
    BadStream {
        /// What was wrong with it.
        reason: String,
    },
    /// Reading the stream (from the network, usually) failed during a receive.
    #[error("reading the send stream failed: {source}")]
    StreamRead {
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `btrfs receive` finished, but what it left is not a complete received snapshot.
    #[error("receive into {} did not leave a complete snapshot: {reason}", path.display())]
    IncompleteReceive {
        /// The staging directory or the partial subvolume.
        path: PathBuf,
        /// Why it is not complete.
        reason: String,
    },
    /// A target path already exists where hearth needs to create something.
    #[error("{} already exists", path.display())]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// The live path exists but is not a subvolume, so it cannot be switched atomically and kept aside
    /// read-only; hearth does not touch it.
    #[error(
        "the live path {} is a plain directory, not a btrfs subvolume; move it away (or turn it into a subvolume) before the first btrfs sync",
        path.display()
    )]
    LiveNotSubvolume {
        /// The live path.
        path: PathBuf,
    },
    /// A name or path given by the caller cannot be used (a snapshot name with a slash, a live path
    /// without a parent folder).
    #[error("cannot use {name:?}: {reason}")]
    InvalidName {
        /// The name or path.
        name: String,
        /// Why not.
        reason: &'static str,
    },
    /// The JSON state file next to the live path cannot be read.
    #[error("state file {} is damaged: {reason}", path.display())]
    BadState {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl BtrfsError {
    /// Whether running the same operation again may succeed without anyone changing anything.
    ///
    /// A failed command is retryable when it was killed by a signal or says the resource was busy or
    /// interrupted; a stream that was cut short or failed to read can be sent again; a wrong volume layout,
    /// a missing tool or an unexpected output shape need a person.
    pub fn is_retryable(&self) -> bool {
        match self {
            BtrfsError::Command { status, stderr, .. } => {
                let stderr = stderr.to_ascii_lowercase();
                status.code().is_none()
                    || ["busy", "try again", "interrupted", "timed out"]
                        .iter()
                        .any(|w| stderr.contains(w))
            }
            BtrfsError::Io { source, .. } | BtrfsError::StreamRead { source } => {
                io_retryable(source)
            }
            BtrfsError::BadStream { .. } | BtrfsError::IncompleteReceive { .. } => true,
            BtrfsError::ToolMissing { .. }
            | BtrfsError::Parse { .. }
            | BtrfsError::NotBtrfs { .. }
            | BtrfsError::NotASubvolume { .. }
            | BtrfsError::NestedSubvolumes { .. }
            | BtrfsError::NotReadOnly { .. }
            | BtrfsError::Exists { .. }
            | BtrfsError::LiveNotSubvolume { .. }
            | BtrfsError::InvalidName { .. }
            | BtrfsError::BadState { .. } => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> BtrfsError {
        BtrfsError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

fn io_retryable(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        Interrupted
            | WouldBlock
            | TimedOut
            | ConnectionReset
            | ConnectionAborted
            | BrokenPipe
            | UnexpectedEof
            | ResourceBusy
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn retry_verdicts() {
        let failed = |raw: i32, stderr: &str| BtrfsError::Command {
            command: "btrfs x".into(),
            status: ExitStatus::from_raw(raw),
            stderr: stderr.into(),
        };
        // Exit code 1 (raw status 256) with a permanent reason, with a busy device, and a kill by signal 9.
        assert!(!failed(256, "ERROR: not a btrfs filesystem").is_retryable());
        assert!(failed(256, "ERROR: Device or resource busy").is_retryable());
        assert!(failed(9, "").is_retryable());
        assert!(
            !BtrfsError::NestedSubvolumes {
                volume: "/v".into(),
                nested: vec!["/v/a".into()]
            }
            .is_retryable()
        );
        assert!(BtrfsError::BadStream { reason: "x".into() }.is_retryable());
        assert!(
            BtrfsError::StreamRead {
                source: io::Error::from(io::ErrorKind::ConnectionReset)
            }
            .is_retryable()
        );
        assert!(
            !BtrfsError::io(
                "reading",
                "/x",
                io::Error::from(io::ErrorKind::PermissionDenied)
            )
            .is_retryable()
        );
    }

    #[test]
    fn nested_error_names_every_path_and_the_remedy() {
        let e = BtrfsError::NestedSubvolumes {
            volume: "/data/app".into(),
            nested: vec!["/data/app/db".into(), "/data/app/cache".into()],
        };
        let text = e.to_string();
        for part in [
            "/data/app/db",
            "/data/app/cache",
            "own volume",
            "empty folders",
        ] {
            assert!(text.contains(part), "{text}");
        }
    }
}
