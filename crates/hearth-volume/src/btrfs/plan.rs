//! Pure decisions of the btrfs backend: which parent an incremental send uses, which snapshots retention
//! deletes, and whether a replaced live subvolume may be deleted or must be kept aside.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::tool::SubvolInfo;

/// How the next snapshot is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParentChoice {
    /// Incremental (`btrfs send -p parent`): the standby holds `parent`.
    Incremental {
        /// The newest local snapshot the standby holds.
        parent: SubvolInfo,
    },
    /// A full send; `reason` must be logged and counted, never silent.
    Full {
        /// Why no parent could be used.
        reason: FullReason,
    },
}

/// Why a send has to be full.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FullReason {
    /// The standby holds no received snapshot at all (a first sync, or its staging was emptied).
    NoSnapshotsOnStandby,
    /// The standby holds snapshots, but none of them is one of the primary's read-only snapshots (they
    /// were pruned here, or come from another primary).
    NoCommonParent {
        /// How many snapshots the standby reported.
        standby_has_n: usize,
    },
}

impl fmt::Display for FullReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FullReason::NoSnapshotsOnStandby => {
                write!(f, "the standby holds no snapshot of this volume yet")
            }
            FullReason::NoCommonParent { standby_has_n } => write!(
                f,
                "none of the standby's {standby_has_n} snapshot(s) is still held here, so there is no common parent"
            ),
        }
    }
}

/// Chooses the parent of an incremental send: the newest of `local_snapshots` (the primary's snapshots,
/// *without* the one about to be sent) that the standby holds, matched by UUID, never by name.
///
/// `standby_has` are the received UUIDs the standby reports ([`super::received_uuids`]). A local snapshot
/// matches by [`SubvolInfo::send_uuid`], the identity `btrfs send` puts in the stream. Only read-only
/// snapshots can be parents. "Newest" is by the transaction that created the snapshot.
pub fn choose_parent(local_snapshots: &[SubvolInfo], standby_has: &[String]) -> ParentChoice {
    if standby_has.is_empty() {
        return ParentChoice::Full {
            reason: FullReason::NoSnapshotsOnStandby,
        };
    }
    let held = |s: &&SubvolInfo| {
        standby_has
            .iter()
            .any(|u| u.eq_ignore_ascii_case(s.send_uuid()))
    };
    let parent = local_snapshots
        .iter()
        .filter(|s| s.readonly)
        .filter(held)
        .max_by(|a, b| (a.created_generation, a.id).cmp(&(b.created_generation, b.id)));
    match parent {
        Some(parent) => ParentChoice::Incremental {
            parent: parent.clone(),
        },
        None => ParentChoice::Full {
            reason: FullReason::NoCommonParent {
                standby_has_n: standby_has.len(),
            },
        },
    }
}

/// The snapshots retention deletes: all but the newest `keep_last`, except pinned ones. `pinned` are
/// UUIDs (each standby's last common snapshot on the primary; matched against both a snapshot's own and
/// its received UUID), which are never deleted however old. Returned oldest first.
///
/// `keep_last` of 0 keeps nothing but the pinned snapshots; callers that send incrementally want at least
/// 1 (the newest snapshot is the next parent).
pub fn select_for_prune(
    snapshots: &[SubvolInfo],
    keep_last: usize,
    pinned: &[String],
) -> Vec<SubvolInfo> {
    let mut sorted: Vec<SubvolInfo> = snapshots.to_vec();
    super::tool::sort_oldest_first(&mut sorted);
    let cut = sorted.len().saturating_sub(keep_last);
    sorted
        .into_iter()
        .take(cut)
        .filter(|s| {
            !pinned.iter().any(|p| {
                p.eq_ignore_ascii_case(&s.uuid)
                    || s.received_uuid
                        .as_deref()
                        .is_some_and(|r| p.eq_ignore_ascii_case(r))
            })
        })
        .collect()
}

/// What hearth recorded about a live subvolume it created, in the state file next to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRecord {
    /// The subvolume's UUID.
    pub uuid: String,
    /// Its generation once hearth had made it (after a filesystem sync).
    pub generation: u64,
    /// The received UUID of the snapshot it was made from (the primary snapshot's identity).
    pub source: Option<String>,
}

/// What happens to a subvolume that was live and has just been replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplacedAction {
    /// hearth made it and nothing changed it since: delete it.
    Delete,
    /// Keep it aside read-only: it may hold data the primary never had.
    KeepAside(KeepReason),
}

/// Why a replaced subvolume is kept aside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeepReason {
    /// No record says hearth made it (it predates hearth, or the state file was lost).
    NotMadeByHearth,
    /// It was written to after hearth made it (its generation moved). Reading files with `atime` updates
    /// enabled also moves it; see docs/volume-btrfs.md.
    ChangedLocally {
        /// The generation hearth recorded.
        recorded: u64,
        /// The generation found.
        found: u64,
    },
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::NotMadeByHearth => write!(f, "hearth has no record of making it"),
            KeepReason::ChangedLocally { recorded, found } => write!(
                f,
                "it changed on this host since hearth made it (generation {recorded} -> {found})"
            ),
        }
    }
}

/// Decides the fate of the replaced subvolume `found` given hearth's `records` (any record with its UUID
/// counts). Deleting is only allowed for a subvolume hearth made and that is unchanged since.
pub fn decide_replaced(records: &[&LiveRecord], found: &SubvolInfo) -> ReplacedAction {
    match records
        .iter()
        .find(|r| r.uuid.eq_ignore_ascii_case(&found.uuid))
    {
        None => ReplacedAction::KeepAside(KeepReason::NotMadeByHearth),
        Some(r) if r.generation == found.generation => ReplacedAction::Delete,
        Some(r) => ReplacedAction::KeepAside(KeepReason::ChangedLocally {
            recorded: r.generation,
            found: found.generation,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A snapshot named `name`, created in transaction `created`, with a UUID derived from `n`.
    fn snap(n: u8, created: u64, readonly: bool, received: Option<u8>) -> SubvolInfo {
        SubvolInfo {
            path: PathBuf::from(format!("/snaps/s{n}")),
            name: format!("s{n}"),
            uuid: uuid(n),
            parent_uuid: Some(uuid(200)),
            received_uuid: received.map(uuid),
            generation: created,
            created_generation: created,
            id: 256 + u64::from(n),
            readonly,
            created: None,
            fs_path: Some(format!("snaps/s{n}")),
            ctransid: None,
        }
    }

    fn uuid(n: u8) -> String {
        format!("{n:08x}-0000-0000-0000-000000000000")
    }

    #[test]
    fn choose_parent_cases() {
        // (name, local snapshots, standby holds, expected: Ok(parent number) or Err(reason))
        type Case = (
            &'static str,
            Vec<SubvolInfo>,
            Vec<String>,
            Result<u8, FullReason>,
        );
        let cases: Vec<Case> = vec![
            (
                "first sync",
                vec![snap(1, 10, true, None)],
                vec![],
                Err(FullReason::NoSnapshotsOnStandby),
            ),
            (
                "newest common wins, not the newest local",
                vec![
                    snap(1, 10, true, None),
                    snap(2, 20, true, None),
                    snap(3, 30, true, None),
                ],
                vec![uuid(1), uuid(2)],
                Ok(2),
            ),
            (
                "order of input does not matter",
                vec![
                    snap(3, 30, true, None),
                    snap(1, 10, true, None),
                    snap(2, 20, true, None),
                ],
                vec![uuid(2), uuid(1)],
                Ok(2),
            ),
            (
                "standby holds only snapshots pruned here",
                vec![snap(5, 50, true, None)],
                vec![uuid(1), uuid(2), uuid(9)],
                Err(FullReason::NoCommonParent { standby_has_n: 3 }),
            ),
            (
                "a writable subvolume is never a parent",
                vec![snap(1, 10, true, None), snap(2, 20, false, None)],
                vec![uuid(1), uuid(2)],
                Ok(1),
            ),
            (
                "a received snapshot is known by its received UUID",
                vec![snap(4, 40, true, Some(7))],
                vec![uuid(7)],
                Ok(4),
            ),
            (
                "a received snapshot is not matched by its own UUID",
                vec![snap(4, 40, true, Some(7))],
                vec![uuid(4)],
                Err(FullReason::NoCommonParent { standby_has_n: 1 }),
            ),
            (
                "UUIDs match regardless of case",
                vec![snap(10, 10, true, None)],
                vec![uuid(10).to_ascii_uppercase()],
                Ok(10),
            ),
        ];
        for (name, local, has, want) in cases {
            let got = choose_parent(&local, &has);
            match (got, want) {
                (ParentChoice::Incremental { parent }, Ok(n)) => {
                    assert_eq!(parent.name, format!("s{n}"), "{name}")
                }
                (ParentChoice::Full { reason }, Err(r)) => assert_eq!(reason, r, "{name}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn same_name_different_uuid_is_no_parent() {
        // A snapshot re-created under an old name is a different snapshot; names never count.
        let mut local = snap(1, 10, true, None);
        local.uuid = uuid(99);
        assert_eq!(
            choose_parent(&[local], &[uuid(1)]),
            ParentChoice::Full {
                reason: FullReason::NoCommonParent { standby_has_n: 1 }
            }
        );
    }

    #[test]
    fn select_for_prune_cases() {
        let all: Vec<SubvolInfo> = (1..=5)
            .map(|n| snap(n, u64::from(n) * 10, true, None))
            .collect();
        // (name, keep_last, pinned, expected deleted names)
        let cases: Vec<(&str, usize, Vec<String>, Vec<&str>)> = vec![
            ("keep 3", 3, vec![], vec!["s1", "s2"]),
            ("keep more than exist", 9, vec![], vec![]),
            (
                "keep 0 deletes all unpinned",
                0,
                vec![uuid(5)],
                vec!["s1", "s2", "s3", "s4"],
            ),
            ("pinned old survives", 2, vec![uuid(1)], vec!["s2", "s3"]),
            (
                "pinned inside the kept ones changes nothing",
                2,
                vec![uuid(5)],
                vec!["s1", "s2", "s3"],
            ),
        ];
        for (name, keep, pinned, want) in cases {
            let mut shuffled = all.clone();
            shuffled.reverse();
            let got: Vec<String> = select_for_prune(&shuffled, keep, &pinned)
                .into_iter()
                .map(|s| s.name)
                .collect();
            assert_eq!(got, want, "{name}");
        }
        // On a standby, pins are the primary's UUIDs, which its snapshots carry as received UUIDs.
        let received = vec![snap(1, 10, true, Some(41)), snap(2, 20, true, Some(42))];
        assert!(select_for_prune(&received, 0, &[uuid(41), uuid(42)]).is_empty());
    }

    #[test]
    fn decide_replaced_cases() {
        let rec = LiveRecord {
            uuid: uuid(1),
            generation: 10,
            source: None,
        };
        let other = LiveRecord {
            uuid: uuid(2),
            generation: 99,
            source: None,
        };
        let mut found = snap(1, 5, false, None);
        found.generation = 10;
        assert_eq!(
            decide_replaced(&[&other, &rec], &found),
            ReplacedAction::Delete
        );
        found.generation = 11;
        assert_eq!(
            decide_replaced(&[&rec], &found),
            ReplacedAction::KeepAside(KeepReason::ChangedLocally {
                recorded: 10,
                found: 11
            })
        );
        assert_eq!(
            decide_replaced(&[&other], &found),
            ReplacedAction::KeepAside(KeepReason::NotMadeByHearth)
        );
        assert_eq!(
            decide_replaced(&[], &found),
            ReplacedAction::KeepAside(KeepReason::NotMadeByHearth)
        );
    }
}
