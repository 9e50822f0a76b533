//! CPU time per thread of this process, grouped by what the threads do, so a bench can say
//! where a row's CPU went (the polling thread, the runtime's workers, librdkafka's threads,
//! the store's own threads) and not only how much there was.
//!
//! Read from `/proc/self/task/*/schedstat` (nanoseconds on the CPU) and `comm` (the thread's
//! name, cut to 15 bytes by the kernel). A thread that ended between two snapshots is missing
//! from the second and is not counted; a thread started between them counts from zero.

use std::collections::HashMap;

/// The thread groups, in the order the bench prints them.
pub const GROUPS: [&str; 5] = [
    "bench thread",
    "polling thread",
    "runtime workers",
    "librdkafka",
    "store threads",
];

/// Which of [`GROUPS`] a thread named `comm` belongs to; `None`: none of them (the mock
/// broker's threads, tokio's blocking pool).
fn group(comm: &str) -> Option<usize> {
    if comm.starts_with("rdk:mock") {
        None
    } else if comm.starts_with("idemkv-kafka-po") {
        Some(1)
    } else if comm.starts_with("tokio-rt-worker") {
        Some(2)
    } else if comm.starts_with("rdk:") {
        Some(3)
    } else if comm.starts_with("idemkv-") {
        Some(4)
    } else if comm.starts_with("kafka-") || comm == "main" {
        // The bench's own thread (cargo names the bench binary `kafka-<hash>`): the plain
        // loop runs on it.
        Some(0)
    } else {
        None
    }
}

/// Nanoseconds on the CPU so far, per live thread (by thread id), with the thread's group.
pub type Snapshot = HashMap<u64, (Option<usize>, u64)>;

/// The live threads' CPU time now (empty where there is no procfs).
pub fn snapshot() -> Snapshot {
    let mut out = Snapshot::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let Some(tid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("schedstat")),
        ) else {
            continue;
        };
        let Some(ns) = stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
        else {
            continue;
        };
        out.insert(tid, (group(comm.trim_end()), ns));
    }
    out
}

/// CPU seconds per group between two snapshots.
pub fn spent(before: &Snapshot, after: &Snapshot) -> [f64; GROUPS.len()] {
    let mut by = [0.0; GROUPS.len()];
    for (tid, (g, ns)) in after {
        let Some(g) = g else { continue };
        let was = before.get(tid).map_or(0, |(_, ns)| *ns);
        by[*g] += ns.saturating_sub(was) as f64 / 1e9;
    }
    by
}
