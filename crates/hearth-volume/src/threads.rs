//! Running blocking file-system work on a few threads at once.
//!
//! With cold caches a file system serves several requests in flight faster than the same
//! requests one after another (the disk queue stays full), even on two cores: capture reads and
//! stats changed files this way, and an in-place apply moves its entries this way.

/// `f` of every item, in order, computed on `threads` threads taking items one at a time: for
/// work that mostly waits on the disk (with cold caches, requests in flight at once are served
/// faster than one after another, even on two cores).
pub(crate) fn on_threads<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<(usize, R)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.min(items.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut got = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        got.push((i, f(item)));
                    }
                    got
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}
