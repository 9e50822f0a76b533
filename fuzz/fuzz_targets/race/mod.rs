//! The race harness: 2–4 threads run fuzz-chosen operations on one store, under shuttle, with
//! a scheduler that takes every scheduling decision from the fuzz input; the history of
//! invocations and answers is then checked for linearizability against [`model::Model`].
//!
//! Liveness ("every waiter wakes") needs no separate check: under shuttle a wait ends only
//! when it is notified (the crate's sync shim ignores timeouts there), and the workload is
//! built so that every wait has someone who will notify it. A thread waits (`begin_wait`) only
//! while it holds no lease, so no wait cycle exists; every thread releases what it still holds
//! at its end; a swept lease wakes its waiters. A lost wake-up therefore leaves every thread
//! blocked, which shuttle reports as a deadlock: a crash.

pub mod check;
pub mod model;

use std::sync::Arc as StdArc;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};
use std::time::Duration;

use arbitrary::Arbitrary;
use idemkv::{
    Begin, CasOp, CasOutcome, Clock, Error, Fingerprint, Lease, ManualClock, OwnedKey, PutPending,
    Snapshot, Store, Take, Write,
};
use shuttle::scheduler::{Schedule, Scheduler, Task, TaskId};

use check::Event;
use model::{Call, CasKind, DAY_MS, IDEM_KEYS, KEYS, Out, RETENTION_MS, Seen, T0};

/// One operation of a thread's script.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    Begin {
        key: u8,
        fp: bool,
        lease: u8,
    },
    /// `begin_wait`; a thread that still holds a lease does a plain `begin` instead.
    BeginWait {
        key: u8,
        fp: bool,
        lease: u8,
    },
    /// Completes one of this thread's leases, with up to two writes on value keys.
    Complete {
        lease: u8,
        resp: u8,
        writes: Vec<(u8, u8, u8)>,
    },
    Release {
        lease: u8,
    },
    Renew {
        lease: u8,
        steps: u8,
    },
    Cas {
        key: u8,
        kind: u8,
        value: u8,
    },
    Remove {
        key: u8,
    },
    PutPending {
        key: u8,
        payload: u8,
    },
    TakePending {
        key: u8,
        lease: u8,
    },
    Get {
        key: u8,
    },
    Advance {
        steps: u8,
    },
    Sweep,
}

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub threads: Vec<Vec<Op>>,
    /// The scheduling decisions, one byte each: which runnable thread goes next.
    pub schedule: Vec<u8>,
}

const MAX_THREADS: usize = 4;
const MAX_OPS: usize = 5;
/// Times are on a 100 ms grid (the retention is one step), so "deadline == now" is common.
const STEP_MS: u64 = 100;

fn lease_ms(n: u8) -> u64 {
    (u64::from(n % 4) + 1) * STEP_MS
}

fn key_of(i: u8) -> OwnedKey {
    if i < IDEM_KEYS {
        OwnedKey::new("k", [b'a' + i])
    } else {
        OwnedKey::new("v", [b'a' + i])
    }
}

fn fp_of(f: bool) -> Fingerprint {
    Fingerprint::of(&[u8::from(f)])
}

fn fp_back(f: Fingerprint) -> Option<bool> {
    if f == fp_of(true) {
        Some(true)
    } else if f == fp_of(false) {
        Some(false)
    } else {
        None
    }
}

/// Takes every scheduling decision from the input's bytes: a byte below 128 keeps the current
/// thread running (if it can run), any other picks a runnable thread by its value. Once the
/// bytes run out, the current thread runs on.
struct InputScheduler {
    bytes: Vec<u8>,
    pos: usize,
    started: bool,
}

impl Scheduler for InputScheduler {
    fn new_execution(&mut self) -> Option<Schedule> {
        if std::mem::replace(&mut self.started, true) {
            None
        } else {
            Some(Schedule::new(0))
        }
    }

    fn next_task(
        &mut self,
        runnable: &[&Task],
        current: Option<TaskId>,
        _yielding: bool,
    ) -> Option<TaskId> {
        let byte = self.bytes.get(self.pos).copied();
        self.pos += 1;
        let stay = current.filter(|c| runnable.iter().any(|t| t.id() == *c));
        match (byte, stay) {
            (Some(b), Some(c)) if b < 128 => Some(c),
            (Some(b), _) => Some(runnable[usize::from(b) % runnable.len()].id()),
            (None, Some(c)) => Some(c),
            (None, None) => Some(runnable[0].id()),
        }
    }

    fn next_u64(&mut self) -> u64 {
        0
    }
}

/// What every thread shares: the store, its clock, the history, and the tick counter.
struct World {
    store: Store,
    clock: ManualClock,
    ticks: StdAtomicU64,
    history: StdMutex<Vec<Event>>,
}

impl World {
    /// Runs `f` as one operation of `thread`, recording its invocation and answer. The tick
    /// counter and the history are plain std types: shuttle runs one thread at a time and they
    /// are no scheduling points, so their order is the order things happened in.
    fn record<R>(
        &self,
        thread: usize,
        call: Call,
        f: impl FnOnce() -> R,
        out: impl FnOnce(&R) -> Out,
    ) -> R {
        let clock_inv = self.clock.now().as_millis();
        let inv = self.ticks.fetch_add(1, StdOrdering::Relaxed);
        let r = f();
        let resp = self.ticks.fetch_add(1, StdOrdering::Relaxed);
        let out = out(&r);
        self.history.lock().expect("history").push(Event {
            thread,
            inv,
            resp,
            call,
            out,
            clock_inv,
        });
        r
    }
}

fn err_out(e: &Error) -> Out {
    match e {
        Error::StaleLease { .. } => Out::Stale,
        Error::WrongKind { .. } => Out::WrongKind,
        Error::BatchConflict { index, current } => Out::BatchConflict {
            index: *index,
            current: *current,
        },
        Error::InvalidBatch { .. } => Out::InvalidBatch,
        other => Out::Other(other.to_string()),
    }
}

/// A replayed completion, as `begin` and `take_pending` answer it.
fn completed_out(c: &idemkv::Completed) -> Out {
    Out::Completed {
        resp: c.response.first().copied().unwrap_or(0),
        fp: fp_back(c.fingerprint),
        at: c.completed_at.as_millis(),
        exp: c.expires_at.as_millis(),
    }
}

fn begin_out(r: &Result<Begin, Error>) -> Out {
    match r {
        Ok(Begin::Acquired(l)) => Out::Acquired {
            token: l.token(),
            takeover: l.is_takeover(),
            payload: None,
        },
        Ok(Begin::InProgress { deadline }) => Out::InProgress {
            deadline: deadline.as_millis(),
        },
        Ok(Begin::Completed(c)) => completed_out(c),
        Ok(Begin::Mismatch) => Out::Mismatch,
        Err(e) => err_out(e),
    }
}

fn snapshot_out(r: &Result<Option<Snapshot>, Error>) -> Out {
    match r {
        Ok(None) => Out::Snapshot(None),
        Ok(Some(Snapshot::InFlight {
            token,
            deadline,
            fingerprint,
            pending,
        })) => Out::Snapshot(Some(Seen::InFlight {
            token: *token,
            deadline: deadline.as_millis(),
            fp: fp_back(*fingerprint),
            pending: *pending,
        })),
        Ok(Some(Snapshot::Completed(c))) => Out::Snapshot(Some(Seen::Completed {
            resp: c.response.first().copied().unwrap_or(0),
            fp: fp_back(c.fingerprint),
            at: c.completed_at.as_millis(),
            exp: c.expires_at.as_millis(),
        })),
        Ok(Some(Snapshot::Pending {
            payload,
            expires_at,
        })) => Out::Snapshot(Some(Seen::Pending {
            payload: payload.first().copied().unwrap_or(0),
            exp: expires_at.as_millis(),
        })),
        Ok(Some(Snapshot::Value(v))) => Out::Snapshot(Some(Seen::Value {
            version: v.version,
            bytes: v.value.first().copied().unwrap_or(0),
        })),
        Err(e) => err_out(e),
    }
}

/// A lease this thread got, and whether the thread knows it ended.
struct Held {
    lease: Lease,
    key: u8,
    ended: bool,
}

/// One thread: its script, then releasing whatever it may still hold.
fn run_thread(w: &World, thread: usize, ops: &[Op]) {
    let mut held: Vec<Held> = Vec::new();
    // The last version this thread saw per value key: what its versioned writes aim at.
    let mut versions = [1u64; KEYS as usize];
    let cas_kind = |kind: u8, value: u8, key: u8, versions: &[u64]| match kind % 3 {
        0 => CasKind::PutIfAbsent(value),
        1 => CasKind::SetIfVersion(versions[usize::from(key)], value),
        _ => CasKind::DeleteIfVersion(versions[usize::from(key)]),
    };
    let to_write = |key: u8, kind: CasKind| Write {
        key: key_of(key),
        op: match kind {
            CasKind::PutIfAbsent(b) => CasOp::PutIfAbsent(vec![b]),
            CasKind::SetIfVersion(version, b) => CasOp::SetIfVersion {
                version,
                value: vec![b],
            },
            CasKind::DeleteIfVersion(version) => CasOp::DeleteIfVersion { version },
        },
        ttl: None,
    };
    for op in ops {
        match op {
            Op::Begin { key, fp, lease } | Op::BeginWait { key, fp, lease } => {
                let key = key % IDEM_KEYS;
                // Waiting while holding a lease could wait on oneself through someone else.
                let wait = matches!(op, Op::BeginWait { .. }) && held.iter().all(|h| h.ended);
                let ms = lease_ms(*lease);
                let call = Call::Begin {
                    key,
                    fp: *fp,
                    lease_ms: ms,
                    wait,
                };
                let k = key_of(key);
                let r = w.record(
                    thread,
                    call,
                    || {
                        if wait {
                            w.store.blocking_begin_wait(
                                k.as_key(),
                                fp_of(*fp),
                                Duration::from_millis(ms),
                                Duration::from_secs(3600),
                            )
                        } else {
                            w.store.blocking_begin(
                                k.as_key(),
                                fp_of(*fp),
                                Duration::from_millis(ms),
                            )
                        }
                    },
                    begin_out,
                );
                if let Ok(Begin::Acquired(lease)) = r {
                    held.push(Held {
                        lease,
                        key,
                        ended: false,
                    });
                }
            }
            Op::Complete {
                lease,
                resp,
                writes,
            } => {
                let Some(i) = pick(&held, *lease) else {
                    continue;
                };
                let writes: Vec<(u8, CasKind)> = writes
                    .iter()
                    .take(2)
                    .map(|&(k, kind, v)| {
                        let k = IDEM_KEYS + k % (KEYS - IDEM_KEYS);
                        (k, cas_kind(kind, v, k, &versions))
                    })
                    .collect();
                let batch: Vec<Write> = writes.iter().map(|&(k, kind)| to_write(k, kind)).collect();
                let h = &held[i];
                let call = Call::Complete {
                    token: h.lease.token(),
                    key: h.key,
                    resp: *resp,
                    writes,
                };
                let r = w.record(
                    thread,
                    call,
                    || {
                        w.store
                            .blocking_complete_with(&h.lease, &[*resp], None, &batch)
                    },
                    |r| match r {
                        Ok(exp) => Out::Expires(exp.as_millis()),
                        Err(e) => err_out(e),
                    },
                );
                if matches!(r, Ok(_) | Err(Error::StaleLease { .. })) {
                    held[i].ended = true;
                }
            }
            Op::Release { lease } => {
                let Some(i) = pick(&held, *lease) else {
                    continue;
                };
                let h = held.remove(i);
                let call = Call::Release {
                    token: h.lease.token(),
                    key: h.key,
                };
                let _ = w.record(
                    thread,
                    call,
                    || w.store.blocking_release(h.lease),
                    |r| match r {
                        Ok(()) => Out::Done,
                        Err(e) => err_out(e),
                    },
                );
            }
            Op::Renew { lease, steps } => {
                let Some(i) = pick(&held, *lease) else {
                    continue;
                };
                let ms = lease_ms(*steps);
                let h = &mut held[i];
                let call = Call::Renew {
                    token: h.lease.token(),
                    key: h.key,
                    ms,
                };
                let r = w.record(
                    thread,
                    call,
                    || {
                        w.store
                            .blocking_renew(&mut h.lease, Duration::from_millis(ms))
                    },
                    |r| match r {
                        Ok(d) => Out::Expires(d.as_millis()),
                        Err(e) => err_out(e),
                    },
                );
                if r.is_err() {
                    h.ended = true;
                }
            }
            Op::Cas { key, kind, value } => {
                let key = IDEM_KEYS + key % (KEYS - IDEM_KEYS);
                let kind = cas_kind(*kind, *value, key, &versions);
                let write = to_write(key, kind);
                let r = w.record(
                    thread,
                    Call::Cas { key, kind },
                    || w.store.blocking_cas(&write),
                    |r| match r {
                        Ok(CasOutcome::Applied { version }) => Out::Applied(*version),
                        Ok(CasOutcome::Conflict { current }) => Out::Conflict(*current),
                        Err(e) => err_out(e),
                    },
                );
                if let Ok(
                    CasOutcome::Applied { version: Some(v) }
                    | CasOutcome::Conflict { current: Some(v) },
                ) = r
                {
                    versions[usize::from(key)] = v;
                }
            }
            Op::Remove { key } => {
                let key = key % KEYS;
                let k = key_of(key);
                let _ = w.record(
                    thread,
                    Call::Remove { key },
                    || w.store.blocking_remove(k.as_key()),
                    |r| match r {
                        Ok(b) => Out::Bool(*b),
                        Err(e) => err_out(e),
                    },
                );
            }
            Op::PutPending { key, payload } => {
                let key = key % IDEM_KEYS;
                let k = key_of(key);
                let call = Call::PutPending {
                    key,
                    payload: *payload,
                };
                let _ = w.record(
                    thread,
                    call,
                    || w.store.blocking_put_pending(k.as_key(), &[*payload], None),
                    |r| match r {
                        Ok(PutPending::Stored) => Out::Stored,
                        Ok(PutPending::InProgress { deadline }) => Out::InProgress {
                            deadline: deadline.as_millis(),
                        },
                        Ok(PutPending::Completed) => Out::PendingCompleted,
                        Err(e) => err_out(e),
                    },
                );
            }
            Op::TakePending { key, lease } => {
                let key = key % IDEM_KEYS;
                let k = key_of(key);
                let ms = lease_ms(*lease);
                let call = Call::TakePending { key, lease_ms: ms };
                let r = w.record(
                    thread,
                    call,
                    || {
                        w.store
                            .blocking_take_pending(k.as_key(), Duration::from_millis(ms))
                    },
                    |r| match r {
                        Ok(Take::Acquired { lease, payload }) => Out::Acquired {
                            token: lease.token(),
                            takeover: lease.is_takeover(),
                            payload: payload.first().copied(),
                        },
                        Ok(Take::InProgress { deadline }) => Out::InProgress {
                            deadline: deadline.as_millis(),
                        },
                        Ok(Take::Completed(c)) => completed_out(c),
                        Ok(Take::NotFound) => Out::NotFound,
                        Err(e) => err_out(e),
                    },
                );
                if let Ok(Take::Acquired { lease, .. }) = r {
                    held.push(Held {
                        lease,
                        key,
                        ended: false,
                    });
                }
            }
            Op::Get { key } => {
                let key = key % KEYS;
                let k = key_of(key);
                let r = w.record(
                    thread,
                    Call::Get { key },
                    || w.store.blocking_get(k.as_key()),
                    snapshot_out,
                );
                if let Ok(Some(Snapshot::Value(v))) = r {
                    versions[usize::from(key)] = v.version;
                }
            }
            Op::Advance { steps } => {
                let ms = u64::from(steps % 4) * STEP_MS;
                w.record(
                    thread,
                    Call::Advance { ms },
                    || w.clock.advance(Duration::from_millis(ms)),
                    |_| Out::Done,
                );
            }
            Op::Sweep => {
                // One event per key, all spanning the sweep (see `Call::Sweep`).
                let clock_inv = w.clock.now().as_millis();
                let inv = w.ticks.fetch_add(1, StdOrdering::Relaxed);
                w.store.sweep_expired();
                let resp = w.ticks.fetch_add(1, StdOrdering::Relaxed);
                let mut h = w.history.lock().expect("history");
                for key in 0..KEYS {
                    h.push(Event {
                        thread,
                        inv,
                        resp,
                        call: Call::Sweep { key },
                        out: Out::Ignored,
                        clock_inv,
                    });
                }
            }
        }
    }
    for h in held.into_iter().filter(|h| !h.ended) {
        let call = Call::Release {
            token: h.lease.token(),
            key: h.key,
        };
        let _ = w.record(
            thread,
            call,
            || w.store.blocking_release(h.lease),
            |r| match r {
                Ok(()) => Out::Done,
                Err(e) => err_out(e),
            },
        );
    }
}

/// A lease of this thread's, by the script's index (none if it holds none).
fn pick(held: &[Held], i: u8) -> Option<usize> {
    (!held.is_empty()).then(|| usize::from(i) % held.len())
}

/// Runs one input: the threads under shuttle, first with the input's own schedule, then with
/// [`PCT_RUNS`] schedules of shuttle's PCT scheduler seeded from the input (so the same input
/// always runs the same schedules); after each run the end state is read by one thread and the
/// history checked for linearizability. Panics (a crash for the fuzzer) on a history no order
/// explains, or when shuttle finds a deadlock.
pub fn run(input: &Input) {
    let threads: Vec<Vec<Op>> = input
        .threads
        .iter()
        .take(MAX_THREADS)
        .map(|t| t.iter().take(MAX_OPS).cloned().collect())
        .collect();
    if threads.len() < 2 {
        return;
    }
    let scheduler = InputScheduler {
        bytes: input.schedule.clone(),
        pos: 0,
        started: false,
    };
    check_all(execute(&threads, scheduler));
    let seed = input
        .schedule
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    check_all(execute(
        &threads,
        shuttle::scheduler::PctScheduler::new_from_seed(seed, 3, PCT_RUNS),
    ));
}

/// Schedules of the PCT scheduler per input, after the input's own.
const PCT_RUNS: usize = 8;

fn check_all(histories: Vec<Vec<Event>>) {
    for history in histories {
        if let Err(report) = check::linearizable(&history) {
            panic!("{report}");
        }
    }
}

/// Every execution `scheduler` asks for, each on a fresh store; the history of each.
fn execute(threads: &[Vec<Op>], scheduler: impl Scheduler + 'static) -> Vec<Vec<Event>> {
    let histories: StdArc<StdMutex<Vec<Vec<Event>>>> = StdArc::default();
    let out = StdArc::clone(&histories);
    let threads = threads.to_vec();
    let mut config = shuttle::Config::new();
    config.failure_persistence = shuttle::FailurePersistence::None;
    // Every script is finite and nothing spins: a run this long is a livelock.
    config.max_steps = shuttle::MaxSteps::FailAfter(200_000);
    shuttle::Runner::new(scheduler, config).run(move || {
        let clock = ManualClock::new(T0);
        let store = Store::builder()
            .shards(2)
            .clock(clock.clone())
            .sweep_interval(None)
            .lease_retention(Duration::from_millis(RETENTION_MS))
            .default_ttl(Duration::from_millis(DAY_MS))
            .pending_ttl(Duration::from_millis(DAY_MS))
            .build()
            .expect("store");
        let world = StdArc::new(World {
            store,
            clock,
            ticks: StdAtomicU64::new(0),
            history: StdMutex::new(Vec::new()),
        });
        let handles: Vec<_> = threads
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, ops)| {
                let w = StdArc::clone(&world);
                shuttle::thread::spawn(move || run_thread(&w, i, &ops))
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        // The end state, read once everything has finished.
        for key in 0..KEYS {
            let k = key_of(key);
            let _ = world.record(
                usize::MAX,
                Call::Get { key },
                || world.store.blocking_get(k.as_key()),
                snapshot_out,
            );
        }
        let history = std::mem::take(&mut *world.history.lock().expect("history"));
        out.lock().expect("histories").push(history);
    });
    std::mem::take(&mut *histories.lock().expect("histories"))
}
