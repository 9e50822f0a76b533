//! idemkv against the physical limit of an in-memory index and the usual alternatives, side by
//! side in one process, interleaved rounds, 1 and 2 threads, 1M distinct keys:
//!
//! - `idemkv`: the begin + complete cycle (two shard-lock round trips, fencing token, TTL);
//! - `bare-map`: a 64-shard `parking_lot::Mutex<HashMap>` insert-if-absent of the same key and
//!   response bytes, with the same hasher, hashing once (hashbrown's `HashTable`, the table
//!   under std's `HashMap`): what any in-memory index must at least do;
//! - `dashmap-same`: dashmap doing idemkv's semantic work: insert an in-flight record (token,
//!   deadline from the same coarse clock idemkv reads, fingerprint) if the key is absent, then
//!   find it again, check the token and replace it with the completion (response, completion
//!   time, expiry); keyed by the id alone, while idemkv keys by scope and id;
//! - `dashmap-same-scoped`: the same, keyed as idemkv is (the length-prefixed scope, then the
//!   id: 29 bytes here instead of 16), so that both hash, compare and store the same key bytes;
//! - `dashmap`: `entry().or_insert()` of the same key and response (one insert: the floor);
//! - `moka`: `entry().or_insert()` into a `sync::Cache` with a 24 h time-to-live.
//!
//! Prints ops/s and the ratio to the bare map, writes the table to `target/bench-compare.csv`,
//! and prints idemkv's memory per record beyond key and value (allocator-requested bytes).
//!
//! `cargo bench --bench compare`; `IDEMKV_BENCH_QUICK=1` finishes in well under a minute;
//! `IDEMKV_BENCH_ONLY=idemkv` (or another system, `recovery` or `checkpoint`) runs one part
//! alone; `IDEMKV_BENCH_ONLY=memory` runs the in-memory table (all systems) and stops;
//! `IDEMKV_BENCH_ROUNDS=N` takes the median of N rounds instead of 3.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::{Duration, Instant};

#[path = "support/durable.rs"]
mod durable;
#[path = "support/timed.rs"]
mod timed;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use idemkv::{Begin, Clock, Fingerprint, Key, Store};

// ---------------------------------------------------------------- allocation counting

/// Counts live requested bytes, only while `COUNTING` is on (so the timed runs pay one relaxed
/// load per allocation and share no counter between threads).
struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---------------------------------------------------------------- systems

const SCOPE: &str = "POST /orders";
const RESPONSE: &[u8] = b"201 {\"id\":\"3f1c7a52\"}";
const LEASE: Duration = Duration::from_secs(30);

type Hasher = foldhash::fast::RandomState;

trait Contender: Sync {
    fn name(&self) -> &'static str;
    /// Inserts `key` if absent; returns whether it was new.
    fn run(&self, key: &[u8]) -> bool;
}

struct Idem(Store, Fingerprint);
impl Contender for Idem {
    fn name(&self) -> &'static str {
        "idemkv"
    }
    fn run(&self, key: &[u8]) -> bool {
        match self.0.blocking_begin(Key::new(SCOPE, key), self.1, LEASE) {
            Ok(Begin::Acquired(lease)) => self.0.blocking_complete(&lease, RESPONSE, None).is_ok(),
            _ => false,
        }
    }
}

/// One shard of the bare map: key and response inline in the table, the hash computed once,
/// each lock on its own cache lines (as idemkv's and dashmap's are).
#[repr(align(128))]
struct BareShard(parking_lot::Mutex<HashTable<KeyValue>>);
type KeyValue = (Box<[u8]>, Box<[u8]>);

struct Bare {
    shards: Vec<BareShard>,
    hasher: Hasher,
}
impl Contender for Bare {
    fn name(&self) -> &'static str {
        "bare-map"
    }
    fn run(&self, key: &[u8]) -> bool {
        let h = self.hasher.hash_one(key);
        let mut shard = self.shards[((h >> 40) & 63) as usize].0.lock();
        match shard.entry(h, |(k, _)| &**k == key, |(k, _)| self.hasher.hash_one(k)) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                slot.insert((key.into(), RESPONSE.into()));
                true
            }
        }
    }
}

struct Dash(dashmap::DashMap<Box<[u8]>, Box<[u8]>, Hasher>);
impl Contender for Dash {
    fn name(&self) -> &'static str {
        "dashmap"
    }
    fn run(&self, key: &[u8]) -> bool {
        let mut new = false;
        self.0.entry(key.into()).or_insert_with(|| {
            new = true;
            RESPONSE.into()
        });
        new
    }
}

/// What `dashmap-same` keeps per key: a lease, then the completion that replaces it (held as a
/// store holds them; the bench reads back only the token).
#[allow(dead_code)]
enum DashRecord {
    InFlight {
        token: u64,
        deadline: u64,
        fingerprint: Fingerprint,
    },
    Completed {
        response: Box<[u8]>,
        completed_at: u64,
        expires_at: u64,
        fingerprint: Fingerprint,
    },
}

/// The clock idemkv reads (`SystemClock`: the coarse real-time clock on Linux), so that the
/// two do the same work down to the clock call.
fn now_ms() -> u64 {
    idemkv::SystemClock.now().as_millis()
}

struct DashSame {
    map: dashmap::DashMap<Box<[u8]>, DashRecord, Hasher>,
    tokens: std::sync::atomic::AtomicU64,
    fingerprint: Fingerprint,
    /// Whether the map's key is idemkv's whole key (the scope, length-prefixed, then the id)
    /// rather than the id alone.
    scoped: bool,
}
impl Contender for DashSame {
    fn name(&self) -> &'static str {
        if self.scoped {
            "dashmap-same-scoped"
        } else {
            "dashmap-same"
        }
    }
    fn run(&self, id: &[u8]) -> bool {
        // Filled only for the scoped row, so that the unscoped one does no work for it.
        let buf: [u8; 64];
        let key = if self.scoped {
            let (scope, end) = (SCOPE.as_bytes(), 1 + SCOPE.len() + id.len());
            let mut whole = [0u8; 64];
            whole[0] = scope.len() as u8;
            whole[1..1 + scope.len()].copy_from_slice(scope);
            whole[1 + scope.len()..end].copy_from_slice(id);
            buf = whole;
            &buf[..end]
        } else {
            id
        };
        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
        let begun = match self.map.entry(key.into()) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(slot) => {
                slot.insert(DashRecord::InFlight {
                    token,
                    deadline: now_ms() + LEASE.as_millis() as u64,
                    fingerprint: self.fingerprint,
                });
                true
            }
        };
        if !begun {
            return false;
        }
        // The handler ran; the holder completes, if it still holds the key.
        let Some(mut rec) = self.map.get_mut(key) else {
            return false;
        };
        let DashRecord::InFlight {
            token: held,
            fingerprint,
            ..
        } = *rec
        else {
            return false;
        };
        if held != token {
            return false;
        }
        let now = now_ms();
        *rec = DashRecord::Completed {
            response: RESPONSE.into(),
            completed_at: now,
            expires_at: now + 24 * 3600 * 1000,
            fingerprint,
        };
        true
    }
}

struct Moka(moka::sync::Cache<Box<[u8]>, Box<[u8]>, Hasher>);
impl Contender for Moka {
    fn name(&self) -> &'static str {
        "moka"
    }
    fn run(&self, key: &[u8]) -> bool {
        self.0
            .entry(key.into())
            .or_insert(RESPONSE.into())
            .is_fresh()
    }
}

fn make(name: &str) -> Box<dyn Contender> {
    match name {
        "idemkv" => Box::new(Idem(
            Store::builder()
                .sweep_interval(None)
                .max_bytes(u64::MAX)
                .build()
                .expect("store"),
            Fingerprint::of(b"POST /orders {}"),
        )),
        "bare-map" => Box::new(Bare {
            shards: (0..64)
                .map(|_| BareShard(parking_lot::Mutex::new(HashTable::new())))
                .collect(),
            hasher: Hasher::default(),
        }),
        "dashmap" => Box::new(Dash(dashmap::DashMap::with_hasher(Hasher::default()))),
        "dashmap-same" | "dashmap-same-scoped" => Box::new(DashSame {
            map: dashmap::DashMap::with_hasher(Hasher::default()),
            tokens: std::sync::atomic::AtomicU64::new(1),
            fingerprint: Fingerprint::of(b"POST /orders {}"),
            scoped: name == "dashmap-same-scoped",
        }),
        _ => Box::new(Moka(
            moka::sync::Cache::builder()
                .time_to_live(Duration::from_secs(24 * 3600))
                .build_with_hasher(Hasher::default()),
        )),
    }
}

/// Runs every key through a fresh `system` on `threads` threads; returns ops/s and the system,
/// which the caller keeps alive until the end of the run: were it dropped, the next round
/// would allocate into its freed chunks, and glibc's bins would then favour whichever system
/// happens to need the sizes just freed (seen: a 3x swing between idemkv and the bare map).
fn round(name: &str, keys: &[Vec<u8>], threads: usize) -> (f64, Box<dyn Contender>) {
    let system = make(name);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let system = &system;
            s.spawn(move || {
                let mut new = 0usize;
                for k in keys.iter().skip(t).step_by(threads) {
                    new += usize::from(system.run(k));
                }
                assert_eq!(
                    new,
                    keys.iter().skip(t).step_by(threads).count(),
                    "{}: keys are distinct",
                    system.name()
                );
            });
        }
    });
    let ops = keys.len() as f64 / start.elapsed().as_secs_f64();
    (ops, system)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes per record beyond key and value: idemkv holding `keys` completed records.
fn memory_per_record(keys: &[Vec<u8>]) -> (f64, f64) {
    let payload: usize = keys
        .iter()
        .map(|k| SCOPE.len() + k.len() + RESPONSE.len())
        .sum();
    let mut out = [0.0; 2];
    for (i, name) in ["idemkv", "bare-map"].iter().enumerate() {
        LIVE.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        let system = make(name);
        for k in keys {
            system.run(k);
        }
        let live = LIVE.load(Ordering::SeqCst);
        COUNTING.store(false, Ordering::SeqCst);
        // The bare map stores no scope: compare it against its own key and value bytes.
        let own = if *name == "idemkv" {
            payload
        } else {
            payload - SCOPE.len() * keys.len()
        };
        out[i] = (live as f64 - own as f64) / keys.len() as f64;
        drop(system);
    }
    (out[0], out[1])
}

fn main() {
    let quick = std::env::var_os("IDEMKV_BENCH_QUICK").is_some();
    // `cargo bench` passes `--bench`; ignore arguments.
    let n = if quick { 200_000 } else { 1_000_000 };
    // `IDEMKV_BENCH_ROUNDS`: more interleaved rounds for a steadier median (default 3).
    let rounds = std::env::var("IDEMKV_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3usize)
        .max(1);
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("{i:016x}").into_bytes()).collect();
    // `IDEMKV_BENCH_ONLY=idemkv` runs one system alone (for profiling); `memory`, the in-memory
    // table alone (every system, interleaved rounds); the table needs all.
    let only = std::env::var("IDEMKV_BENCH_ONLY").ok();
    match only.as_deref() {
        None | Some("memory") => {}
        Some("checkpoint") => {
            let (inc, whole) = durable::checkpoint_cost(n as u64, 10_000);
            println!(
                "checkpoint of 10000 changes over {n} records: incremental {:.1} ms, whole {:.1} ms ({:.1}x)",
                inc * 1e3,
                whole * 1e3,
                whole / inc
            );
            return;
        }
        Some("recovery") => {
            let (cp, log, _, _) = durable::recovery(n as u64);
            println!("recovery of {n} records: checkpoint {cp:.2} s, log alone {log:.2} s");
            return;
        }
        Some(system) => {
            let (ops, _) = round(system, &keys, 1);
            println!("{system}: {ops:.0} ops/s ({n} keys, 1 thread)");
            return;
        }
    }
    let memory_only = only.as_deref() == Some("memory");
    let systems = [
        "idemkv",
        "bare-map",
        "dashmap-same",
        "dashmap-same-scoped",
        "dashmap",
        "moka",
    ];
    let mut rows = Vec::new();
    let mut alive = Vec::new();
    for threads in [1, 2] {
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
        // Round 0 warms the allocator and is discarded; each round starts with the next system,
        // so none always runs right after the same neighbour.
        for r in 0..=rounds {
            for j in 0..systems.len() {
                let i = (r + j) % systems.len();
                let (ops, system) = round(systems[i], &keys, threads);
                alive.push(system);
                if r > 0 {
                    results[i].push(ops);
                }
            }
        }
        let bare = median(results[1].clone());
        for (i, name) in systems.iter().enumerate() {
            let ops = median(results[i].clone());
            rows.push((name.to_string(), threads, ops, ops / bare));
        }
    }
    println!("\n{n} distinct keys, median of {rounds} interleaved rounds");
    println!(
        "{:<19} {:>7} {:>14} {:>14}",
        "system", "threads", "ops/s", "vs bare-map"
    );
    let mut csv = String::from("system,threads,keys,ops_per_sec,ratio_to_bare_map\n");
    for (name, threads, ops, ratio) in &rows {
        println!("{name:<19} {threads:>7} {ops:>14.0} {ratio:>14.2}");
        csv.push_str(&format!("{name},{threads},{n},{ops:.0},{ratio:.3}\n"));
    }
    drop(alive);
    if memory_only {
        return;
    }
    let (idem, bare) = memory_per_record(&keys);
    println!(
        "\nmemory beyond key and value, per record ({n} records): idemkv {idem:.1} B (target <= 64), bare-map {bare:.1} B"
    );
    csv.push_str(&format!(
        "# memory_bytes_per_record,idemkv,{idem:.1},bare-map,{bare:.1}\n"
    ));
    // Durable: begin + complete with Immediate durability vs the raw log and redb.
    let durable_rows = durable::run_all(quick);
    println!("\nbegin + complete, Durability::Immediate, fixed time per row");
    println!(
        "{:<10} {:>7} {:>12} {:>10} {:>10} {:>12} {:>12}",
        "system", "callers", "ops/s", "p50 us", "p99 us", "vs raw-log", "vs redb-1"
    );
    csv.push_str("system,callers,ops_per_sec,p50_us,p99_us,ratio_to_raw_log,ratio_to_redb_1\n");
    for r in &durable_rows {
        let of = |name: &str| {
            durable_rows
                .iter()
                .find(|x| x.system == name && x.callers == r.callers)
                .map_or(f64::NAN, |x| r.ops_per_sec / x.ops_per_sec)
        };
        // Each mode against the raw log doing the same waits: two durable appends, or one.
        let raw_name = if r.system == "idemkv-deferred" {
            "raw-log-1"
        } else {
            "raw-log"
        };
        let (raw, redb) = (of(raw_name), of("redb-1"));
        println!(
            "{:<10} {:>7} {:>12.0} {:>10.0} {:>10.0} {:>12.2} {:>12.2}",
            r.system, r.callers, r.ops_per_sec, r.p50_us, r.p99_us, raw, redb
        );
        csv.push_str(&format!(
            "{},{},{:.0},{:.0},{:.0},{:.3},{:.3}\n",
            r.system, r.callers, r.ops_per_sec, r.p50_us, r.p99_us, raw, redb
        ));
    }
    if let Some(f) = durable_rows.iter().find(|r| r.system == "fdatasync") {
        for (name, waits) in [
            ("idemkv", "two fsync waits (lease, completion)"),
            (
                "idemkv-deferred",
                "one fsync wait (the completion's covers the lease)",
            ),
        ] {
            if let Some(i) = durable_rows
                .iter()
                .find(|r| r.system == name && r.callers == 1)
            {
                println!(
                    "{name} p50 at 1 caller: {:.0} us = {:.2}x one fdatasync ({:.0} us; target for the deferred mode <= 1.25x): {waits}",
                    i.p50_us,
                    i.p50_us / f.p50_us,
                    f.p50_us
                );
                csv.push_str(&format!(
                    "# p50_vs_fdatasync,{name},{:.3}\n",
                    i.p50_us / f.p50_us
                ));
            }
        }
    }
    let live = if quick { 200_000 } else { 1_000_000 };
    let (cp, log, cp_bytes, log_bytes) = durable::recovery(live);
    println!(
        "\nrecovery of {live} live records: from checkpoint {:.2} s, from the log alone {:.2} s (target < 1 s); \
         on disk per record: checkpoint {cp_bytes:.0} B, log {log_bytes:.0} B",
        cp, log
    );
    csv.push_str(&format!(
        "# recovery,{live},checkpoint_s,{cp:.3},log_s,{log:.3},checkpoint_bytes_per_record,{cp_bytes:.0},log_bytes_per_record,{log_bytes:.0}\n"
    ));
    let (inc, whole) = durable::checkpoint_cost(live, 10_000);
    println!(
        "checkpoint recording 10000 changes over {live} live records: incremental {:.1} ms, \
         whole {:.1} ms: incremental / whole = {:.3}",
        inc * 1e3,
        whole * 1e3,
        inc / whole
    );
    csv.push_str(&format!(
        "# checkpoint,{live},changes,10000,incremental_s,{inc:.4},whole_s,{whole:.4},ratio,{:.4}\n",
        inc / whole
    ));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-compare.csv");
    match std::fs::write(&path, csv) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
