//! The standby's switch: a writable snapshot of a received snapshot replaces the live subvolume in one
//! atomic exchange, and the replaced subvolume is deleted only when hearth made it and nothing changed it
//! since; otherwise it is kept aside read-only.
//!
//! For each live path `DIR/NAME` hearth keeps, in `DIR`:
//! - `.NAME.hearth-btrfs.json`: the state file (what hearth made, with its generation), written to a
//!   temporary name, fsynced and renamed;
//! - `.NAME.hearth-btrfs-next`: the next live subvolume while it is being switched in (or, after an
//!   interrupted switch, the replaced one).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::diff;
use super::error::BtrfsError;
use super::plan::{KeepReason, LiveRecord, ReplacedAction, decide_replaced};
use super::tool::{self, SubvolInfo};
use crate::durable::{Existing, sync_parent, write_atomic};

/// Version of the state file's format.
const STATE_VERSION: u32 = 1;

/// The state file next to a live path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct LiveState {
    version: u32,
    /// The subvolume hearth made live last.
    live: Option<LiveRecord>,
    /// The subvolume being switched in, recorded before the exchange.
    next: Option<LiveRecord>,
    /// The subvolume that was live before `live`, until its fate is settled.
    previous: Option<LiveRecord>,
}

/// What [`switch_live`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchReport {
    /// The new live subvolume.
    pub live: SubvolInfo,
    /// What became of the subvolume that was live before, if there was one.
    pub replaced: Option<Replaced>,
    /// What became of a subvolume an interrupted earlier switch left at the hidden `next` name.
    pub leftover: Option<Replaced>,
}

/// The fate of a subvolume that stopped being live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replaced {
    /// hearth made it and it was unchanged: deleted.
    Deleted {
        /// Its UUID.
        uuid: String,
    },
    /// Kept aside, read-only, at `path`: it may hold data the primary never had. Never deleted by hearth.
    KeptAside {
        /// Where it is now.
        path: PathBuf,
        /// Its UUID.
        uuid: String,
        /// Why it was kept.
        reason: KeepReason,
    },
}

/// The hidden paths hearth uses next to a live path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveNames {
    /// The live path itself.
    pub live: PathBuf,
    /// `.NAME.hearth-btrfs.json`.
    pub state: PathBuf,
    /// `.NAME.hearth-btrfs-next`.
    pub next: PathBuf,
}

impl LiveNames {
    /// The names for the live path `live`, which needs a parent folder and a UTF-8 name.
    pub fn new(live: &Path) -> Result<LiveNames, BtrfsError> {
        let bad = |reason: &'static str| BtrfsError::InvalidName {
            name: live.display().to_string(),
            reason,
        };
        let parent = live.parent().ok_or_else(|| bad("has no parent folder"))?;
        let name = live
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad("has no UTF-8 file name"))?;
        Ok(LiveNames {
            live: live.to_path_buf(),
            state: parent.join(format!(".{name}.hearth-btrfs.json")),
            next: parent.join(format!(".{name}.hearth-btrfs-next")),
        })
    }

    fn dir(&self) -> &Path {
        self.live.parent().unwrap_or(Path::new("."))
    }
}

fn read_state(path: &Path) -> Result<LiveState, BtrfsError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let state: LiveState =
                serde_json::from_slice(&bytes).map_err(|e| BtrfsError::BadState {
                    path: path.into(),
                    reason: e.to_string(),
                })?;
            if state.version != STATE_VERSION {
                return Err(BtrfsError::BadState {
                    path: path.into(),
                    reason: format!(
                        "format version {} (this hearth reads {STATE_VERSION})",
                        state.version
                    ),
                });
            }
            Ok(state)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LiveState {
            version: STATE_VERSION,
            ..LiveState::default()
        }),
        Err(e) => Err(BtrfsError::io("reading", path, e)),
    }
}

fn write_state(path: &Path, state: &LiveState) -> Result<(), BtrfsError> {
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| BtrfsError::BadState {
        path: path.into(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes, 0o600, Existing::Replace)
        .map_err(|e| BtrfsError::io("writing", path, e))
}

fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

fn rename(from: &Path, to: &Path, flags: rustix::fs::RenameFlags) -> Result<(), BtrfsError> {
    rustix::fs::renameat_with(rustix::fs::CWD, from, rustix::fs::CWD, to, flags)
        .map_err(|e| BtrfsError::io("renaming", from, e.into()))?;
    sync_parent(to).map_err(|e| BtrfsError::io("syncing the folder of", to, e))
}

/// The record of a subvolume hearth just made (after a filesystem sync, so the generation is final).
fn record(info: &SubvolInfo, source: Option<&str>) -> LiveRecord {
    LiveRecord {
        uuid: info.uuid.clone(),
        generation: info.generation,
        source: source.map(str::to_string),
    }
}

/// Settles the fate of the subvolume at `at` that stopped being live: delete it when `records` show hearth
/// made it and it is unchanged, else make it read-only and rename it to `aside`.
///
/// A generation that moved is looked at more closely when the received snapshot the subvolume was made
/// from is still in `staging`: if only access times differ (someone read files), it is unchanged after all
/// (see the `diff` module).
fn settle(
    at: &Path,
    aside: &Path,
    records: &[&LiveRecord],
    staging: &Path,
) -> Result<Replaced, BtrfsError> {
    // Read-only first: a process that still has files open in it can no longer change it between the check
    // and the deletion, and if it is kept, it is kept as it was.
    tool::set_readonly(at)?;
    tool::sync_filesystem(at)?;
    let info = tool::subvolume_info(at)?;
    let action = match decide_replaced(records, &info) {
        ReplacedAction::KeepAside(KeepReason::ChangedLocally { .. })
            if read_only_since(&info, staging) =>
        {
            ReplacedAction::Delete
        }
        action => action,
    };
    match action {
        ReplacedAction::Delete => {
            tool::delete_subvolume(at)?;
            Ok(Replaced::Deleted { uuid: info.uuid })
        }
        ReplacedAction::KeepAside(reason) => {
            rename(at, aside, rustix::fs::RenameFlags::NOREPLACE)?;
            tracing::warn!(
                path = %aside.display(),
                %reason,
                "kept a replaced live subvolume aside, read-only; it may hold data the primary never had"
            );
            Ok(Replaced::KeptAside {
                path: aside.to_path_buf(),
                uuid: info.uuid,
                reason,
            })
        }
    }
}

/// Whether `info` (read-only now) differs from the snapshot in `staging` it was made from in access times
/// only. Failures to find out are logged and count as "changed".
fn read_only_since(info: &SubvolInfo, staging: &Path) -> bool {
    let Some(parent) = info.parent_uuid.as_deref() else {
        return false;
    };
    let source = match tool::list_snapshots(staging) {
        Ok(list) => list
            .into_iter()
            .find(|s| s.uuid.eq_ignore_ascii_case(parent)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the staging folder to check a replaced live subvolume");
            None
        }
    };
    let Some(source) = source else {
        return false;
    };
    match diff::only_access_times_changed(&source.path, &info.path) {
        Ok(only) => only,
        Err(e) => {
            tracing::warn!(error = %e, path = %info.path.display(), "cannot compare a replaced live subvolume with its source");
            false
        }
    }
}

/// Makes `received` (a read-only received snapshot on the same filesystem) the content of `live`.
///
/// A writable snapshot of `received` is made at the hidden `next` name beside `live` and exchanged with
/// the live subvolume in one `renameat2(RENAME_EXCHANGE)`, so `live` always holds one whole snapshot.
/// The replaced subvolume is then deleted if hearth made it and its generation is the one recorded when it
/// was made, or if the generation moved only because files were read (access times; checked against the
/// received snapshot it was made from, looked up in `received`'s folder, the staging folder, so keep that
/// snapshot until the switch is done); otherwise (changed on this host, or not made by hearth) it is made
/// read-only and renamed to `diverged_name` in the same folder, and reported. Leftovers of an
/// interrupted earlier switch are settled the same way (kept ones get `diverged_name` + `.interrupted`).
/// `diverged_name` must not exist.
///
/// This is blocking work (it runs the btrfs tool and fsyncs); call it from `spawn_blocking`.
pub fn switch_live(
    received: &SubvolInfo,
    live: &Path,
    diverged_name: &str,
) -> Result<SwitchReport, BtrfsError> {
    switch_live_inner(received, live, diverged_name, false)
}

/// [`switch_live`], but the replaced subvolume is kept aside read-only whatever its state: the
/// caller found it is not part of the sender's history. Keeping it aside at the exchange (not
/// before) means the live path never stands empty, even if making the new copy fails.
pub fn switch_live_keeping_replaced(
    received: &SubvolInfo,
    live: &Path,
    diverged_name: &str,
) -> Result<SwitchReport, BtrfsError> {
    switch_live_inner(received, live, diverged_name, true)
}

fn switch_live_inner(
    received: &SubvolInfo,
    live: &Path,
    diverged_name: &str,
    keep_replaced: bool,
) -> Result<SwitchReport, BtrfsError> {
    tool::check_name(diverged_name)?;
    if !received.readonly || received.received_uuid.is_none() {
        return Err(BtrfsError::IncompleteReceive {
            path: received.path.clone(),
            reason: "only a read-only received snapshot can become live".into(),
        });
    }
    let names = LiveNames::new(live)?;
    // The staging folder is where the received snapshots are; the replaced live subvolume's source is there.
    let staging = received.path.parent().unwrap_or(Path::new("."));
    let aside = names.dir().join(diverged_name);
    let aside_leftover = names.dir().join(format!("{diverged_name}.interrupted"));
    for p in [&aside, &aside_leftover] {
        if exists(p) {
            return Err(BtrfsError::Exists { path: p.clone() });
        }
    }
    let live_exists = exists(live);
    if live_exists && !tool::is_subvolume(live)? {
        return Err(BtrfsError::LiveNotSubvolume { path: live.into() });
    }
    let mut state = read_state(&names.state)?;

    // Recovery from an interrupted switch: the exchange happened but the state file still calls the new
    // live subvolume `next`.
    if live_exists
        && let Some(next) = state.next.clone()
        && tool::subvolume_info(live)?
            .uuid
            .eq_ignore_ascii_case(&next.uuid)
    {
        state.previous = state.live.take();
        state.live = Some(next);
        state.next = None;
        write_state(&names.state, &state)?;
    }
    // Whatever is still at the hidden `next` name is either a next subvolume never switched in or a
    // replaced one whose fate was not settled; both are judged against every record hearth has.
    let leftover = if exists(&names.next) {
        let records: Vec<&LiveRecord> = [&state.next, &state.previous, &state.live]
            .into_iter()
            .flatten()
            .collect();
        let fate = settle(&names.next, &aside_leftover, &records, staging)?;
        state.next = None;
        state.previous = None;
        write_state(&names.state, &state)?;
        Some(fate)
    } else {
        None
    };

    // Make the next live subvolume and record it before it is switched in.
    tool::run(&[
        "subvolume".as_ref(),
        "snapshot".as_ref(),
        received.path.as_os_str(),
        names.next.as_os_str(),
    ])?;
    tool::sync_filesystem(&names.next)?;
    let next_info = tool::subvolume_info(&names.next)?;
    state.next = Some(record(&next_info, received.received_uuid.as_deref()));
    write_state(&names.state, &state)?;

    // The switch itself.
    if live_exists {
        rename(&names.next, live, rustix::fs::RenameFlags::EXCHANGE)?;
    } else {
        rename(&names.next, live, rustix::fs::RenameFlags::NOREPLACE)?;
    }
    state.previous = if live_exists { state.live.take() } else { None };
    state.live = state.next.take();
    write_state(&names.state, &state)?;

    let replaced = if live_exists {
        // Without records, the replaced subvolume counts as not made by hearth: kept aside.
        let records: Vec<&LiveRecord> = if keep_replaced {
            Vec::new()
        } else {
            state.previous.iter().collect()
        };
        let fate = settle(&names.next, &aside, &records, staging)?;
        state.previous = None;
        write_state(&names.state, &state)?;
        Some(fate)
    } else {
        None
    };
    let mut live_info = tool::subvolume_info(live)?;
    live_info.path = live.to_path_buf();
    Ok(SwitchReport {
        live: live_info,
        replaced,
        leftover,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_beside_the_live_path() {
        let n = LiveNames::new(Path::new("/data/services/gitea")).unwrap();
        assert_eq!(
            n.state,
            Path::new("/data/services/.gitea.hearth-btrfs.json")
        );
        assert_eq!(n.next, Path::new("/data/services/.gitea.hearth-btrfs-next"));
        assert!(LiveNames::new(Path::new("/")).is_err());
    }

    #[test]
    fn state_file_round_trips_and_rejects_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        assert_eq!(read_state(&path).unwrap().version, STATE_VERSION);
        let state = LiveState {
            version: STATE_VERSION,
            live: Some(LiveRecord {
                uuid: "u".into(),
                generation: 7,
                source: Some("r".into()),
            }),
            next: None,
            previous: None,
        };
        write_state(&path, &state).unwrap();
        assert_eq!(read_state(&path).unwrap(), state);
        std::fs::write(&path, br#"{"version":9}"#).unwrap();
        assert!(matches!(
            read_state(&path),
            Err(BtrfsError::BadState { .. })
        ));
        std::fs::write(&path, b"{").unwrap();
        assert!(matches!(
            read_state(&path),
            Err(BtrfsError::BadState { .. })
        ));
    }
}
