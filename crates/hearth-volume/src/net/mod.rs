//! The volume link: node identities and mutual TLS ([`identity`]), and the framed messages the
//! primary and the standby exchange over it ([`wire`]). The protocol is specified in
//! `docs/formats/volume-stream.md`.

pub mod identity;
pub mod wire;

use std::io;
use std::path::PathBuf;

use crate::error::VolumeError;
use wire::Refusal;

/// Everything that can go wrong on the link, with a verdict on whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A local file (key, certificate, state) could not be read or written.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The peer could not be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Address tried.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed: usually a key that the other side does not allow, or a peer
    /// that is not the one pinned.
    #[error(
        "TLS handshake with {peer} failed: {source} (check that each side has the other's id: `hearth volume keygen` prints it)"
    )]
    Handshake {
        /// Who.
        peer: String,
        /// The cause as rustls reported it.
        #[source]
        source: io::Error,
    },
    /// Setting up TLS failed (a bad key or certificate).
    #[error("TLS set-up: {0}")]
    Tls(#[source] rustls::Error),
    /// The connection broke or timed out in the middle of an exchange.
    #[error("link broken: {0}")]
    Link(#[source] io::Error),
    /// The peer sent something that does not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer refused the request, saying why.
    #[error("{0}")]
    Refused(Refusal),
    /// A peer id that does not parse.
    #[error(
        "`{given}` is not a peer id; ids look like hv1-<64 hex digits>, as printed by `hearth volume keygen`"
    )]
    BadPeerId {
        /// What was given.
        given: String,
    },
    /// `keygen` found a key already there and did not replace it.
    #[error("{} already holds a key; peers have pinned its id, so it is not replaced (remove it yourself if you really mean to)", dir.display())]
    IdentityExists {
        /// The identity directory.
        dir: PathBuf,
    },
    /// The key or certificate file does not parse.
    #[error("identity in {}: {reason}", dir.display())]
    BadIdentity {
        /// The identity directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Making a key pair failed.
    #[error("generating a key: {0}")]
    KeyGeneration(String),
    /// A local volume operation failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl NetError {
    /// Whether running the same operation again may succeed without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            NetError::Connect { .. } | NetError::Link(_) => true,
            NetError::Refused(r) => r.is_retryable(),
            NetError::Volume(e) => e.is_retryable(),
            NetError::Io { source, .. } => source.kind() == io::ErrorKind::Interrupted,
            NetError::Handshake { .. }
            | NetError::Tls(_)
            | NetError::Protocol(_)
            | NetError::BadPeerId { .. }
            | NetError::IdentityExists { .. }
            | NetError::BadIdentity { .. }
            | NetError::KeyGeneration(_) => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        NetError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
