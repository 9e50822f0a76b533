//! The durable half of `compare`: begin + complete with `Durability::Immediate` at 1, 16 and 64
//! concurrent callers, side by side with
//! - `idemkv-deferred`: the same with [`LeaseSync::Deferred`]: the lease is not waited for, the
//!   completion's `fdatasync` covers it (one wait per request);
//! - `raw-log`: the physical limit — a minimal crc-framed append log with the same group commit
//!   (one writer, one `write` + one `fdatasync` per group, preallocated file), no index, doing
//!   the same two durable appends per request as idemkv (the lease, then the completion);
//! - `raw-log-1`: the same log, one append of the lease and one durable append of the
//!   completion per request (the deferred mode's limit);
//! - `redb-1`: redb used directly, one write transaction (Immediate) per request;
//! - `redb-100`: redb, one transaction per 100 requests of a caller.
//!
//! Each system runs for a fixed time per caller count; latency is per request (from its start
//! to its durable acknowledgement).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use idemkv::{Begin, Durability, Fingerprint, Key, LeaseSync, Store};
use parking_lot::{Condvar, Mutex};
use redb::TableDefinition;

const RESPONSE: &[u8] = b"201 {\"id\":\"3f1c7a52\"}";
const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("t");

/// One result row.
pub struct Row {
    pub system: &'static str,
    pub callers: usize,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// A system under test: `op(caller, i, latencies)` performs request `i` of a caller and pushes
/// the latency of every request it acknowledged.
type Op = Arc<dyn Fn(usize, u64, &mut Vec<Duration>) + Send + Sync>;

fn run(callers: usize, dur: Duration, op: Op) -> (f64, f64, f64) {
    super::timed::run_for(callers, dur, move |c, stop| {
        let mut lat = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            op(c, i, &mut lat);
            i += 1;
        }
        lat
    })
}

/// A caller's requests waiting for their redb transaction: key and start time.
struct Pending(Vec<(String, Instant)>);

/// The raw limit: an append-only, crc-framed log with group commit.
struct RawLog {
    state: Mutex<(Vec<u8>, u64)>, // pending bytes, last seq appended
    work: Condvar,
    durable: Mutex<u64>,
    done: Condvar,
}

impl RawLog {
    fn start(file: File) -> Arc<RawLog> {
        let log = Arc::new(RawLog {
            state: Mutex::new((Vec::new(), 0)),
            work: Condvar::new(),
            durable: Mutex::new(0),
            done: Condvar::new(),
        });
        let l = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut offset = 0u64;
            loop {
                let (buf, last) = {
                    let mut st = l.state.lock();
                    while st.0.is_empty() {
                        if l.work.wait_for(&mut st, Duration::from_secs(5)).timed_out()
                            && Arc::strong_count(&l) == 1
                        {
                            return;
                        }
                    }
                    (std::mem::take(&mut st.0), st.1)
                };
                if file.write_all_at(&buf, offset).is_err() || file.sync_data().is_err() {
                    return;
                }
                offset += buf.len() as u64;
                *l.durable.lock() = last;
                l.done.notify_all();
            }
        });
        log
    }

    /// Appends a crc-framed record; returns its sequence number.
    fn append(&self, payload: &[u8]) -> u64 {
        let seq = {
            let mut st = self.state.lock();
            st.1 += 1;
            let crc = crc32fast::hash(payload);
            st.0.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            st.0.extend_from_slice(&crc.to_le_bytes());
            st.0.extend_from_slice(payload);
            st.1
        };
        self.work.notify_one();
        seq
    }

    /// Appends a crc-framed record and waits until it is durable.
    fn append_durable(&self, payload: &[u8]) {
        let seq = self.append(payload);
        let mut d = self.durable.lock();
        while *d < seq {
            self.done.wait(&mut d);
        }
    }
}

fn preallocated(dir: &std::path::Path, name: &str) -> File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join(name))
        .expect("bench file");
    f.set_len(1 << 30).expect("preallocate");
    // Touch the pages so the filesystem has allocated them, like a reused segment.
    f.sync_all().expect("sync");
    f
}

pub fn run_all(quick: bool) -> Vec<Row> {
    let dur = if quick {
        Duration::from_millis(1500)
    } else {
        Duration::from_secs(5)
    };
    let mut rows = Vec::new();
    // The unit of durability: one 4 KiB write and one fdatasync into a preallocated file.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = Arc::new(preallocated(dir.path(), "fsync.bin"));
    let f = Arc::clone(&file);
    let (ops, p50, p99) = run(
        1,
        dur,
        Arc::new(move |_, i, lat| {
            let t = Instant::now();
            if f.write_all_at(&[7u8; 4096], (i % 4096) * 4096).is_ok() && f.sync_data().is_ok() {
                lat.push(t.elapsed());
            }
        }),
    );
    rows.push(Row {
        system: "fdatasync",
        callers: 1,
        ops_per_sec: ops,
        p50_us: p50,
        p99_us: p99,
    });
    for callers in [1usize, 16, 64] {
        let fp = Fingerprint::of(b"POST /orders {}");
        // idemkv, Immediate, with the lease waited for and deferred.
        for (name, sync) in [
            ("idemkv", LeaseSync::Synced),
            ("idemkv-deferred", LeaseSync::Deferred),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::builder()
                .durability(Durability::Immediate)
                .open(dir.path())
                .expect("open")
                .with_lease_sync(sync);
            let s = store.clone();
            let (ops, p50, p99) = run(
                callers,
                dur,
                Arc::new(move |c, i, lat| {
                    let t = Instant::now();
                    let id = format!("{c}-{i}");
                    if let Ok(Begin::Acquired(l)) =
                        s.blocking_begin(Key::new("bench", &id), fp, Duration::from_secs(30))
                        && s.blocking_complete(&l, RESPONSE, None).is_ok()
                    {
                        lat.push(t.elapsed());
                    }
                }),
            );
            drop(store);
            rows.push(Row {
                system: name,
                callers,
                ops_per_sec: ops,
                p50_us: p50,
                p99_us: p99,
            });
        }

        // The raw log: the lease appended with a wait for it (two durable appends, as
        // `Synced`) or without (one, as `Deferred`), then the completion durably.
        for (name, wait_for_lease) in [("raw-log-1", false), ("raw-log", true)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = RawLog::start(preallocated(dir.path(), "raw.log"));
            let l = Arc::clone(&log);
            let (ops, p50, p99) = run(
                callers,
                dur,
                Arc::new(move |c, i, lat| {
                    let t = Instant::now();
                    let id = format!("{c}-{i}");
                    if wait_for_lease {
                        l.append_durable(id.as_bytes());
                    } else {
                        l.append(id.as_bytes());
                    }
                    let mut rec = id.into_bytes();
                    rec.extend_from_slice(RESPONSE);
                    l.append_durable(&rec);
                    lat.push(t.elapsed());
                }),
            );
            rows.push(Row {
                system: name,
                callers,
                ops_per_sec: ops,
                p50_us: p50,
                p99_us: p99,
            });
        }

        // redb, one transaction per request, and per 100 requests.
        for (name, batch) in [("redb-1", 1u64), ("redb-100", 100)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = Arc::new(redb::Database::create(dir.path().join("db.redb")).expect("redb"));
            let pending: Arc<Vec<Mutex<Pending>>> = Arc::new(
                (0..callers)
                    .map(|_| Mutex::new(Pending(Vec::new())))
                    .collect(),
            );
            let d = Arc::clone(&db);
            let (ops, p50, p99) = run(
                callers,
                dur,
                Arc::new(move |c, i, lat| {
                    let mut mine = pending[c].lock();
                    mine.0.push((format!("{c}-{i}"), Instant::now()));
                    if (mine.0.len() as u64) < batch {
                        return;
                    }
                    let Ok(txn) = d.begin_write() else { return };
                    {
                        let Ok(mut t) = txn.open_table(TABLE) else {
                            return;
                        };
                        for (k, _) in &mine.0 {
                            let _ = t.insert(k.as_bytes(), RESPONSE);
                        }
                    }
                    if txn.commit().is_ok() {
                        lat.extend(mine.0.iter().map(|(_, t)| t.elapsed()));
                    }
                    mine.0.clear();
                }),
            );
            rows.push(Row {
                system: name,
                callers,
                ops_per_sec: ops,
                p50_us: p50,
                p99_us: p99,
            });
        }
    }
    rows
}

/// A store on `dir` for loading many records: `Batched`, no sweeper, and no automatic
/// checkpoint (it would delete the segments it covers; the callers decide when).
fn bulk_store(dir: &std::path::Path) -> Store {
    Store::builder()
        .durability(Durability::Batched {
            max_delay: Duration::from_millis(20),
        })
        .sweep_interval(None)
        .checkpoint_every(u64::MAX)
        .open(dir)
        .expect("open")
}

/// Begins and completes the keys `from..from + count`.
fn add(store: &Store, from: u64, count: u64) {
    let fp = Fingerprint::of(b"POST /orders {}");
    for i in from..from + count {
        let id = format!("{i:016x}");
        if let Ok(Begin::Acquired(l)) =
            store.blocking_begin(Key::new("bench", &id), fp, Duration::from_secs(30))
        {
            let _ = store.blocking_complete(&l, RESPONSE, None);
        }
    }
}

/// Seconds a checkpoint takes to record `changes` new records on top of `n` live ones: the
/// incremental one (the keys the log changed), then the whole one, which the store falls back
/// to when the log cannot say what changed (here: its files are removed under the open store,
/// as the fallback's test does). Each checkpoint records its own `changes` fresh keys.
pub fn checkpoint_cost(n: u64, changes: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = bulk_store(dir.path());
    add(&store, 0, n);
    store.checkpoint().expect("first checkpoint");
    let timed = |whole: bool| {
        if whole {
            for e in std::fs::read_dir(dir.path().join("wal")).expect("wal") {
                std::fs::remove_file(e.expect("entry").path()).expect("remove");
            }
        }
        let t = Instant::now();
        let stats = store.checkpoint().expect("checkpoint");
        let secs = t.elapsed().as_secs_f64();
        let expect = if whole {
            store.stats().records
        } else {
            changes
        };
        assert_eq!(stats.records, expect, "whole: {whole}");
        secs
    };
    add(&store, n, changes);
    let incremental = timed(false);
    add(&store, n + changes, changes);
    let whole = timed(true);
    (incremental, whole)
}

/// Recovery time and on-disk size for `n` live records: from the checkpoint (after
/// `Store::checkpoint`), and from the log alone.
pub fn recovery(n: u64) -> (f64, f64, f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_only = tempfile::tempdir().expect("tempdir");
    // The "log alone" copy below needs every segment (a 1M-record log is ~180 MB).
    add(&bulk_store(dir.path()), 0, n);
    // The whole log (a clean close flushed it), copied before the checkpoint deletes it.
    std::fs::create_dir_all(log_only.path().join("wal")).expect("mkdir");
    for e in std::fs::read_dir(dir.path().join("wal")).expect("wal") {
        let p = e.expect("entry").path();
        std::fs::copy(
            &p,
            log_only
                .path()
                .join("wal")
                .join(p.file_name().expect("name")),
        )
        .expect("copy");
    }
    {
        let store = Store::builder()
            .sweep_interval(None)
            .open(dir.path())
            .expect("open");
        store.checkpoint().expect("checkpoint");
    }
    let du = |p: &std::path::Path| -> f64 { walk(p) as f64 / n as f64 };
    // Seconds to open a directory, checking that every record came back.
    let reopen = |p: &std::path::Path| -> f64 {
        let t = Instant::now();
        let s = Store::builder()
            .sweep_interval(None)
            .open(p)
            .expect("reopen");
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(s.stats().records, n);
        secs
    };
    let from_checkpoint = reopen(dir.path());
    let from_log = reopen(log_only.path());
    (
        from_checkpoint,
        from_log,
        du(&dir.path().join("checkpoint.redb")),
        du(&log_only.path().join("wal")),
    )
}

/// Bytes actually allocated on disk under `p` (preallocated zeros of a segment excluded:
/// counts the apparent size up to the last data only for log segments).
fn walk(p: &std::path::Path) -> u64 {
    if p.is_file() {
        if p.extension().is_some_and(|e| e == "wal") {
            let bytes = std::fs::read(p).unwrap_or_default();
            return bytes
                .iter()
                .rposition(|&b| b != 0)
                .map_or(0, |i| i as u64 + 1);
        }
        return std::fs::metadata(p).map_or(0, |m| m.len());
    }
    std::fs::read_dir(p).map_or(0, |d| {
        d.filter_map(Result::ok).map(|e| walk(&e.path())).sum()
    })
}
