//! What each side remembers between runs (the primary's snapshot history and per-standby
//! progress, the standby's epoch and live tree) and the pure decisions taken from it: whether a
//! standby accepts a sender, whether it may replace its live tree, which old trees to forget.
//!
//! State files are JSON (`docs/formats/volume-state.md`), written through a temporary name with
//! fsync and rename, so a crash leaves the old or the new state, whole.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::durable::{Existing, write_atomic};
use crate::error::VolumeError;
use crate::manifest::TreeHash;
use crate::net::wire::{Hello, PROTOCOL_VERSION, Refusal, RefusalCode};

/// The version of the state files this build writes and reads.
pub const STATE_VERSION: u32 = 1;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A tree hash as it appears in state files and output: 64 hex digits.
pub fn hex(hash: &TreeHash) -> String {
    hash.to_string()
}

/// One snapshot of the primary: a captured tree whose manifest is kept in the state directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its tree hash (hex).
    pub tree_hash: String,
    /// When it was captured.
    pub captured_at_ms: u64,
    /// Regular-file bytes in it.
    pub bytes: u64,
    /// Entries in it.
    pub entries: u64,
    /// btrfs backend: where the read-only snapshot is on the primary (`tree_hash` then holds the
    /// snapshot's UUID as `btrfs send` names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_path: Option<String>,
}

/// What the primary knows about one standby.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyRecord {
    /// The standby's peer id.
    pub id: String,
    /// The newest snapshot the standby is known to hold; pinned on the primary.
    pub last_common: Option<Snapshot>,
    /// When the last attempt started.
    pub last_attempt_ms: Option<u64>,
    /// When the last successful sync ended.
    pub last_success_ms: Option<u64>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// Chunk bytes sent in all syncs.
    pub bytes_sent: u64,
    /// Chunks sent in all syncs.
    pub chunks_sent: u64,
    /// Syncs that had no common tree with the standby (first sync, or diverged standby).
    pub full_syncs: u64,
    /// Syncs from a common tree.
    pub incremental_syncs: u64,
    /// Syncs where the standby already held the tree.
    pub unchanged_syncs: u64,
    /// Attempts refused by the standby.
    pub refusals: u64,
    /// Duration of the last successful sync.
    pub last_duration_ms: Option<u64>,
}

/// The primary's state for one volume: `<state>/<volume>/primary.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Snapshots, oldest first.
    pub history: Vec<Snapshot>,
    /// Standbys by address.
    pub standbys: BTreeMap<String, StandbyRecord>,
    /// The epoch of the last push (what `verify` presents unless told otherwise).
    #[serde(default)]
    pub epoch: u64,
}

impl PrimaryState {
    /// Whether `hash` is a tree this primary produced and still remembers (history or pinned).
    pub fn knows(&self, hash: &TreeHash) -> bool {
        let h = hex(hash);
        self.history.iter().any(|s| s.tree_hash == h)
            || self
                .standbys
                .values()
                .any(|r| r.last_common.as_ref().is_some_and(|s| s.tree_hash == h))
    }

    /// Adds a snapshot to the history (once) and forgets the oldest beyond `keep`. Returns the
    /// tree hashes whose manifests are no longer needed: out of the history and not pinned as
    /// some standby's last common tree.
    pub fn record_snapshot(&mut self, snap: Snapshot, keep: usize) -> Vec<String> {
        if !self.history.iter().any(|s| s.tree_hash == snap.tree_hash) {
            self.history.push(snap);
        }
        let keep = keep.max(1);
        let excess = self.history.len().saturating_sub(keep);
        let dropped: Vec<Snapshot> = self.history.drain(..excess).collect();
        dropped
            .into_iter()
            .map(|s| s.tree_hash)
            .filter(|h| !self.is_pinned(h) && !self.history.iter().any(|s| &s.tree_hash == h))
            .collect()
    }

    fn is_pinned(&self, hash: &str) -> bool {
        self.standbys
            .values()
            .any(|r| r.last_common.as_ref().is_some_and(|s| s.tree_hash == hash))
    }

    /// Every tree hash whose manifest must be kept: the history and each standby's pin.
    pub fn needed_trees(&self) -> Vec<String> {
        let mut v: Vec<String> = self.history.iter().map(|s| s.tree_hash.clone()).collect();
        for r in self.standbys.values() {
            if let Some(s) = &r.last_common {
                v.push(s.tree_hash.clone());
            }
        }
        v.sort();
        v.dedup();
        v
    }
}

/// A tree a standby kept aside instead of replacing it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptAside {
    /// Where it is.
    pub path: String,
    /// Why.
    pub reason: String,
    /// The sender epoch that caused it.
    pub epoch: u64,
    /// When.
    pub at_ms: u64,
}

/// The tree a standby holds, as recorded when it was applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRecord {
    /// Its tree hash (hex).
    pub tree_hash: String,
    /// When the primary captured it.
    pub captured_at_ms: u64,
    /// When it was applied here.
    pub applied_at_ms: u64,
    /// The sender's peer id.
    pub sender: String,
    /// The sender's epoch.
    pub epoch: u64,
}

/// The standby's state for one volume: `<state>/<volume>/standby.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The highest sender epoch seen; lower ones are refused.
    pub epoch: u64,
    /// The live tree.
    pub live: Option<LiveRecord>,
    /// Trees applied.
    pub applies: u64,
    /// Chunk bytes received.
    pub bytes_received: u64,
    /// Requests refused.
    pub refusals: u64,
    /// Trees kept aside.
    pub kept_aside: Vec<KeptAside>,
}

/// Reads a state file; a missing file is the default state. A file of another version or one
/// that does not parse is an error: state decides what a standby refuses, so it is not guessed.
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T, VolumeError> {
    match fs::read(path) {
        Ok(bytes) => {
            #[derive(Deserialize)]
            struct Version {
                version: u32,
            }
            let v: Version = serde_json::from_slice(&bytes).map_err(|e| bad_state(path, &e))?;
            if v.version != STATE_VERSION {
                return Err(VolumeError::BadTarget {
                    path: path.into(),
                    reason: format!(
                        "state file version {} is not {STATE_VERSION}, the one this build reads",
                        v.version
                    ),
                });
            }
            serde_json::from_slice(&bytes).map_err(|e| bad_state(path, &e))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(VolumeError::io("reading", path, e)),
    }
}

fn bad_state(path: &Path, e: &dyn std::fmt::Display) -> VolumeError {
    VolumeError::BadTarget {
        path: path.into(),
        reason: format!("state file does not parse ({e}); move it away to start afresh"),
    }
}

/// Writes a state file durably.
pub fn save<T: Serialize>(path: &Path, state: &T) -> Result<(), VolumeError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| VolumeError::io("creating", dir, e))?;
    }
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| VolumeError::BadTarget {
        path: path.into(),
        reason: format!("cannot encode state: {e}"),
    })?;
    write_atomic(path, &bytes, 0o644, Existing::Replace)
        .map_err(|e| VolumeError::io("writing", path, e))
}

/// Where one volume's state lives under a state directory.
#[derive(Clone, Debug)]
pub struct VolumeDirs {
    /// `<state>/<volume>`.
    pub root: PathBuf,
}

impl VolumeDirs {
    /// The directories of `volume` under `state`.
    pub fn new(state: &Path, volume: &str) -> Self {
        VolumeDirs {
            root: state.join(volume),
        }
    }
    /// The primary's state file.
    pub fn primary(&self) -> PathBuf {
        self.root.join("primary.json")
    }
    /// The standby's state file.
    pub fn standby(&self) -> PathBuf {
        self.root.join("standby.json")
    }
    /// The primary's capture cache.
    pub fn capture_cache(&self) -> PathBuf {
        self.root.join("capture.cache")
    }
    /// The primary's kept manifests.
    pub fn trees(&self) -> PathBuf {
        self.root.join("trees")
    }
    /// The manifest of one kept tree.
    pub fn tree(&self, hash: &str) -> PathBuf {
        self.trees().join(format!("{hash}.manifest"))
    }
    /// The standby's chunk store.
    pub fn chunks(&self) -> PathBuf {
        self.root.join("store")
    }
    /// The standby's copy of a full `btrfs send` stream being received for snapshot `uuid`, kept
    /// when the link breaks so that the next push of the same snapshot resumes after it. `None`
    /// for a UUID that is not one (it comes from the primary and becomes part of a file name).
    pub fn partial_stream(&self, uuid: &str) -> Option<PathBuf> {
        let plain = uuid.len() == 36 && uuid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        plain.then(|| {
            self.root.join(format!(
                "btrfs-partial.{}.stream",
                uuid.to_ascii_lowercase()
            ))
        })
    }
    /// Where the standby keeps what arrived of an *incremental* stream of snapshot `uuid` from
    /// `parent` (both as `btrfs send` names them), so that the same stream, made again, resumes
    /// after it. `None` for a malformed UUID.
    pub fn partial_incremental_stream(&self, uuid: &str, parent: &str) -> Option<PathBuf> {
        let plain =
            |u: &str| u.len() == 36 && u.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        (plain(uuid) && plain(parent)).then(|| {
            self.root.join(format!(
                "btrfs-partial.{}.from.{}.stream",
                uuid.to_ascii_lowercase(),
                parent.to_ascii_lowercase()
            ))
        })
    }
    /// The snapshot whose full stream the standby holds the start of (see
    /// [`VolumeDirs::partial_stream`]), when it holds any of one.
    pub fn partial_stream_held(&self) -> Option<String> {
        std::fs::read_dir(&self.root).ok()?.flatten().find_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let uuid = name
                .strip_prefix("btrfs-partial.")?
                .strip_suffix(".stream")?;
            let held = e.metadata().ok()?.len() > 0;
            (held && self.partial_stream(uuid).as_deref() == Some(e.path().as_path()))
                .then(|| uuid.to_owned())
        })
    }
    /// The lock file that keeps two processes from working on the volume at once.
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }
}

/// An exclusive lock on one volume's state (`flock` on [`VolumeDirs::lock`]), held while a
/// process works on the volume so that two pushes (a cron job overlapping a `--every` loop) or two
/// receivers never interleave. The kernel drops it when the process dies, so a crash leaves no
/// stale lock.
#[derive(Debug)]
pub struct VolumeLock {
    _file: fs::File,
}

impl VolumeLock {
    /// Takes the lock, or returns `None` when another process holds it.
    pub fn try_acquire(dirs: &VolumeDirs) -> Result<Option<Self>, VolumeError> {
        fs::create_dir_all(&dirs.root).map_err(|e| VolumeError::io("creating", &dirs.root, e))?;
        let path = dirs.lock();
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| VolumeError::io("opening", &path, e))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(VolumeLock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(VolumeError::io("locking", path, e.into())),
        }
    }
}

/// Whether a volume name is acceptable: it names a directory under the state directory and
/// appears in logs and metrics, so it is kept to a safe alphabet.
pub fn valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The standby's answer to a [`Hello`]: accept, possibly raising its stored epoch first, or
/// refuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HelloDecision {
    /// Accept. `raise_epoch` is the epoch to store durably before answering, when the sender's
    /// is higher than any seen.
    Accept {
        /// The new highest epoch, if it grew.
        raise_epoch: Option<u64>,
    },
    /// Refuse, with the reason to send back.
    Refuse(Refusal),
}

/// Decides on a greeting. `configured` says whether the standby serves the volume; `seen` is the
/// highest epoch it has stored for it.
pub fn decide_hello(hello: &Hello, configured: bool, seen: u64) -> HelloDecision {
    if hello.protocol != PROTOCOL_VERSION {
        return HelloDecision::Refuse(Refusal::new(
            RefusalCode::Protocol,
            format!(
                "the sender speaks protocol {}, this standby speaks {PROTOCOL_VERSION}; run the same hearth version on both",
                hello.protocol
            ),
        ));
    }
    if !configured {
        return HelloDecision::Refuse(Refusal::new(
            RefusalCode::UnknownVolume,
            format!(
                "this standby does not serve a volume named `{}`; add `--volume {}=<path>` to `hearth volume serve`",
                hello.volume, hello.volume
            ),
        ));
    }
    if hello.epoch < seen {
        return HelloDecision::Refuse(Refusal::new(
            RefusalCode::LowerEpoch,
            format!(
                "volume `{}`: the sender's epoch {} is lower than epoch {seen} already seen here; a newer primary exists, so this one must not overwrite the standby",
                hello.volume, hello.epoch
            ),
        ));
    }
    HelloDecision::Accept {
        raise_epoch: (hello.epoch > seen).then_some(hello.epoch),
    }
}

/// What the standby's live directory holds before an apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LiveContent {
    /// Nothing (missing or an empty directory).
    Empty,
    /// A tree hearth applied, with its hash.
    Applied(TreeHash),
    /// Files hearth did not write (no manifest for them).
    Foreign,
}

/// Whether the standby may replace its live tree with an offered one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LiveAction {
    /// The offered tree is live already.
    Unchanged,
    /// Replace the live tree (the usual atomic switch; the old tree goes to `hearth-prev`).
    Replace,
    /// Keep the live tree aside read-only before switching, because it is not known to be part
    /// of the sender's history.
    KeepAside {
        /// Why, for logs and status.
        reason: String,
    },
}

/// Decides what to do with the live tree when `offered` arrives with `parent` (the standby's
/// tree as the sender's history knows it).
pub fn decide_live(
    live: &LiveContent,
    offered: &TreeHash,
    parent: Option<&TreeHash>,
) -> LiveAction {
    match live {
        LiveContent::Empty => LiveAction::Replace,
        LiveContent::Applied(h) if h == offered => LiveAction::Unchanged,
        LiveContent::Applied(h) if Some(h) == parent => LiveAction::Replace,
        LiveContent::Applied(h) => LiveAction::KeepAside {
            reason: format!(
                "the standby's tree {} is not in the sender's history (it diverged, or the sender lost its state)",
                &hex(h)[..16]
            ),
        },
        LiveContent::Foreign => LiveAction::KeepAside {
            reason: "the volume's directory holds files hearth did not write".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(protocol: u32, epoch: u64) -> Hello {
        Hello {
            protocol,
            volume: "v".into(),
            epoch,
            sender: "p".into(),
            btrfs_first: None,
        }
    }

    #[test]
    fn hello_decisions() {
        use HelloDecision::*;
        const P: u32 = crate::net::wire::PROTOCOL_VERSION;
        // (name, hello, volume configured, epoch seen, accepted with raised epoch or refused)
        type Case = (
            &'static str,
            Hello,
            bool,
            u64,
            Result<Option<u64>, RefusalCode>,
        );
        let cases: Vec<Case> = vec![
            ("first contact", hello(P, 1), true, 0, Ok(Some(1))),
            ("same epoch", hello(P, 4), true, 4, Ok(None)),
            ("higher epoch", hello(P, 9), true, 4, Ok(Some(9))),
            (
                "lower epoch",
                hello(P, 3),
                true,
                4,
                Err(RefusalCode::LowerEpoch),
            ),
            (
                "unknown volume",
                hello(P, 9),
                false,
                0,
                Err(RefusalCode::UnknownVolume),
            ),
            (
                "other protocol",
                hello(P + 1, 9),
                true,
                0,
                Err(RefusalCode::Protocol),
            ),
        ];
        for (name, h, configured, seen, want) in cases {
            let got = decide_hello(&h, configured, seen);
            match (got, want) {
                (Accept { raise_epoch }, Ok(w)) => assert_eq!(raise_epoch, w, "{name}"),
                (Refuse(r), Err(code)) => {
                    assert_eq!(r.code, code, "{name}");
                    assert!(!r.message.is_empty());
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn live_decisions() {
        let a = TreeHash([1; 32]);
        let b = TreeHash([2; 32]);
        let c = TreeHash([3; 32]);
        let keep =
            |l: &LiveContent, o, p| matches!(decide_live(l, o, p), LiveAction::KeepAside { .. });
        assert_eq!(
            decide_live(&LiveContent::Empty, &a, None),
            LiveAction::Replace
        );
        assert_eq!(
            decide_live(&LiveContent::Applied(a), &a, None),
            LiveAction::Unchanged
        );
        assert_eq!(
            decide_live(&LiveContent::Applied(a), &b, Some(&a)),
            LiveAction::Replace
        );
        assert!(keep(&LiveContent::Applied(a), &b, None));
        assert!(keep(&LiveContent::Applied(a), &b, Some(&c)));
        assert!(keep(&LiveContent::Foreign, &b, None));
    }

    #[test]
    fn history_keeps_pins() {
        let snap = |n: u8| Snapshot {
            tree_hash: format!("{n:02x}"),
            captured_at_ms: u64::from(n),
            bytes: 0,
            entries: 0,
            snapshot_path: None,
        };
        let mut st = PrimaryState::default();
        assert!(st.record_snapshot(snap(1), 2).is_empty());
        st.standbys.insert(
            "s".into(),
            StandbyRecord {
                last_common: Some(snap(1)),
                ..Default::default()
            },
        );
        assert!(st.record_snapshot(snap(2), 2).is_empty());
        // 1 leaves the history but stays pinned by the standby.
        assert!(st.record_snapshot(snap(3), 2).is_empty());
        // 2 leaves the history and is not pinned: its manifest may go.
        assert_eq!(st.record_snapshot(snap(4), 2), vec!["02".to_string()]);
        // Recording the same snapshot twice keeps one entry.
        assert!(st.record_snapshot(snap(4), 2).is_empty());
        assert_eq!(st.history.len(), 2);
        assert_eq!(st.needed_trees(), vec!["01", "03", "04"]);
    }

    #[test]
    fn volume_names() {
        for ok in ["gitea", "home-assistant", "db_1", "a.b"] {
            assert!(valid_volume_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", ".hidden", &"x".repeat(65)] {
            assert!(!valid_volume_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn state_files_round_trip_and_refuse_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v/standby.json");
        let st: StandbyState = load(&p).unwrap();
        assert_eq!(st, StandbyState::default());
        let st = StandbyState {
            version: STATE_VERSION,
            epoch: 7,
            ..Default::default()
        };
        save(&p, &st).unwrap();
        assert_eq!(load::<StandbyState>(&p).unwrap(), st);
        fs::write(&p, br#"{"version": 99}"#).unwrap();
        assert!(load::<StandbyState>(&p).is_err());
        fs::write(&p, b"{not json").unwrap();
        assert!(load::<StandbyState>(&p).is_err());
    }
}
