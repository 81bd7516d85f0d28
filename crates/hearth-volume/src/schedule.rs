//! When the primary pushes again: the pure schedule of `--every` and `--continuous`, and the
//! filesystem watcher (inotify through the `notify` crate) that feeds `--continuous`.

use std::path::Path;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};

/// How pushes repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Push at least this often (also without seen changes: a watcher can miss changes, for
    /// example on a network filesystem, and a standby may have come back).
    pub every: Option<Duration>,
    /// Push after changes once the volume has been quiet this long (`--continuous`).
    pub quiet: Option<Duration>,
    /// Wait after a failed push before trying again.
    pub retry: Duration,
}

/// What the loop knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopState {
    /// When the last push ended.
    pub last_push: Instant,
    /// Whether it failed.
    pub last_failed: bool,
    /// The newest change seen since the last push started, if any.
    pub last_change: Option<Instant>,
}

/// What to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Push now.
    Push,
    /// Wait until this instant (or a change), then ask again.
    WaitUntil(Instant),
    /// Nothing will ever be due (no repetition configured).
    Stop,
}

/// The next step, from the schedule and what happened. Pure.
pub fn next(schedule: &Schedule, st: &LoopState, now: Instant) -> Next {
    let mut due: Option<Instant> = None;
    let mut earliest = |t: Instant| due = Some(due.map_or(t, |d: Instant| d.min(t)));
    if st.last_failed && (schedule.every.is_some() || schedule.quiet.is_some()) {
        earliest(st.last_push + schedule.retry);
    }
    if let Some(every) = schedule.every {
        earliest(st.last_push + every);
    }
    if let (Some(quiet), Some(change)) = (schedule.quiet, st.last_change) {
        earliest(change + quiet);
    }
    match due {
        None => Next::Stop,
        Some(t) if t <= now => Next::Push,
        Some(t) => Next::WaitUntil(t),
    }
}

/// Watches a volume recursively and reports that something changed. Events are collapsed: the
/// loop only needs to know when the last change happened.
pub struct ChangeWatcher {
    _watcher: notify::RecommendedWatcher,
    rx: tokio::sync::mpsc::Receiver<()>,
}

impl std::fmt::Debug for ChangeWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangeWatcher")
    }
}

impl ChangeWatcher {
    /// Starts watching `root` and everything below it.
    pub fn new(root: &Path) -> Result<Self, notify::Error> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Access events (reads) change nothing; everything else, errors included (an
                // overflowed queue means changes were lost), counts as a change.
                let relevant = match &event {
                    Ok(e) => !matches!(e.kind, notify::EventKind::Access(_)),
                    Err(_) => true,
                };
                if relevant {
                    // A full channel already says "changed"; dropping this event loses nothing.
                    let _ = tx.try_send(());
                }
            })?;
        watcher.watch(root, RecursiveMode::Recursive)?;
        Ok(ChangeWatcher {
            _watcher: watcher,
            rx,
        })
    }

    /// Waits for the next change.
    pub async fn changed(&mut self) {
        if self.rx.recv().await.is_none() {
            // The watcher thread is gone; never report a change again.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_cases() {
        let t0 = Instant::now();
        let s = |n: u64| Duration::from_secs(n);
        let every = Schedule {
            every: Some(s(300)),
            quiet: None,
            retry: s(10),
        };
        let cont = Schedule {
            every: Some(s(300)),
            quiet: Some(s(2)),
            retry: s(10),
        };
        let once = Schedule {
            every: None,
            quiet: None,
            retry: s(10),
        };
        let st = |failed, change: Option<u64>| LoopState {
            last_push: t0,
            last_failed: failed,
            last_change: change.map(|c| t0 + s(c)),
        };
        let cases = [
            (
                "every: not due",
                every,
                st(false, None),
                10,
                Next::WaitUntil(t0 + s(300)),
            ),
            ("every: due", every, st(false, None), 300, Next::Push),
            (
                "every: failed retries sooner",
                every,
                st(true, None),
                10,
                Next::Push,
            ),
            (
                "every: changes ignored",
                every,
                st(false, Some(1)),
                10,
                Next::WaitUntil(t0 + s(300)),
            ),
            (
                "continuous: change not yet quiet",
                cont,
                st(false, Some(5)),
                6,
                Next::WaitUntil(t0 + s(7)),
            ),
            (
                "continuous: change quiet",
                cont,
                st(false, Some(5)),
                7,
                Next::Push,
            ),
            (
                "continuous: no change",
                cont,
                st(false, None),
                6,
                Next::WaitUntil(t0 + s(300)),
            ),
            ("once: stop", once, st(false, Some(1)), 6, Next::Stop),
        ];
        for (name, sched, state, at, want) in cases {
            assert_eq!(next(&sched, &state, t0 + s(at)), want, "{name}");
        }
    }

    #[tokio::test]
    async fn watcher_sees_a_write() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let mut w = ChangeWatcher::new(dir.path()).unwrap();
        std::fs::write(dir.path().join("sub/f"), b"x").unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("a write below the root is reported");
    }
}
