//! The sequential specification the concurrent history is checked against: the store's
//! behaviour on a handful of keys as a plain `BTreeMap`, the same rules as `tests/model.rs`
//! (which checks them one operation at a time against the real store).
//!
//! Three things differ from the one-at-a-time model, because here several operations overlap:
//! - **Time.** The store reads its clock before it takes a shard lock, so an operation may act
//!   at any clock value between its invocation and the moment it is linearized. `step` is given
//!   that lower bound and tries every clock value the model went through since.
//! - **Unknown versions.** A batch gives its writes fresh versions that nobody sees at once;
//!   the model keeps them as "fresh, above n" until an observation pins them.
//! - **Sweeps** are checked per key (the store sweeps one shard at a time), see `Call::Sweep`.
//!
//! The invariants the issue names are rules of this model: a `begin` that acquires while a live
//! lease holds the key has no valid linearization (two live holders); a completion, release or
//! renewal with a token that is not the holder's must answer `StaleLease` and change nothing
//! (stale tokens never write); a batch applies every write and the completion in one step, so a
//! half-applied batch is seen by some later read as a state no order explains; every token and
//! version is checked to be unique and above every earlier one for its key.

use std::collections::{BTreeMap, BTreeSet};

/// Completed records, stored requests: their TTL is a day, far beyond any run's clock.
pub const DAY_MS: u64 = 24 * 3600 * 1000;
/// How long an expired lease stays visible before the sweeper may drop it.
pub const RETENTION_MS: u64 = 100;
pub const T0: u64 = 1_000_000;

/// Keys 0..3 are idempotency keys (begin, take_pending, put_pending); 3..5 are value keys (cas
/// and batch writes). Remove and get take any of the five.
pub const KEYS: u8 = 5;
pub const IDEM_KEYS: u8 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ver {
    Known(u64),
    /// Handed out by a batch and not observed yet: some version above `above`.
    Fresh {
        above: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Rec {
    InFlight {
        token: u64,
        deadline: u64,
        fp: Option<bool>,
        pending: Option<u8>,
    },
    Completed {
        resp: u8,
        fp: Option<bool>,
        at: u64,
    },
    Pending {
        payload: u8,
        exp: u64,
    },
    Value {
        ver: Ver,
        bytes: u8,
    },
}

/// A write of a batch, or a cas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasKind {
    PutIfAbsent(u8),
    SetIfVersion(u64, u8),
    DeleteIfVersion(u64),
}

/// An operation as the harness issued it. Leases are named by their token (the harness knows
/// it); `key` is an index below [`KEYS`].
#[derive(Clone, Debug)]
pub enum Call {
    Begin {
        key: u8,
        fp: bool,
        lease_ms: u64,
        wait: bool,
    },
    Complete {
        token: u64,
        key: u8,
        resp: u8,
        writes: Vec<(u8, CasKind)>,
    },
    Release {
        token: u64,
        key: u8,
    },
    Renew {
        token: u64,
        key: u8,
        ms: u64,
    },
    Cas {
        key: u8,
        kind: CasKind,
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
        lease_ms: u64,
    },
    Get {
        key: u8,
    },
    Advance {
        ms: u64,
    },
    /// One key's part of a `sweep_expired` (the harness splits every sweep into one of these
    /// per key, each free to fall anywhere in the sweep's interval).
    Sweep {
        key: u8,
    },
}

/// What an operation answered, reduced to what the model can predict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    Acquired {
        token: u64,
        takeover: bool,
        payload: Option<u8>,
    },
    InProgress {
        deadline: u64,
    },
    Completed {
        resp: u8,
        fp: Option<bool>,
        at: u64,
        exp: u64,
    },
    Mismatch,
    NotFound,
    Stored,
    PendingCompleted,
    Expires(u64),
    Done,
    Bool(bool),
    Applied(Option<u64>),
    Conflict(Option<u64>),
    Snapshot(Option<Seen>),
    Stale,
    WrongKind,
    BatchConflict {
        index: usize,
        current: Option<u64>,
    },
    InvalidBatch,
    /// Any other error: no valid linearization produces one.
    Other(String),
    /// The sweep answers a count for all keys at once; its per-key parts check state only.
    Ignored,
}

/// A snapshot as `get` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    InFlight {
        token: u64,
        deadline: u64,
        fp: Option<bool>,
        pending: bool,
    },
    Completed {
        resp: u8,
        fp: Option<bool>,
        at: u64,
        exp: u64,
    },
    Pending {
        payload: u8,
        exp: u64,
    },
    Value {
        version: u64,
        bytes: u8,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Model {
    pub now: u64,
    /// Every clock value so far, in order (an operation may act at any of them that is not
    /// older than its invocation).
    times: Vec<u64>,
    map: BTreeMap<u8, Rec>,
    seen: BTreeSet<u64>,
    last_seq: BTreeMap<u8, u64>,
}

impl Model {
    pub fn new() -> Self {
        Model {
            now: T0,
            times: vec![T0],
            map: BTreeMap::new(),
            seen: BTreeSet::new(),
            last_seq: BTreeMap::new(),
        }
    }

    /// A token or version handed out: unique in the store, above every earlier one for `key`.
    fn fresh(&mut self, key: u8, seq: u64) -> bool {
        let last = self.last_seq.get(&key).copied().unwrap_or(0);
        if seq <= last || !self.seen.insert(seq) {
            return false;
        }
        self.last_seq.insert(key, seq);
        true
    }

    /// The version of a value key now, pinning a fresh one to `observed` if it can be it.
    fn observe(&mut self, key: u8, observed: Option<u64>) -> bool {
        let ver = match self.map.get(&key) {
            None => return observed.is_none(),
            Some(Rec::Value { ver, .. }) => *ver,
            Some(_) => return false,
        };
        match (ver, observed) {
            (Ver::Known(v), Some(o)) => v == o,
            (Ver::Fresh { above }, Some(o)) if o > above && self.fresh(key, o) => {
                if let Some(Rec::Value { ver, .. }) = self.map.get_mut(&key) {
                    *ver = Ver::Known(o);
                }
                true
            }
            _ => false,
        }
    }

    fn holder(&self, key: u8, token: u64) -> Option<&Rec> {
        match self.map.get(&key) {
            Some(r @ Rec::InFlight { token: t, .. }) if *t == token => Some(r),
            _ => None,
        }
    }

    /// Every model state `call` can lead to while answering `out`, acting at some clock value
    /// not older than `clock_inv`.
    pub fn step(&self, call: &Call, out: &Out, clock_inv: u64) -> Vec<Model> {
        if let Call::Advance { ms } = call {
            let mut m = self.clone();
            m.now += ms;
            if *ms > 0 {
                m.times.push(m.now);
            }
            return if *out == Out::Done { vec![m] } else { vec![] };
        }
        let mut next: Vec<Model> = Vec::new();
        for &t in self
            .times
            .iter()
            .filter(|&&t| t >= clock_inv && t <= self.now)
        {
            let mut m = self.clone();
            if m.apply(call, out, t) && !next.contains(&m) {
                next.push(m);
            }
        }
        next
    }

    /// Applies `call` at time `t`; false if `out` is not what the store may answer.
    fn apply(&mut self, call: &Call, out: &Out, t: u64) -> bool {
        match call {
            Call::Begin {
                key,
                fp,
                lease_ms,
                wait,
            } => {
                let acquire = |m: &mut Model, takeover: bool| match out {
                    Out::Acquired {
                        token,
                        takeover: tk,
                        payload: None,
                    } if *tk == takeover && m.fresh(*key, *token) => {
                        m.map.insert(
                            *key,
                            Rec::InFlight {
                                token: *token,
                                deadline: t + lease_ms,
                                fp: Some(*fp),
                                pending: None,
                            },
                        );
                        true
                    }
                    _ => false,
                };
                match self.map.get(key).cloned() {
                    None => acquire(self, false),
                    Some(Rec::Completed { resp, fp: f, at }) if f == Some(*fp) => {
                        *out == Out::Completed {
                            resp,
                            fp: f,
                            at,
                            exp: at + DAY_MS,
                        }
                    }
                    Some(Rec::Completed { .. }) => *out == Out::Mismatch,
                    Some(Rec::InFlight {
                        fp: f,
                        pending: None,
                        ..
                    }) if f != Some(*fp) => *out == Out::Mismatch,
                    Some(Rec::InFlight {
                        pending: None,
                        deadline,
                        ..
                    }) if deadline > t => {
                        // A waiter with budget left never answers "in progress": it waits.
                        !wait && *out == Out::InProgress { deadline }
                    }
                    Some(Rec::InFlight { pending: None, .. }) => acquire(self, true),
                    Some(_) => *out == Out::WrongKind,
                }
            }
            Call::Complete {
                token,
                key,
                resp,
                writes,
            } => {
                let dup = writes
                    .iter()
                    .enumerate()
                    .any(|(i, w)| writes[..i].iter().any(|o| o.0 == w.0));
                if !writes.is_empty() && dup {
                    return *out == Out::InvalidBatch;
                }
                let Some(Rec::InFlight { fp, .. }) = self.holder(*key, *token).cloned() else {
                    return *out == Out::Stale;
                };
                for (i, &(k, kind)) in writes.iter().enumerate() {
                    match self.cas_check(k, kind) {
                        Check::Holds => {}
                        Check::Fails(current) => {
                            return *out == Out::BatchConflict { index: i, current };
                        }
                        // The fresh version may be the one asked for, or not: the answer says.
                        Check::Unknown => match out {
                            Out::BatchConflict { index, current } if *index == i => {
                                return self.observe(k, *current) && *current != cas_target(kind);
                            }
                            _ => {
                                if !self.observe(k, cas_target(kind)) {
                                    return false;
                                }
                            }
                        },
                    }
                }
                if *out != Out::Expires(t + DAY_MS) {
                    return false;
                }
                for &(k, kind) in writes {
                    let above = self.last_seq.get(&k).copied().unwrap_or(0);
                    match kind {
                        CasKind::DeleteIfVersion(_) => {
                            self.map.remove(&k);
                        }
                        CasKind::PutIfAbsent(b) | CasKind::SetIfVersion(_, b) => {
                            self.map.insert(
                                k,
                                Rec::Value {
                                    ver: Ver::Fresh { above },
                                    bytes: b,
                                },
                            );
                        }
                    }
                }
                self.map.insert(
                    *key,
                    Rec::Completed {
                        resp: *resp,
                        fp,
                        at: t,
                    },
                );
                true
            }
            Call::Release { token, key } => match self.holder(*key, *token).cloned() {
                Some(Rec::InFlight {
                    pending: Some(p), ..
                }) => {
                    self.map.insert(
                        *key,
                        Rec::Pending {
                            payload: p,
                            exp: t + DAY_MS,
                        },
                    );
                    *out == Out::Done
                }
                Some(_) => {
                    self.map.remove(key);
                    *out == Out::Done
                }
                None => *out == Out::Stale,
            },
            Call::Renew { token, key, ms } => {
                if self.holder(*key, *token).is_none() {
                    return *out == Out::Stale;
                }
                if let Some(Rec::InFlight { deadline, .. }) = self.map.get_mut(key) {
                    *deadline = t + ms;
                }
                *out == Out::Expires(t + ms)
            }
            Call::Cas { key, kind } => {
                let ok = match self.cas_check(*key, *kind) {
                    Check::Holds => true,
                    Check::Fails(current) => return *out == Out::Conflict(current),
                    Check::Unknown => match out {
                        Out::Conflict(current) => {
                            return *current != cas_target(*kind) && self.observe(*key, *current);
                        }
                        _ => self.observe(*key, cas_target(*kind)),
                    },
                };
                if !ok {
                    return false;
                }
                match (kind, out) {
                    (CasKind::DeleteIfVersion(_), Out::Applied(None)) => {
                        self.map.remove(key);
                        true
                    }
                    (
                        CasKind::PutIfAbsent(b) | CasKind::SetIfVersion(_, b),
                        Out::Applied(Some(v)),
                    ) => {
                        if !self.fresh(*key, *v) {
                            return false;
                        }
                        self.map.insert(
                            *key,
                            Rec::Value {
                                ver: Ver::Known(*v),
                                bytes: *b,
                            },
                        );
                        true
                    }
                    _ => false,
                }
            }
            Call::Remove { key } => {
                let was = self.map.remove(key).is_some();
                *out == Out::Bool(was)
            }
            Call::PutPending { key, payload } => match self.map.get(key).cloned() {
                None | Some(Rec::Pending { .. }) => {
                    self.map.insert(
                        *key,
                        Rec::Pending {
                            payload: *payload,
                            exp: t + DAY_MS,
                        },
                    );
                    *out == Out::Stored
                }
                Some(Rec::InFlight {
                    pending: Some(_),
                    deadline,
                    ..
                }) => *out == Out::InProgress { deadline },
                Some(Rec::Completed { .. }) => *out == Out::PendingCompleted,
                Some(_) => *out == Out::WrongKind,
            },
            Call::TakePending { key, lease_ms } => {
                let acquire = |m: &mut Model, payload: u8, takeover: bool| match out {
                    Out::Acquired {
                        token,
                        takeover: tk,
                        payload: Some(p),
                    } if *tk == takeover && *p == payload && m.fresh(*key, *token) => {
                        m.map.insert(
                            *key,
                            Rec::InFlight {
                                token: *token,
                                deadline: t + lease_ms,
                                fp: None,
                                pending: Some(payload),
                            },
                        );
                        true
                    }
                    _ => false,
                };
                match self.map.get(key).cloned() {
                    None => *out == Out::NotFound,
                    Some(Rec::Pending { payload, .. }) => acquire(self, payload, false),
                    Some(Rec::InFlight {
                        pending: Some(_),
                        deadline,
                        ..
                    }) if deadline > t => *out == Out::InProgress { deadline },
                    Some(Rec::InFlight {
                        pending: Some(p), ..
                    }) => acquire(self, p, true),
                    Some(Rec::Completed { resp, fp, at }) => {
                        *out == Out::Completed {
                            resp,
                            fp,
                            at,
                            exp: at + DAY_MS,
                        }
                    }
                    Some(_) => *out == Out::WrongKind,
                }
            }
            Call::Get { key } => {
                let Out::Snapshot(got) = out else {
                    return false;
                };
                let want = match self.map.get(key).cloned() {
                    None => None,
                    Some(Rec::InFlight {
                        token,
                        deadline,
                        fp,
                        pending,
                    }) => Some(Seen::InFlight {
                        token,
                        deadline,
                        fp,
                        pending: pending.is_some(),
                    }),
                    Some(Rec::Completed { resp, fp, at }) => Some(Seen::Completed {
                        resp,
                        fp,
                        at,
                        exp: at + DAY_MS,
                    }),
                    Some(Rec::Pending { payload, exp }) => Some(Seen::Pending { payload, exp }),
                    Some(Rec::Value { bytes, .. }) => {
                        let Some(Seen::Value { version, bytes: b }) = got else {
                            return false;
                        };
                        return *b == bytes && self.observe(*key, Some(*version));
                    }
                };
                *got == want
            }
            Call::Sweep { key } => {
                if let Some(Rec::InFlight { deadline, .. }) = self.map.get(key)
                    && deadline + RETENTION_MS <= t
                {
                    self.map.remove(key);
                }
                *out == Out::Ignored
            }
            Call::Advance { .. } => unreachable!("handled in step"),
        }
    }

    fn cas_check(&self, key: u8, kind: CasKind) -> Check {
        let current = match self.map.get(&key) {
            None => None,
            Some(Rec::Value {
                ver: Ver::Known(v), ..
            }) => Some(*v),
            Some(Rec::Value {
                ver: Ver::Fresh { .. },
                ..
            }) => {
                // put-if-absent fails, and the conflict names the version nobody saw yet, as
                // a versioned write may or may not match it: the answer tells.
                return Check::Unknown;
            }
            // Value keys hold values only (nothing else is ever written to them).
            Some(_) => return Check::Fails(None),
        };
        let holds = match kind {
            CasKind::PutIfAbsent(_) => current.is_none(),
            CasKind::SetIfVersion(v, _) | CasKind::DeleteIfVersion(v) => current == Some(v),
        };
        if holds {
            Check::Holds
        } else {
            Check::Fails(current)
        }
    }
}

enum Check {
    Holds,
    Fails(Option<u64>),
    /// Depends on a fresh version nobody has seen yet.
    Unknown,
}

/// The version a cas or batch write asks for (`None` for put-if-absent: "no value").
fn cas_target(kind: CasKind) -> Option<u64> {
    match kind {
        CasKind::PutIfAbsent(_) => None,
        CasKind::SetIfVersion(v, _) | CasKind::DeleteIfVersion(v) => Some(v),
    }
}
