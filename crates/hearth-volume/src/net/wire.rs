//! The messages of the volume protocol and their framing: each frame is a 4-byte big-endian
//! length and a postcard body, inside TLS. See `docs/formats/volume-stream.md`.

use std::fmt;
use std::io;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::NetError;
use crate::manifest::{ChunkId, TreeHash};

/// The protocol version this build speaks. Both sides send theirs first; a mismatch is refused
/// with a message naming both.
pub const PROTOCOL_VERSION: u32 = 5;

/// The largest frame either side accepts. Chunks are at most 256 KiB and manifests travel in
/// parts of [`MANIFEST_PART`], so a bigger frame can only be a broken or hostile peer.
pub const MAX_FRAME: usize = 16 << 20;

/// The size of the parts a manifest is sent in.
pub const MANIFEST_PART: usize = 4 << 20;

/// How many chunk ids one [`Response::Want`] holds at most.
pub const WANT_PART: usize = 100_000;

/// What the primary sends.
///
/// Byte payloads are marked `serde_bytes`: postcard encodes them exactly as it encodes a
/// `Vec<u8>` (a varint length, then the bytes), but copies them in one piece instead of
/// visiting every byte, which was a seventh of the standby's CPU on a first sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The first message of every connection.
    Hello(Hello),
    /// A new tree is coming: its encoded manifest follows in [`Request::ManifestPart`]s.
    Offer(Offer),
    /// A part of the encoded manifest announced by [`Request::Offer`] (or, from the standby, of
    /// its live tree's manifest for `verify`).
    ManifestPart(#[serde(with = "serde_bytes")] Vec<u8>),
    /// One chunk the standby asked for.
    Chunk {
        /// Its id (BLAKE3 of `data`); the standby checks it.
        id: ChunkId,
        /// Its bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Make every chunk sent so far durable and say so ([`Response::Stored`]).
    Flush,
    /// Every wanted chunk was sent: apply the offered tree.
    Commit,
    /// Capture the live tree afresh and send its manifest back (for `verify`).
    Verify,
    /// Nothing more to do on this connection.
    Done,
    /// btrfs backend: a snapshot's send stream follows in [`Request::StreamPart`]s and ends with
    /// [`Request::StreamEnd`].
    BtrfsOffer(BtrfsOffer),
    /// A piece of a `btrfs send` stream.
    StreamPart(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The stream is complete: its length and BLAKE3 hash, which the standby checks before it
    /// makes the received snapshot live.
    StreamEnd {
        /// Bytes in the stream.
        len: u64,
        /// BLAKE3 of the stream.
        hash: [u8; 32],
    },
    /// First sync of a fresh standby ([`Welcome::fresh`]): the data of the regular file at
    /// `path` follows in [`Request::FileChunk`]s, sent while the primary is still capturing,
    /// before the [`Request::Offer`]. A second `FileBegin` for the same path voids the first.
    FileBegin {
        /// The file's path relative to the volume's root.
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
    },
    /// One chunk of the file last begun, at increasing offsets.
    FileChunk {
        /// Its offset in the file.
        offset: u64,
        /// Its id (BLAKE3 of `data`); the standby checks it.
        id: ChunkId,
        /// Its bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Nothing to do: sent while the primary is still capturing (walking a large tree without
    /// file data to stream) so that the standby does not take the silence for a dead link.
    Ping,
    /// btrfs backend, after the files backend applied the first copy of a snapshot
    /// ([`Hello::btrfs_first`]): make that copy the received snapshot it equals, so that the
    /// next sends are incremental from it. Answered with [`Response::BtrfsApplied`].
    BtrfsAdopt,
}

/// A btrfs snapshot on offer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BtrfsOffer {
    /// The snapshot's identity in the stream (the UUID the standby will record as received UUID).
    pub uuid: String,
    /// The parent the stream is relative to (`btrfs send -p`), by the same kind of UUID; `None`
    /// for a full stream.
    pub parent: Option<String>,
    /// Every snapshot the primary holds (same kind of UUID): its history. A standby whose live
    /// subvolume came from none of them keeps it aside instead of replacing it.
    pub history: Vec<String>,
    /// When the primary took the snapshot.
    pub captured_at_ms: u64,
}

/// The first message: who is pushing what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol: u32,
    /// The volume's name, as configured on the standby.
    pub volume: String,
    /// The sender's epoch: standbys refuse senders older than the newest they have seen.
    pub epoch: u64,
    /// The sender's host name, for logs and status.
    pub sender: String,
    /// btrfs backend: this connection carries the first copy of this snapshot by the files
    /// backend (resumable, and written once), into a subvolume the standby then adopts as the
    /// snapshot's received copy ([`Request::BtrfsAdopt`]). Only for a standby that holds nothing
    /// of the volume.
    pub btrfs_first: Option<BtrfsFirst>,
}

/// A primary snapshot whose first copy goes by the files backend; what `btrfs receive` would
/// have recorded from its full stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BtrfsFirst {
    /// The snapshot's UUID: the received UUID of the standby's copy.
    pub uuid: String,
    /// The transaction that last changed the snapshot (its `ctransid`, the stream's), recorded
    /// as the copy's `stransid`.
    pub ctransid: u64,
    /// The snapshot's name: the standby's copy gets the same one.
    pub name: String,
    /// Every snapshot the primary holds, as in [`BtrfsOffer::history`].
    pub history: Vec<String>,
}

/// A new tree on offer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Its tree hash.
    pub tree_hash: TreeHash,
    /// The standby's live tree, if the sender's history holds it (so the new tree descends
    /// from it). `None` when the sender does not know the standby's tree: the standby then keeps
    /// its current tree aside as diverged instead of replacing it.
    pub parent: Option<TreeHash>,
    /// When the primary captured the tree (milliseconds since the Unix epoch).
    pub captured_at_ms: u64,
    /// Length of the encoded manifest (or delta) that follows.
    pub manifest_len: u64,
    /// Whether what follows is a [`crate::delta::ManifestDelta`] against `parent` (which must be
    /// the standby's live tree) instead of the whole manifest. The standby rebuilds the manifest
    /// and refuses it unless it has `tree_hash`.
    pub delta: bool,
}

/// What the standby answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The answer to [`Request::Hello`] when the standby accepts the sender.
    Welcome(Welcome),
    /// The standby refuses; the connection ends after this.
    Refused(Refusal),
    /// Chunks the standby lacks; `last` marks the final part of the list.
    Want {
        /// The ids, in the order the manifest first references them.
        ids: Vec<ChunkId>,
        /// Whether this is the list's last part.
        last: bool,
    },
    /// Everything sent before the [`Request::Flush`] is checked and stored: durable, except the
    /// chunks of a small sync, which the standby holds in memory only (a crash costs sending
    /// them again; see `docs/formats/volume-stream.md`, "Held chunks").
    Stored {
        /// Chunks stored on this connection so far.
        chunks: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// The offered tree is live.
    Applied(Applied),
    /// The manifest of the standby's live tree follows (answer to [`Request::Verify`]),
    /// `None` when it holds no tree.
    Verifying {
        /// Length of the encoded manifest that follows in [`Response::ManifestPart`]s.
        manifest_len: Option<u64>,
    },
    /// A part of the manifest announced by [`Response::Verifying`].
    ManifestPart(#[serde(with = "serde_bytes")] Vec<u8>),
    /// btrfs backend: the offered snapshot is live.
    BtrfsApplied {
        /// The live subvolume's source snapshot (the offered UUID).
        uuid: String,
        /// Subvolumes the standby kept aside instead of deleting them.
        kept_aside: Vec<String>,
    },
    /// btrfs backend, the answer to [`Request::BtrfsOffer`]: the stream may start after
    /// `offset` bytes, which the standby kept from an earlier, cut transfer of the same full
    /// stream (0: from the start).
    BtrfsResume {
        /// Bytes of the stream the standby already holds.
        offset: u64,
    },
}

/// The standby's greeting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// [`PROTOCOL_VERSION`] of the standby.
    pub protocol: u32,
    /// The highest epoch the standby has seen (after taking the sender's into account).
    pub epoch: u64,
    /// The standby's live tree.
    pub live: Option<LiveTree>,
    /// When the volume's directory is on btrfs: the received UUIDs of the snapshots the standby
    /// holds (candidates for the parent of an incremental send). `None` elsewhere.
    pub btrfs_received: Option<Vec<String>>,
    /// btrfs backend: the snapshot (by the same kind of UUID) whose full stream the standby
    /// holds the start of, from a cut transfer; the primary finishes that one first if it still
    /// has it.
    pub btrfs_partial: Option<String>,
    /// The standby holds nothing of this volume: no live tree, no stored chunks, no files
    /// received earlier. The primary may then stream file data while it captures
    /// ([`Request::FileBegin`]); otherwise it offers the tree first, so that what the standby
    /// holds is not sent again.
    pub fresh: bool,
    /// The volume's folder is on btrfs and the standby holds nothing of it: no received
    /// snapshot, and nothing at its live path. The primary may then
    /// make the first copy by the files backend ([`Hello::btrfs_first`]).
    pub btrfs_empty: bool,
}

/// A tree a standby holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTree {
    /// Its hash.
    pub tree_hash: TreeHash,
    /// When the primary captured it.
    pub captured_at_ms: u64,
    /// The standby's watch saw it changed by someone other than hearth since it was applied: the
    /// standby does not hold this tree any more, though its manifest says so.
    pub changed: bool,
}

/// The outcome of an apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The tree now live.
    pub tree_hash: TreeHash,
    /// Whether it was live already.
    pub unchanged: bool,
    /// Regular files written.
    pub files: u64,
    /// Bytes of regular files.
    pub bytes: u64,
    /// Files whose data came from the old live tree.
    pub reused: u64,
    /// Trees the standby kept aside instead of replacing them (paths on the standby).
    pub kept_aside: Vec<String>,
}

/// Why a standby refuses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The kind of refusal.
    pub code: RefusalCode,
    /// The standby's explanation, for the operator.
    pub message: String,
}

impl Refusal {
    /// A refusal of `code` explained by `message`.
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// Whether the same push may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(self.code, RefusalCode::Busy | RefusalCode::Failed)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the standby refused ({:?}): {}", self.code, self.message)
    }
}

/// The kinds of refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// The protocol versions differ.
    Protocol,
    /// The standby is not configured for this volume.
    UnknownVolume,
    /// The sender's epoch is lower than one the standby has seen: a newer primary exists.
    LowerEpoch,
    /// Another push of the same volume is running.
    Busy,
    /// The offered manifest is invalid (bad encoding, a path outside the volume, ...).
    InvalidManifest,
    /// A chunk's bytes do not match its id.
    ChunkMismatch,
    /// The sender broke the protocol.
    BadRequest,
    /// The standby failed to store or apply (disk full, permissions); its message says which.
    Failed,
}

/// Writes one message as a frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), NetError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    // One buffer for the length and the body, so the frame goes out in one TLS record where it
    // fits instead of a 4-byte record followed by the body.
    let buf = postcard::to_extend(msg, vec![0u8; 4])
        .map_err(|e| NetError::Protocol(format!("cannot encode a message: {e}")))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(NetError::Protocol(format!(
            "message of {len} bytes exceeds the frame limit"
        )));
    }
    let mut buf = buf;
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    w.write_all(&buf).await.map_err(NetError::Link)
}

/// Flushes buffered frames.
pub async fn flush<W: AsyncWrite + Unpin>(w: &mut W) -> Result<(), NetError> {
    w.flush().await.map_err(NetError::Link)
}

/// Reads one frame; `None` when the peer closed the connection cleanly between frames.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, NetError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(NetError::Link(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(NetError::Protocol(format!(
            "peer sent a frame of {len} bytes, more than the limit of {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(NetError::Link)?;
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| NetError::Protocol(format!("cannot decode a message: {e}")))
}

/// Reads one frame that must be there.
pub async fn expect_frame<R, T>(r: &mut R) -> Result<T, NetError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame(r).await?.ok_or_else(|| {
        NetError::Link(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let msgs = vec![
            Request::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                volume: "gitea".into(),
                epoch: 3,
                sender: "node1".into(),
                btrfs_first: None,
            }),
            Request::Chunk {
                id: ChunkId::of(b"abc"),
                data: b"abc".to_vec(),
            },
            Request::Done,
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            write_frame(&mut buf, m).await.unwrap();
        }
        let mut r = &buf[..];
        for m in &msgs {
            let got: Request = expect_frame(&mut r).await.unwrap();
            assert_eq!(&got, m);
        }
        assert!(read_frame::<_, Request>(&mut r).await.unwrap().is_none());

        // Byte payloads keep the layout of a plain `Vec<u8>` (varint length, then the bytes), so
        // marking them `serde_bytes` changed no frame on the wire.
        #[derive(Serialize)]
        enum Plain {
            _Hello,
            _Offer,
            ManifestPart(Vec<u8>),
        }
        let bytes = vec![7u8; 300];
        assert_eq!(
            postcard::to_stdvec(&Request::ManifestPart(bytes.clone())).unwrap(),
            postcard::to_stdvec(&Plain::ManifestPart(bytes)).unwrap()
        );

        // A length beyond the limit is refused before anything is allocated.
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let err = read_frame::<_, Request>(&mut &huge[..]).await.unwrap_err();
        assert!(matches!(err, NetError::Protocol(_)), "{err}");
        // A frame cut short is a broken link, not a clean end.
        let cut = &buf[..buf.len() - 1];
        let mut r = cut;
        for _ in 0..2 {
            let _: Request = expect_frame(&mut r).await.unwrap();
        }
        // The third frame (Done) is one byte long; cut leaves its length but not its body.
        let err = read_frame::<_, Request>(&mut r).await.unwrap_err();
        assert!(matches!(err, NetError::Link(_)), "{err}");
        // Garbage in a well-framed body is a protocol error.
        let mut junk = 3u32.to_be_bytes().to_vec();
        junk.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = read_frame::<_, Request>(&mut &junk[..]).await.unwrap_err();
        assert!(matches!(err, NetError::Protocol(_)), "{err}");
    }
}
