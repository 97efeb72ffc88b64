//! A tiny scoped parallel map for I/O-bound fan-out (loading index and
//! snapshot objects), bounded to a few threads so a repository with thousands
//! of objects does not spawn thousands of threads.

/// Applies `f` to every item on up to `threads` threads, preserving order.
pub fn map<T, R, F>(items: Vec<T>, threads: usize, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    let n = items.len();
    if n <= 1 {
        return items.into_iter().map(f).collect();
    }
    let threads = threads.clamp(1, n);
    let queue = std::sync::Mutex::new(items.into_iter().enumerate());
    let results = std::sync::Mutex::new((0..n).map(|_| None).collect::<Vec<Option<R>>>());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let next = queue.lock().expect("queue poisoned").next();
                let Some((i, item)) = next else { break };
                let r = f(item);
                results.lock().expect("results poisoned")[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .expect("results poisoned")
        .into_iter()
        .map(|r| r.expect("every item processed"))
        .collect()
}

/// Worker threads for CPU work: one per core, at least two so I/O overlaps.
pub fn worker_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}

/// Threads for work that waits on the store (loading objects, reading packs
/// for restore and check): at least one per core, more when the backend
/// serves many requests at once, so network latency overlaps.
pub fn io_threads(backend: &std::sync::Arc<dyn crate::Backend>) -> usize {
    worker_count().max(backend.concurrency().min(64))
}

/// Threads for reading whole packs (restore, `check --read-data`). Each
/// holds a pack's ciphertext and plaintext (about 16 MiB at the default
/// pack size) while it works, so their number is capped at four whatever
/// the backend's concurrency: enough to keep a remote store busy (four
/// 8 MiB transfers in flight), while peak memory stays that of a local
/// restore plus two packs.
pub fn pack_threads(backend: &std::sync::Arc<dyn crate::Backend>) -> usize {
    const PACKS_IN_FLIGHT: usize = 4;
    worker_count().max(backend.concurrency().min(PACKS_IN_FLIGHT))
}
