//! Model-based test: random operation sequences with clock advances, applied to the store and to
//! a plain `BTreeMap` model; every outcome, and every key's visible state after every step, must
//! agree. Tokens and versions are checked to be unique and increasing.
//!
//! `PROPTEST_CASES=5000 cargo test --release --test model` for a long run.

use std::collections::BTreeMap;
use std::time::Duration;

use idemkv::{
    Begin, CasOp, CasOutcome, Durability, Error, Fingerprint, IdempotencyStore, Lease, LeaseSync,
    ManualClock, OwnedKey, PutPending, Snapshot, Store, Take, Timestamp, Write,
};
use proptest::prelude::*;

const T0: u64 = 1_000_000;
const RETENTION_MS: u64 = 5_000;
const DEFAULT_TTL_MS: u64 = 24 * 3600 * 1000;

// ---------------------------------------------------------------- strategies

#[derive(Clone, Debug)]
enum Op {
    Begin {
        key: u8,
        fp: u8,
        lease_ms: u64,
    },
    Complete {
        lease: usize,
        resp: Vec<u8>,
        ttl_ms: Option<u64>,
    },
    /// `begin_many` of these keys (repeats included).
    BeginMany {
        keys: Vec<(u8, u8)>,
        lease_ms: u64,
    },
    /// `complete_many` of these leases (repeats included).
    CompleteMany {
        items: Vec<(usize, Vec<u8>, Option<u64>)>,
    },
    Batch {
        lease: usize,
        resp: Vec<u8>,
        writes: Vec<(u8, u8, bool)>,
    },
    Release {
        lease: usize,
    },
    Renew {
        lease: usize,
        ms: u64,
    },
    Get {
        key: u8,
    },
    Remove {
        key: u8,
    },
    Cas {
        key: u8,
        kind: u8,
        use_current: bool,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    },
    PutPending {
        key: u8,
        payload: Vec<u8>,
        ttl_ms: Option<u64>,
    },
    TakePending {
        key: u8,
        lease_ms: u64,
    },
    Advance {
        ms: u64,
    },
    Sweep,
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..6)
}

/// Durations on a 100 ms grid, so that "deadline == now" boundaries are hit often.
fn ms(max_steps: u64) -> impl Strategy<Value = u64> + Clone {
    (1..max_steps).prop_map(|n| n * 100)
}

fn ttl() -> impl Strategy<Value = Option<u64>> {
    prop::option::of(ms(50))
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0u8..8;
    prop_oneof![
        4 => (key.clone(), 0u8..2, ms(10)).prop_map(|(key, fp, lease_ms)| Op::Begin { key, fp, lease_ms }),
        3 => (any::<usize>(), bytes(), ttl()).prop_map(|(lease, resp, ttl_ms)| Op::Complete { lease, resp, ttl_ms }),
        1 => (prop::collection::vec((key.clone(), 0u8..2), 1..6), ms(10)).prop_map(|(keys, lease_ms)| Op::BeginMany { keys, lease_ms }),
        1 => prop::collection::vec((any::<usize>(), bytes(), ttl()), 1..5).prop_map(|items| Op::CompleteMany { items }),
        1 => (any::<usize>(), bytes(), prop::collection::vec((0u8..8, 0u8..3, any::<bool>()), 0..4))
            .prop_map(|(lease, resp, writes)| Op::Batch { lease, resp, writes }),
        1 => any::<usize>().prop_map(|lease| Op::Release { lease }),
        1 => (any::<usize>(), ms(10)).prop_map(|(lease, ms)| Op::Renew { lease, ms }),
        1 => key.clone().prop_map(|key| Op::Get { key }),
        1 => key.clone().prop_map(|key| Op::Remove { key }),
        2 => (key.clone(), 0u8..3, any::<bool>(), bytes(), ttl())
            .prop_map(|(key, kind, use_current, value, ttl_ms)| Op::Cas { key, kind, use_current, value, ttl_ms }),
        2 => (key.clone(), bytes(), ttl()).prop_map(|(key, payload, ttl_ms)| Op::PutPending { key, payload, ttl_ms }),
        2 => (key, ms(10)).prop_map(|(key, lease_ms)| Op::TakePending { key, lease_ms }),
        2 => (0u64..10).prop_map(|n| Op::Advance { ms: n * 100 }),
        1 => Just(Op::Sweep),
    ]
}

/// Keys: 8 keys over 2 scopes, the same ids in both (scopes must keep them apart).
fn key_of(i: u8) -> OwnedKey {
    OwnedKey::new(
        if i < 4 { "scope-a" } else { "scope-b" },
        format!("k{}", i % 4),
    )
}

fn fp_of(i: u8) -> Fingerprint {
    Fingerprint::of(&[i])
}

// ---------------------------------------------------------------- reference model

#[derive(Clone, Debug, PartialEq)]
enum M {
    InFlight {
        token: u64,
        deadline: u64,
        fp: Fingerprint,
        pending: Option<Vec<u8>>,
    },
    Completed {
        resp: Vec<u8>,
        fp: Fingerprint,
        at: u64,
        exp: u64,
    },
    Pending {
        payload: Vec<u8>,
        exp: u64,
    },
    Value {
        version: u64,
        bytes: Vec<u8>,
        exp: Option<u64>,
    },
}

impl M {
    fn alive(&self, now: u64) -> bool {
        match self {
            M::InFlight { .. } => true,
            M::Completed { exp, .. } | M::Pending { exp, .. } => *exp > now,
            M::Value { exp, .. } => exp.is_none_or(|e| e > now),
        }
    }
    fn reclaimable(&self, now: u64) -> bool {
        match self {
            M::InFlight { deadline, .. } => deadline + RETENTION_MS <= now,
            _ => !self.alive(now),
        }
    }
    fn value_len(&self) -> usize {
        match self {
            M::InFlight { pending, .. } => pending.as_ref().map_or(0, Vec::len),
            M::Completed { resp, .. } => resp.len(),
            M::Pending { payload, .. } => payload.len(),
            M::Value { bytes, .. } => bytes.len(),
        }
    }
}

struct Model {
    now: u64,
    map: BTreeMap<OwnedKey, M>,
    /// Every token and version handed out, and the last one per key.
    seen: std::collections::HashSet<u64>,
    last_seq: BTreeMap<OwnedKey, u64>,
}

impl Model {
    fn live(&self, k: &OwnedKey) -> Option<&M> {
        self.map.get(k).filter(|m| m.alive(self.now))
    }

    /// A token or version handed out by the store must be unique in the store and larger than
    /// every one handed out before for the same key.
    fn fresh(&mut self, k: &OwnedKey, seq: u64) {
        assert!(
            self.seen.insert(seq),
            "token/version {seq} handed out twice"
        );
        let last = self.last_seq.entry(k.clone()).or_insert(0);
        assert!(
            seq > *last,
            "token/version {seq} for {k:?} not above {last}"
        );
        *last = seq;
    }

    fn snapshot(&self, k: &OwnedKey) -> Option<Snapshot> {
        Some(match self.live(k)? {
            M::InFlight {
                token,
                deadline,
                fp,
                pending,
            } => Snapshot::InFlight {
                token: *token,
                deadline: Timestamp::from_millis(*deadline),
                fingerprint: *fp,
                pending: pending.is_some(),
            },
            M::Completed { resp, fp, at, exp } => {
                Snapshot::Completed(completed(resp, *fp, *at, *exp))
            }
            M::Pending { payload, exp } => Snapshot::Pending {
                payload: payload.clone(),
                expires_at: Timestamp::from_millis(*exp),
            },
            M::Value {
                version,
                bytes,
                exp,
            } => Snapshot::Value(idemkv::Versioned {
                version: *version,
                value: bytes.clone(),
                expires_at: exp.map(Timestamp::from_millis),
            }),
        })
    }

    /// The lease's record, if the lease is still its holder.
    fn holder(&self, lease: &Lease) -> Option<&M> {
        let k = lease.key().to_owned();
        match self.map.get(&k) {
            Some(m @ M::InFlight { token, .. }) if *token == lease.token() => Some(m),
            _ => None,
        }
    }

    fn cas_current(&self, k: &OwnedKey) -> Result<Option<u64>, ()> {
        match self.live(k) {
            None => Ok(None),
            Some(M::Value { version, .. }) => Ok(Some(*version)),
            Some(_) => Err(()),
        }
    }
}

fn completed(resp: &[u8], fp: Fingerprint, at: u64, exp: u64) -> idemkv::Completed {
    idemkv::Completed {
        response: resp.to_vec(),
        fingerprint: fp,
        completed_at: Timestamp::from_millis(at),
        expires_at: Timestamp::from_millis(exp),
    }
}

fn cas_holds(op: &CasOp, current: Option<u64>) -> bool {
    match op {
        CasOp::PutIfAbsent(_) => current.is_none(),
        CasOp::SetIfVersion { version, .. } | CasOp::DeleteIfVersion { version } => {
            current == Some(*version)
        }
    }
}

fn make_op(kind: u8, use_current: bool, current: Option<u64>, value: Vec<u8>) -> CasOp {
    // `use_current` aims at the real version; otherwise at a version that never exists.
    let version = if use_current {
        current.unwrap_or(1)
    } else {
        u64::MAX
    };
    match kind {
        0 => CasOp::PutIfAbsent(value),
        1 => CasOp::SetIfVersion { version, value },
        _ => CasOp::DeleteIfVersion { version },
    }
}

fn new_value(model: &mut Model, outcome: CasOutcome, op: &CasOp, k: &OwnedKey, exp: Option<u64>) {
    match (op, outcome) {
        (CasOp::DeleteIfVersion { .. }, CasOutcome::Applied { version: None }) => {
            model.map.remove(k);
        }
        (
            CasOp::PutIfAbsent(v) | CasOp::SetIfVersion { value: v, .. },
            CasOutcome::Applied { version: Some(ver) },
        ) => {
            model.fresh(k, ver);
            model.map.insert(
                k.clone(),
                M::Value {
                    version: ver,
                    bytes: v.clone(),
                    exp,
                },
            );
        }
        other => panic!("unexpected cas outcome {other:?}"),
    }
}

/// Records in the model that `l` holds `k` until `deadline`.
fn held_by(
    model: &mut Model,
    leases: &mut Vec<Lease>,
    k: OwnedKey,
    l: Lease,
    deadline: u64,
    fp: Fingerprint,
) {
    model.fresh(&k, l.token());
    model.map.insert(
        k,
        M::InFlight {
            token: l.token(),
            deadline,
            fp,
            pending: None,
        },
    );
    leases.push(l);
}

/// Checks what `begin` of `k` answered (`got`) against the model, and applies it there.
fn check_begin(
    model: &mut Model,
    leases: &mut Vec<Lease>,
    k: OwnedKey,
    fp: Fingerprint,
    lease_ms: u64,
    got: Result<Begin, Error>,
) {
    let deadline = model.now + lease_ms;
    match (model.live(&k).cloned(), got) {
        (None, Ok(Begin::Acquired(l))) => {
            assert!(!l.is_takeover());
            held_by(model, leases, k, l, deadline, fp);
        }
        (Some(M::Completed { fp: f, .. }), Ok(Begin::Mismatch)) if f != fp => {}
        (
            Some(M::Completed {
                resp,
                fp: f,
                at,
                exp,
            }),
            Ok(Begin::Completed(c)),
        ) if f == fp => {
            assert_eq!(c, completed(&resp, f, at, exp));
        }
        (
            Some(M::InFlight {
                fp: f,
                pending: None,
                ..
            }),
            Ok(Begin::Mismatch),
        ) if f != fp => {}
        (
            Some(M::InFlight {
                fp: f,
                pending: None,
                deadline: d,
                ..
            }),
            Ok(Begin::InProgress { deadline: got }),
        ) if f == fp && d > model.now => {
            assert_eq!(got.as_millis(), d);
        }
        (
            Some(M::InFlight {
                fp: f,
                pending: None,
                deadline: d,
                ..
            }),
            Ok(Begin::Acquired(l)),
        ) if f == fp && d <= model.now => {
            assert!(l.is_takeover());
            held_by(model, leases, k, l, deadline, fp);
        }
        (
            Some(
                M::InFlight {
                    pending: Some(_), ..
                }
                | M::Pending { .. }
                | M::Value { .. },
            ),
            Err(Error::WrongKind { .. }),
        ) => {}
        (m, got) => panic!("begin {k:?}: model {m:?}, store {got:?}"),
    }
}

/// Checks what `complete` of `l` answered (`got`) against the model, and applies it there.
fn check_complete(
    model: &mut Model,
    l: &Lease,
    resp: Vec<u8>,
    ttl_ms: Option<u64>,
    got: Result<Timestamp, Error>,
) {
    match model.holder(l).cloned() {
        Some(M::InFlight { fp, .. }) => {
            let exp = model.now + ttl_ms.unwrap_or(DEFAULT_TTL_MS);
            assert_eq!(got, Ok(Timestamp::from_millis(exp)));
            let at = model.now;
            model
                .map
                .insert(l.key().to_owned(), M::Completed { resp, fp, at, exp });
        }
        _ => assert_eq!(got, Err(Error::StaleLease { token: l.token() })),
    }
}

// ---------------------------------------------------------------- system under test

/// The handle a batch call of `n` items goes through: one of several items through a handle
/// whose calls are `Immediate`, the one case where the embedded store takes the batch path
/// (`src/embedded/many.rs`; in memory nothing waits, and repeats within a call are where it
/// can go wrong); a single item through the store itself, which then makes one call a key.
fn many_handle<'a>(store: &'a Store, immediate: &'a Store, n: usize) -> &'a Store {
    if n >= 2 { immediate } else { store }
}

fn run(ops: Vec<Op>) {
    let clock = ManualClock::new(T0);
    let store = Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .lease_retention(Duration::from_millis(RETENTION_MS))
        .shards(4)
        .build()
        .expect("store");
    let immediate = store.with_durability(Durability::Immediate);
    let mut model = Model {
        now: T0,
        map: BTreeMap::new(),
        seen: Default::default(),
        last_seq: BTreeMap::new(),
    };
    let mut leases: Vec<Lease> = Vec::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    for op in ops {
        match op {
            Op::Begin { key, fp, lease_ms } => {
                let k = key_of(key);
                let fp = fp_of(fp);
                let got = store.blocking_begin(k.as_key(), fp, Duration::from_millis(lease_ms));
                check_begin(&mut model, &mut leases, k, fp, lease_ms, got);
            }
            Op::BeginMany { keys, lease_ms } => {
                let owned: Vec<(OwnedKey, Fingerprint)> =
                    keys.iter().map(|&(k, f)| (key_of(k), fp_of(f))).collect();
                let refs: Vec<(idemkv::Key<'_>, Fingerprint)> =
                    owned.iter().map(|(k, f)| (k.as_key(), *f)).collect();
                let lease = Duration::from_millis(lease_ms);
                let got = rt
                    .block_on(IdempotencyStore::begin_many(
                        many_handle(&store, &immediate, refs.len()),
                        &refs,
                        lease,
                        LeaseSync::Deferred,
                    ))
                    .expect("no limit or log to refuse it");
                assert_eq!(got.len(), owned.len());
                // One after another, as if each were its own `begin` at the same instant.
                for ((k, fp), got) in owned.into_iter().zip(got) {
                    check_begin(&mut model, &mut leases, k, fp, lease_ms, got);
                }
            }
            Op::Complete {
                lease,
                resp,
                ttl_ms,
            } => {
                if leases.is_empty() {
                    continue;
                }
                let l = &leases[lease % leases.len()];
                let got = store.blocking_complete(l, &resp, ttl_ms.map(Duration::from_millis));
                check_complete(&mut model, l, resp, ttl_ms, got);
            }
            Op::CompleteMany { items } => {
                if leases.is_empty() {
                    continue;
                }
                let picked: Vec<(&Lease, Vec<u8>, Option<u64>)> = items
                    .into_iter()
                    .map(|(i, resp, ttl_ms)| (&leases[i % leases.len()], resp, ttl_ms))
                    .collect();
                let batch: Vec<idemkv::Completion<'_>> = picked
                    .iter()
                    .map(|(l, resp, ttl_ms)| idemkv::Completion {
                        ttl: ttl_ms.map(Duration::from_millis),
                        ..idemkv::Completion::new(l, resp)
                    })
                    .collect();
                let got = rt
                    .block_on(IdempotencyStore::complete_many(
                        many_handle(&store, &immediate, batch.len()),
                        &batch,
                    ))
                    .expect("no limit or log to refuse it");
                for ((l, resp, ttl_ms), got) in picked.iter().zip(got) {
                    check_complete(&mut model, l, resp.clone(), *ttl_ms, got);
                }
            }
            Op::Batch {
                lease,
                resp,
                writes,
            } => {
                if leases.is_empty() {
                    continue;
                }
                let l = &leases[lease % leases.len()];
                let lk = l.key().to_owned();
                let mut batch = Vec::new();
                for (key, kind, use_current) in writes {
                    let k = OwnedKey::new("values", format!("v{key}"));
                    let current = model.cas_current(&k).ok().flatten();
                    batch.push(Write {
                        key: k,
                        op: make_op(kind, use_current, current, vec![key]),
                        ttl: None,
                    });
                }
                let got = store.blocking_complete_with(l, &resp, None, &batch);
                let dup = batch
                    .iter()
                    .enumerate()
                    .any(|(i, w)| batch[..i].iter().any(|o| o.key == w.key));
                if !batch.is_empty() && dup {
                    assert!(matches!(got, Err(Error::InvalidBatch { .. })), "{got:?}");
                    continue;
                }
                let Some(M::InFlight { fp, .. }) = model.holder(l).cloned() else {
                    assert_eq!(got, Err(Error::StaleLease { token: l.token() }));
                    continue;
                };
                let mut expected_err = None;
                for (i, w) in batch.iter().enumerate() {
                    let current = model
                        .cas_current(&w.key)
                        .expect("values scope holds values only");
                    if !cas_holds(&w.op, current) {
                        expected_err = Some(Error::BatchConflict { index: i, current });
                        break;
                    }
                }
                if let Some(e) = expected_err {
                    assert_eq!(got, Err(e));
                    continue;
                }
                let exp = model.now + DEFAULT_TTL_MS;
                assert_eq!(got, Ok(Timestamp::from_millis(exp)));
                for w in &batch {
                    // Versions from a batch are read back from the store (they are fresh).
                    match store.blocking_get(w.key.as_key()).expect("get") {
                        Some(Snapshot::Value(v)) => {
                            model.fresh(&w.key, v.version);
                            model.map.insert(
                                w.key.clone(),
                                M::Value {
                                    version: v.version,
                                    bytes: v.value,
                                    exp: None,
                                },
                            );
                        }
                        None => {
                            assert!(matches!(w.op, CasOp::DeleteIfVersion { .. }));
                            model.map.remove(&w.key);
                        }
                        other => panic!("{other:?}"),
                    }
                }
                let at = model.now;
                model.map.insert(lk, M::Completed { resp, fp, at, exp });
            }
            Op::Release { lease } => {
                if leases.is_empty() {
                    continue;
                }
                let l = leases.remove(lease % leases.len());
                let token = l.token();
                let k = l.key().to_owned();
                let expected = model.holder(&l).cloned();
                let got = store.blocking_release(l);
                match expected {
                    Some(M::InFlight {
                        pending: Some(p), ..
                    }) => {
                        assert_eq!(got, Ok(()));
                        let exp = model.now + DEFAULT_TTL_MS;
                        model.map.insert(k, M::Pending { payload: p, exp });
                    }
                    Some(_) => {
                        assert_eq!(got, Ok(()));
                        model.map.remove(&k);
                    }
                    None => assert_eq!(got, Err(Error::StaleLease { token })),
                }
            }
            Op::Renew { lease, ms } => {
                if leases.is_empty() {
                    continue;
                }
                let i = lease % leases.len();
                let got = store.blocking_renew(&mut leases[i], Duration::from_millis(ms));
                let new_deadline = model.now + ms;
                let k = leases[i].key().to_owned();
                match model.holder(&leases[i]).is_some() {
                    true => {
                        assert_eq!(got, Ok(Timestamp::from_millis(new_deadline)));
                        if let Some(M::InFlight { deadline, .. }) = model.map.get_mut(&k) {
                            *deadline = new_deadline;
                        }
                    }
                    false => assert_eq!(
                        got,
                        Err(Error::StaleLease {
                            token: leases[i].token()
                        })
                    ),
                }
            }
            Op::Get { key } => {
                let k = key_of(key);
                assert_eq!(
                    store.blocking_get(k.as_key()).expect("get"),
                    model.snapshot(&k)
                );
            }
            Op::Remove { key } => {
                let k = key_of(key);
                let was = model.live(&k).is_some();
                assert_eq!(store.blocking_remove(k.as_key()), Ok(was));
                model.map.remove(&k);
            }
            Op::Cas {
                key,
                kind,
                use_current,
                value,
                ttl_ms,
            } => {
                let k = key_of(key);
                let current = model.cas_current(&k);
                let op = make_op(kind, use_current, current.ok().flatten(), value);
                let got = store.blocking_cas(&Write {
                    key: k.clone(),
                    op: op.clone(),
                    ttl: ttl_ms.map(Duration::from_millis),
                });
                match current {
                    Err(()) => assert!(matches!(got, Err(Error::WrongKind { .. })), "{got:?}"),
                    Ok(cur) if !cas_holds(&op, cur) => {
                        assert_eq!(got, Ok(CasOutcome::Conflict { current: cur }))
                    }
                    Ok(_) => {
                        let exp = ttl_ms.map(|t| model.now + t);
                        new_value(&mut model, got.expect("cas"), &op, &k, exp);
                    }
                }
            }
            Op::PutPending {
                key,
                payload,
                ttl_ms,
            } => {
                let k = key_of(key);
                let got = store.blocking_put_pending(
                    k.as_key(),
                    &payload,
                    ttl_ms.map(Duration::from_millis),
                );
                let exp = model.now + ttl_ms.unwrap_or(DEFAULT_TTL_MS);
                match model.live(&k).cloned() {
                    None | Some(M::Pending { .. }) => {
                        assert_eq!(got, Ok(PutPending::Stored));
                        model.map.insert(k, M::Pending { payload, exp });
                    }
                    Some(M::InFlight {
                        pending: Some(_),
                        deadline,
                        ..
                    }) => {
                        assert_eq!(
                            got,
                            Ok(PutPending::InProgress {
                                deadline: Timestamp::from_millis(deadline)
                            })
                        );
                    }
                    Some(M::Completed { .. }) => assert_eq!(got, Ok(PutPending::Completed)),
                    Some(_) => assert!(matches!(got, Err(Error::WrongKind { .. })), "{got:?}"),
                }
            }
            Op::TakePending { key, lease_ms } => {
                let k = key_of(key);
                let got = store.blocking_take_pending(k.as_key(), Duration::from_millis(lease_ms));
                let deadline = model.now + lease_ms;
                match (model.live(&k).cloned(), got) {
                    (None, Ok(Take::NotFound)) => {}
                    (
                        Some(M::Pending { payload, .. }),
                        Ok(Take::Acquired { lease, payload: p }),
                    ) => {
                        assert_eq!(p, payload);
                        assert!(!lease.is_takeover());
                        model.fresh(&k, lease.token());
                        model.map.insert(
                            k,
                            M::InFlight {
                                token: lease.token(),
                                deadline,
                                fp: Fingerprint::NONE,
                                pending: Some(payload),
                            },
                        );
                        leases.push(lease);
                    }
                    (
                        Some(M::InFlight {
                            pending: Some(_),
                            deadline: d,
                            ..
                        }),
                        Ok(Take::InProgress { deadline: g }),
                    ) if d > model.now => {
                        assert_eq!(g.as_millis(), d);
                    }
                    (
                        Some(M::InFlight {
                            pending: Some(payload),
                            deadline: d,
                            ..
                        }),
                        Ok(Take::Acquired { lease, payload: p }),
                    ) if d <= model.now => {
                        assert_eq!(p, payload);
                        assert!(lease.is_takeover());
                        model.fresh(&k, lease.token());
                        model.map.insert(
                            k,
                            M::InFlight {
                                token: lease.token(),
                                deadline,
                                fp: Fingerprint::NONE,
                                pending: Some(payload),
                            },
                        );
                        leases.push(lease);
                    }
                    (Some(M::Completed { resp, fp, at, exp }), Ok(Take::Completed(c))) => {
                        assert_eq!(c, completed(&resp, fp, at, exp));
                    }
                    (
                        Some(M::InFlight { pending: None, .. } | M::Value { .. }),
                        Err(Error::WrongKind { .. }),
                    ) => {}
                    (m, got) => panic!("take {k:?}: model {m:?}, store {got:?}"),
                }
            }
            Op::Advance { ms } => {
                clock.advance(Duration::from_millis(ms));
                model.now += ms;
            }
            Op::Sweep => {
                store.sweep_expired();
                let now = model.now;
                model.map.retain(|_, m| !m.reclaimable(now));
                let stats = store.stats();
                assert_eq!(stats.records, model.map.len() as u64);
                let bytes: usize = model
                    .map
                    .iter()
                    .map(|(k, m)| {
                        40 + k.as_key().scope().len() + k.as_key().id().len() + m.value_len()
                    })
                    .sum();
                assert_eq!(stats.bytes, bytes as u64);
            }
        }
        // After every step, every key looks the same in both.
        for i in 0..8 {
            let k = key_of(i);
            assert_eq!(
                store.blocking_get(k.as_key()).expect("get"),
                model.snapshot(&k),
                "key {k:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops);
    }
}

#[test]
fn model_checks_scope_separation_and_takeover() {
    // A fixed sequence that must exercise a takeover, a stale completion and a replay.
    run(vec![
        Op::Begin {
            key: 0,
            fp: 0,
            lease_ms: 100,
        },
        Op::Begin {
            key: 4,
            fp: 0,
            lease_ms: 100,
        },
        Op::Advance { ms: 100 },
        Op::Begin {
            key: 0,
            fp: 0,
            lease_ms: 100,
        },
        Op::Complete {
            lease: 0,
            resp: b"stale".to_vec(),
            ttl_ms: None,
        },
        Op::Complete {
            lease: 2,
            resp: b"fresh".to_vec(),
            ttl_ms: Some(10),
        },
        Op::Begin {
            key: 0,
            fp: 0,
            lease_ms: 100,
        },
        Op::Advance { ms: 10 },
        Op::Sweep,
    ]);
}
