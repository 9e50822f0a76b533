//! Runs workers for a fixed time and summarises what they measured; shared by the benchmarks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Runs `workers` threads of `work(worker, stop)` for `dur`, then raises `stop`. Each returns
/// the latencies of the operations it completed. Returns ops/s, p50 and p99 in microseconds.
pub fn run_for<F>(workers: usize, dur: Duration, work: F) -> (f64, f64, f64)
where
    F: Fn(usize, &AtomicBool) -> Vec<Duration> + Send + Sync + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(work);
    let start = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (stop, work) = (Arc::clone(&stop), Arc::clone(&work));
            std::thread::spawn(move || work(w, &stop))
        })
        .collect();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    (all.len() as f64 / secs, pct(0.50), pct(0.99))
}
