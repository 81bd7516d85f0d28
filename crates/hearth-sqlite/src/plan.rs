//! Pure decisions over a replica's file listing: which files a restore applies, what to compact, what to delete.
//!
//! Nothing here does IO. The replication loop and the restore command feed in what a replica holds and
//! carry out what comes back, so every rule can be tested with plain data.

use std::time::{Duration, SystemTime};

use crate::layout::{FileInfo, SNAPSHOT_LEVEL};

/// How far a restore should go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Everything the replica holds.
    Latest,
    /// Up to and including this transaction id.
    Txid(u64),
    /// The last transaction captured at or before this time.
    Timestamp(SystemTime),
}

/// Why no restore plan could be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The replica holds no LTX file at all.
    #[error("the replica holds no LTX files")]
    Empty,
    /// The replica holds files, but none at or before the target.
    #[error(
        "the replica holds no transaction at or before the requested point (its first file starts at TXID {first:#x})"
    )]
    NotAvailable { first: u64 },
    /// The chain of files does not start at a full snapshot or at TXID 1.
    #[error(
        "the replica has no snapshot to start from: its earliest file starts at TXID {first:#x}, not 1"
    )]
    NoStart { first: u64 },
    /// There is a hole in the chain of files.
    #[error(
        "the replica's files are not contiguous: they reach TXID {have:#x}, but the next file starts at TXID {next:#x}"
    )]
    Gap { have: u64, next: u64 },
    /// A TXID target beyond what the replica holds.
    #[error("the replica reaches TXID {have:#x}, not the requested TXID {want:#x}")]
    TxidBeyondEnd { have: u64, want: u64 },
}

/// Chooses the files that rebuild the database at `target`, in the order to apply them.
///
/// Like Litestream's `CalcRestorePlan`, it starts from the newest snapshot at or before the target (or
/// from TXID 1), then repeatedly takes the file that continues the chain and reaches furthest, preferring
/// higher levels on ties so that fewer, larger files are read. Unlike Litestream it also refuses a gap
/// before a timestamp or TXID target, never only at the end.
pub fn restore_plan(files: &[FileInfo], target: Target) -> Result<Vec<FileInfo>, PlanError> {
    let first = files
        .iter()
        .map(|f| f.min_txid)
        .min()
        .ok_or(PlanError::Empty)?;
    let eligible = |f: &FileInfo| match target {
        Target::Latest => true,
        Target::Txid(txid) => f.max_txid <= txid,
        Target::Timestamp(t) => f.timestamp <= t,
    };

    let mut plan: Vec<FileInfo> = Vec::new();
    if let Some(snapshot) = files
        .iter()
        .filter(|f| f.level == SNAPSHOT_LEVEL && f.min_txid == 1 && eligible(f))
        .max_by_key(|f| f.max_txid)
    {
        plan.push(snapshot.clone());
    }
    let mut reached = plan.last().map_or(0, |f| f.max_txid);
    loop {
        let next = files
            .iter()
            .filter(|f| f.level != SNAPSHOT_LEVEL && eligible(f))
            .filter(|f| f.min_txid <= reached + 1 && f.max_txid > reached)
            // A file that starts before `reached + 1` overlaps pages we already have; that is fine because
            // LTX files carry whole pages and later versions win, but it must not start before TXID 1's chain.
            .max_by(|a, b| {
                a.max_txid
                    .cmp(&b.max_txid)
                    .then(b.min_txid.cmp(&a.min_txid))
                    .then(a.level.cmp(&b.level))
            });
        match next {
            Some(f) => {
                reached = f.max_txid;
                plan.push(f.clone());
            }
            None => break,
        }
    }

    if plan.is_empty() {
        return Err(if files.iter().any(&eligible) {
            PlanError::NoStart { first }
        } else {
            PlanError::NotAvailable { first }
        });
    }
    if plan[0].min_txid != 1 {
        return Err(PlanError::NoStart {
            first: plan[0].min_txid,
        });
    }
    // Any eligible file that starts beyond what the chain reached means a hole in the replica.
    if let Some(next) = files
        .iter()
        .filter(|f| f.level != SNAPSHOT_LEVEL && eligible(f) && f.min_txid > reached + 1)
        .map(|f| f.min_txid)
        .min()
    {
        return Err(PlanError::Gap {
            have: reached,
            next,
        });
    }
    if let Target::Txid(want) = target
        && reached < want
    {
        return Err(PlanError::TxidBeyondEnd {
            have: reached,
            want,
        });
    }
    Ok(plan)
}

/// How compaction is configured (Litestream 0.5's defaults: 30 s, 5 min, 1 h and a daily snapshot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Interval of levels 1, 2, 3, ... in order.
    pub levels: Vec<Duration>,
    pub snapshot_interval: Duration,
    pub snapshot_retention: Duration,
    /// How long level-0 files stay after a level-1 file covers them.
    pub l0_retention: Duration,
    pub retention_enabled: bool,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            levels: vec![
                Duration::from_secs(30),
                Duration::from_secs(300),
                Duration::from_secs(3600),
            ],
            snapshot_interval: Duration::from_secs(24 * 3600),
            snapshot_retention: Duration::from_secs(24 * 3600),
            l0_retention: Duration::from_secs(300),
            retention_enabled: true,
        }
    }
}

/// One piece of maintenance on a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Maintenance {
    /// Merge `inputs` (contiguous, in order) into one file at `level` covering `min_txid..=max_txid`.
    Compact {
        level: u8,
        inputs: Vec<FileInfo>,
        min_txid: u64,
        max_txid: u64,
    },
    /// Delete files that no restore within the retention window needs.
    Delete { files: Vec<FileInfo> },
}

/// When each level was last compacted, so that compaction runs once per interval and not on every tick.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactionClock {
    /// Indexed by level; `None` means never in this process's life.
    pub last: Vec<Option<SystemTime>>,
}

impl CompactionClock {
    fn due(&self, level: u8, interval: Duration, now: SystemTime) -> bool {
        match self.last.get(usize::from(level)).copied().flatten() {
            None => true,
            Some(t) => now.duration_since(t).map_or(true, |d| d >= interval),
        }
    }

    /// Records that `level` was compacted at `now`.
    pub fn mark(&mut self, level: u8, now: SystemTime) {
        let i = usize::from(level);
        if self.last.len() <= i {
            self.last.resize(i + 1, None);
        }
        self.last[i] = Some(now);
    }
}

/// Decides the next piece of maintenance, if any: compaction of the lowest due level first, then a
/// snapshot, then deletions. The caller carries it out, updates its listing and asks again.
pub fn next_maintenance(
    files: &[FileInfo],
    policy: &CompactionPolicy,
    clock: &CompactionClock,
    now: SystemTime,
) -> Option<Maintenance> {
    let max_at = |level: u8| {
        files
            .iter()
            .filter(|f| f.level == level)
            .map(|f| f.max_txid)
            .max()
            .unwrap_or(0)
    };
    let top = files.iter().map(|f| f.max_txid).max().unwrap_or(0);

    for (i, interval) in policy.levels.iter().enumerate() {
        let level = (i + 1) as u8;
        if !clock.due(level, *interval, now) {
            continue;
        }
        let covered = max_at(level);
        let mut inputs: Vec<FileInfo> = files
            .iter()
            .filter(|f| f.level == level - 1 && f.max_txid > covered)
            .cloned()
            .collect();
        inputs.sort_by_key(|f| f.min_txid);
        // Only a contiguous run that continues this level's chain can be merged.
        let mut run = Vec::new();
        let mut reached = if covered == 0 {
            inputs.first().map_or(0, |f| f.min_txid - 1)
        } else {
            covered
        };
        for f in inputs {
            if f.min_txid > reached + 1 {
                break;
            }
            if f.max_txid > reached {
                reached = f.max_txid;
                run.push(f);
            }
        }
        // A run of one file would only copy it to the next level: for a full image of a large database that
        // is the whole database again, per level. It waits until there is something to merge it with.
        if run.len() < 2 {
            continue;
        }
        if let (Some(first), Some(last)) = (run.first(), run.last()) {
            let (min_txid, max_txid) = (first.min_txid, last.max_txid);
            return Some(Maintenance::Compact {
                level,
                inputs: run,
                min_txid,
                max_txid,
            });
        }
    }

    let newest_snapshot = files
        .iter()
        .filter(|f| f.level == SNAPSHOT_LEVEL)
        .max_by_key(|f| f.max_txid);
    let snapshot_due = match newest_snapshot {
        // Without a snapshot the chain starts at TXID 1, which is a full image already; the first snapshot is
        // due one interval after the oldest file, not at once, so a new replica is not uploaded twice.
        None => {
            let oldest = files.iter().map(|f| f.timestamp).min();
            top > 0
                && oldest.is_some_and(|t| {
                    now.duration_since(t)
                        .is_ok_and(|d| d >= policy.snapshot_interval)
                })
                && clock.due(SNAPSHOT_LEVEL, policy.snapshot_interval, now)
        }
        Some(s) => {
            s.max_txid < top
                && now
                    .duration_since(s.timestamp)
                    .is_ok_and(|d| d >= policy.snapshot_interval)
                && clock.due(SNAPSHOT_LEVEL, policy.snapshot_interval, now)
        }
    };
    if snapshot_due && let Ok(inputs) = restore_plan(files, Target::Latest) {
        return Some(Maintenance::Compact {
            level: SNAPSHOT_LEVEL,
            inputs,
            min_txid: 1,
            max_txid: top,
        });
    }

    if policy.retention_enabled {
        let deletions = retention(files, policy, now);
        if !deletions.is_empty() {
            return Some(Maintenance::Delete { files: deletions });
        }
    }
    None
}

/// The files that retention may delete now. It never deletes what the newest restore needs, the newest
/// snapshot, or anything when the replica's chain cannot be planned.
pub fn retention(files: &[FileInfo], policy: &CompactionPolicy, now: SystemTime) -> Vec<FileInfo> {
    let Ok(latest) = restore_plan(files, Target::Latest) else {
        return Vec::new();
    };
    let needed = |f: &FileInfo| latest.iter().any(|p| p == f);
    let age = |f: &FileInfo| now.duration_since(f.timestamp).unwrap_or_default();
    let mut snapshots: Vec<&FileInfo> =
        files.iter().filter(|f| f.level == SNAPSHOT_LEVEL).collect();
    snapshots.sort_by_key(|f| f.max_txid);
    // The oldest snapshot still inside the retention window; everything a restore from it needs stays.
    let oldest_kept = snapshots
        .iter()
        .find(|s| age(s) < policy.snapshot_retention)
        .or(snapshots.last())
        .map(|s| s.max_txid);

    let level1_max = files
        .iter()
        .filter(|f| f.level == 1)
        .map(|f| f.max_txid)
        .max()
        .unwrap_or(0);
    files
        .iter()
        .filter(|f| !needed(f))
        .filter(|f| {
            if f.level == SNAPSHOT_LEVEL {
                oldest_kept.is_some_and(|kept| f.max_txid < kept)
            } else if oldest_kept.is_some_and(|kept| f.max_txid <= kept) {
                true
            } else {
                f.level == 0 && f.max_txid <= level1_max && age(f) >= policy.l0_retention
            }
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn f(level: u8, min: u64, max: u64, secs: u64) -> FileInfo {
        FileInfo {
            level,
            min_txid: min,
            max_txid: max,
            size: 100,
            timestamp: at(secs),
        }
    }

    fn ranges(plan: &[FileInfo]) -> Vec<(u8, u64, u64)> {
        plan.iter()
            .map(|f| (f.level, f.min_txid, f.max_txid))
            .collect()
    }

    #[test]
    fn restore_plans() {
        let l0 = |n: u64| f(0, n, n, n);
        type Case = (
            &'static str,
            Vec<FileInfo>,
            Target,
            Result<Vec<(u8, u64, u64)>, PlanError>,
        );
        let cases: Vec<Case> = vec![
            (
                "empty replica",
                vec![],
                Target::Latest,
                Err(PlanError::Empty),
            ),
            (
                "level 0 chain",
                vec![l0(1), l0(2), l0(3)],
                Target::Latest,
                Ok(vec![(0, 1, 1), (0, 2, 2), (0, 3, 3)]),
            ),
            (
                "prefers the compacted file",
                vec![l0(1), l0(2), l0(3), f(1, 1, 3, 3), l0(4)],
                Target::Latest,
                Ok(vec![(1, 1, 3), (0, 4, 4)]),
            ),
            (
                "starts from the newest snapshot",
                vec![f(9, 1, 2, 2), f(9, 1, 4, 4), f(1, 1, 3, 3), l0(4), l0(5)],
                Target::Latest,
                Ok(vec![(9, 1, 4), (0, 5, 5)]),
            ),
            (
                "snapshot after the target is not used",
                vec![f(9, 1, 4, 4), l0(1), l0(2), l0(3), l0(4)],
                Target::Txid(2),
                Ok(vec![(0, 1, 1), (0, 2, 2)]),
            ),
            (
                "gap",
                vec![l0(1), l0(2), l0(4)],
                Target::Latest,
                Err(PlanError::Gap { have: 2, next: 4 }),
            ),
            (
                "no start",
                vec![l0(2), l0(3)],
                Target::Latest,
                Err(PlanError::NoStart { first: 2 }),
            ),
            (
                "timestamp",
                vec![l0(1), l0(2), l0(3)],
                Target::Timestamp(at(2)),
                Ok(vec![(0, 1, 1), (0, 2, 2)]),
            ),
            (
                "timestamp before everything",
                vec![l0(5), l0(6)],
                Target::Timestamp(at(1)),
                Err(PlanError::NotAvailable { first: 5 }),
            ),
            (
                "txid beyond the end",
                vec![l0(1), l0(2)],
                Target::Txid(7),
                Err(PlanError::TxidBeyondEnd { have: 2, want: 7 }),
            ),
            (
                "a compacted file ending past the txid target is skipped",
                vec![l0(1), l0(2), l0(3), f(1, 1, 3, 3)],
                Target::Txid(2),
                Ok(vec![(0, 1, 1), (0, 2, 2)]),
            ),
        ];
        for (name, files, target, want) in cases {
            let got = restore_plan(&files, target).map(|p| ranges(&p));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn compaction_merges_contiguous_level0_runs_once_per_interval() {
        let policy = CompactionPolicy::default();
        let files = vec![f(0, 1, 1, 1), f(0, 2, 2, 2), f(0, 3, 3, 3)];
        let mut clock = CompactionClock::default();
        let m = next_maintenance(&files, &policy, &clock, at(10)).unwrap();
        assert!(
            matches!(
                m,
                Maintenance::Compact {
                    level: 1,
                    min_txid: 1,
                    max_txid: 3,
                    ..
                }
            ),
            "{m:?}"
        );

        // Once level 1 covers level 0 and was just compacted, and snapshots were just taken, nothing is due.
        let mut after = files.clone();
        after.push(f(1, 1, 3, 3));
        clock.mark(1, at(10));
        clock.mark(2, at(10));
        clock.mark(3, at(10));
        clock.mark(SNAPSHOT_LEVEL, at(10));
        assert_eq!(next_maintenance(&after, &policy, &clock, at(11)), None);

        // Level 2 gets its turn when its interval has passed and level 1 holds two files to merge.
        assert!(
            !matches!(
                next_maintenance(&after, &policy, &clock, at(10 + 300)),
                Some(Maintenance::Compact { .. })
            ),
            "a single file is not copied up"
        );
        after.extend([f(0, 4, 4, 40), f(0, 5, 5, 50), f(1, 4, 5, 50)]);
        let m = next_maintenance(&after, &policy, &clock, at(10 + 300)).unwrap();
        assert!(
            matches!(
                m,
                Maintenance::Compact {
                    level: 2,
                    min_txid: 1,
                    max_txid: 5,
                    ..
                }
            ),
            "{m:?}"
        );
    }

    #[test]
    fn compaction_stops_at_a_gap() {
        let files = vec![f(1, 1, 3, 3), f(0, 4, 4, 4), f(0, 5, 5, 5), f(0, 7, 7, 7)];
        let m = next_maintenance(
            &files,
            &CompactionPolicy::default(),
            &CompactionClock::default(),
            at(10),
        )
        .unwrap();
        assert!(
            matches!(
                m,
                Maintenance::Compact {
                    level: 1,
                    min_txid: 4,
                    max_txid: 5,
                    ..
                }
            ),
            "{m:?}"
        );
    }

    #[test]
    fn snapshot_is_due_once_a_day_and_merges_the_whole_chain() {
        let mut clock = CompactionClock::default();
        for level in 1..=3 {
            clock.mark(level, at(0));
        }
        let files = vec![f(0, 1, 1, 1), f(0, 2, 2, 2)];
        // Not at once: TXID 1 is already a full image.
        assert_eq!(
            next_maintenance(&files, &CompactionPolicy::default(), &clock, at(5)),
            None
        );
        let day = 24 * 3600;
        for level in 1..=3 {
            clock.mark(level, at(day));
        }
        let m =
            next_maintenance(&files, &CompactionPolicy::default(), &clock, at(1 + day)).unwrap();
        match m {
            Maintenance::Compact {
                level,
                inputs,
                min_txid,
                max_txid,
            } => {
                assert_eq!((level, min_txid, max_txid), (SNAPSHOT_LEVEL, 1, 2));
                assert_eq!(inputs.len(), 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retention_keeps_what_restores_need() {
        let day = 24 * 3600;
        let policy = CompactionPolicy::default();
        let files = vec![
            f(9, 1, 10, 10),
            f(1, 1, 10, 10),
            f(1, 11, 20, day + 20),
            f(9, 1, 20, day + 20),
            f(0, 21, 21, day + 21),
            f(0, 22, 22, 2 * day + 22),
            f(1, 21, 21, day + 21),
        ];
        let deleted = ranges(&retention(&files, &policy, at(2 * day + 100)));
        // The old snapshot and the files it alone needed go; the newest snapshot, the level-0 file that a
        // level-1 file covers for longer than the L0 retention goes; the newest level-0 file stays.
        assert_eq!(
            deleted,
            vec![(9, 1, 10), (1, 1, 10), (1, 11, 20), (0, 21, 21)]
        );

        // A replica with a gap is never pruned.
        let broken = vec![f(0, 1, 1, 1), f(0, 3, 3, 3), f(1, 1, 1, 1)];
        assert!(retention(&broken, &policy, at(2 * day)).is_empty());
    }
}
