//! Unit tests of the store's operations, on a manual clock.

use super::*;
use crate::clock::ManualClock;
use crate::*;

const LEASE: Duration = Duration::from_secs(10);
const T0: u64 = 1_700_000_000_000;

fn store() -> (Store, ManualClock) {
    let clock = ManualClock::new(T0);
    let s = Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .build()
        .unwrap();
    (s, clock)
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s.as_bytes())
}

fn acquire(s: &Store, k: Key<'_>, f: &str) -> Lease {
    match s.blocking_begin(k, fp(f), LEASE).unwrap() {
        Begin::Acquired(l) => l,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

fn value_of(s: &Store, k: &OwnedKey) -> Option<Versioned> {
    match s.blocking_get(k.as_key()).unwrap() {
        Some(Snapshot::Value(v)) => Some(v),
        None => None,
        other => panic!("not a value: {other:?}"),
    }
}

#[test]
fn begin_complete_replay() {
    let (s, _) = store();
    let k = Key::new("t", "k1");
    let lease = acquire(&s, k, "a");
    assert!(!lease.is_takeover());
    assert_eq!(lease.deadline(), Timestamp::from_millis(T0 + 10_000));
    assert!(matches!(
        s.blocking_begin(k, fp("a"), LEASE).unwrap(),
        Begin::InProgress { deadline } if deadline == lease.deadline()
    ));
    let exp = s.blocking_complete(&lease, b"resp", None).unwrap();
    assert_eq!(exp, Timestamp::from_millis(T0 + 24 * 3600 * 1000));
    match s.blocking_begin(k, fp("a"), LEASE).unwrap() {
        Begin::Completed(c) => {
            assert_eq!(c.response, b"resp");
            assert_eq!(c.completed_at, Timestamp::from_millis(T0));
            assert_eq!(c.fingerprint, fp("a"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.blocking_begin(k, fp("b"), LEASE).unwrap(),
        Begin::Mismatch
    ));
    let st = s.stats();
    assert_eq!(
        (
            st.acquired,
            st.in_progress,
            st.replayed,
            st.mismatches,
            st.records
        ),
        (1, 1, 1, 1, 1)
    );
    assert_eq!(st.bytes, (40 + 1 + 2 + 4) as u64);
}

#[test]
fn mismatch_while_in_flight() {
    let (s, _) = store();
    let k = Key::new("t", "k");
    let _l = acquire(&s, k, "a");
    assert!(matches!(
        s.blocking_begin(k, fp("b"), LEASE).unwrap(),
        Begin::Mismatch
    ));
}

#[test]
fn scopes_never_meet() {
    let (s, _) = store();
    let l1 = acquire(&s, Key::new("tenant-a", "same"), "x");
    let l2 = acquire(&s, Key::new("tenant-b", "same"), "x");
    s.blocking_complete(&l1, b"a", None).unwrap();
    s.blocking_complete(&l2, b"b", None).unwrap();
    let Begin::Completed(c) = s
        .blocking_begin(Key::new("tenant-b", "same"), fp("x"), LEASE)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(c.response, b"b");
    // The length prefix keeps ("ab","c") and ("a","bc") apart.
    let _ = acquire(&s, Key::new("ab", "c"), "x");
    let _ = acquire(&s, Key::new("a", "bc"), "x");
}

#[test]
fn expired_lease_is_taken_over_and_old_holder_is_fenced() {
    let (s, clock) = store();
    let k = Key::new("t", "k");
    let old = acquire(&s, k, "a");
    clock.advance(LEASE);
    let new = acquire(&s, k, "a");
    assert!(new.is_takeover());
    assert!(new.token() > old.token());
    assert_eq!(
        s.blocking_complete(&old, b"old", None),
        Err(Error::StaleLease { token: old.token() })
    );
    let mut old = old;
    assert!(matches!(
        s.blocking_renew(&mut old, LEASE),
        Err(Error::StaleLease { .. })
    ));
    assert!(matches!(
        s.blocking_release(old),
        Err(Error::StaleLease { .. })
    ));
    assert!(
        matches!(s.blocking_get(k).unwrap(), Some(Snapshot::InFlight { token, .. }) if token == new.token())
    );
    s.blocking_complete(&new, b"new", None).unwrap();
    assert_eq!(s.stats().takeovers, 1);
}

#[test]
fn an_expired_lease_not_taken_over_can_still_complete() {
    let (s, clock) = store();
    let k = Key::new("t", "k");
    let l = acquire(&s, k, "a");
    clock.advance(LEASE * 3);
    s.blocking_complete(&l, b"late but fine", None).unwrap();
}

#[test]
fn release_lets_the_next_begin_run_again() {
    let (s, _) = store();
    let k = Key::new("t", "k");
    let l = acquire(&s, k, "a");
    s.blocking_release(l).unwrap();
    assert_eq!(s.stats().records, 0);
    let l2 = acquire(&s, k, "other fingerprint is fine after a release");
    assert!(!l2.is_takeover());
}

#[test]
fn renew_extends_the_deadline() {
    let (s, clock) = store();
    let k = Key::new("t", "k");
    let mut l = acquire(&s, k, "a");
    clock.advance(Duration::from_secs(8));
    let d = s.blocking_renew(&mut l, Duration::from_secs(10)).unwrap();
    assert_eq!(d, Timestamp::from_millis(T0 + 18_000));
    assert_eq!(l.deadline(), d);
    clock.advance(Duration::from_secs(5));
    assert!(matches!(
        s.blocking_begin(k, fp("a"), LEASE).unwrap(),
        Begin::InProgress { .. }
    ));
    assert_eq!(
        s.blocking_renew(&mut l, Duration::ZERO),
        Err(Error::ZeroDuration {
            what: "the lease extension"
        })
    );
}

#[test]
fn completed_records_expire_and_are_swept() {
    let (s, clock) = store();
    let k = Key::new("t", "k");
    let l = acquire(&s, k, "a");
    s.blocking_complete(&l, b"r", Some(Duration::from_secs(60)))
        .unwrap();
    clock.advance(Duration::from_secs(59));
    assert!(s.blocking_get(k).unwrap().is_some());
    assert_eq!(s.sweep_expired(), 0);
    clock.advance(Duration::from_secs(1));
    // Invisible at once, before any sweep.
    assert_eq!(s.blocking_get(Key::new("t", "k")).unwrap(), None);
    let k2 = Key::new("t", "k2");
    let l2 = acquire(&s, k2, "a");
    s.blocking_complete(&l2, b"r", Some(Duration::from_secs(1)))
        .unwrap();
    clock.advance(Duration::from_secs(1));
    assert_eq!(s.sweep_expired(), 1);
    let st = s.stats();
    assert_eq!((st.records, st.bytes, st.expirations), (0, 0, 2));
    // An expired key starts afresh.
    assert!(!acquire(&s, k, "b").is_takeover());
}

#[test]
fn abandoned_leases_are_reclaimed_after_retention() {
    let clock = ManualClock::new(T0);
    let s = Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .lease_retention(Duration::from_secs(60))
        .build()
        .unwrap();
    let _l = acquire(&s, Key::new("t", "k"), "a");
    clock.advance(LEASE + Duration::from_secs(59));
    assert_eq!(s.sweep_expired(), 0);
    clock.advance(Duration::from_secs(1));
    assert_eq!(s.sweep_expired(), 1);
    assert_eq!(s.stats().records, 0);
}

#[test]
fn background_sweeper_runs_and_stops_with_the_store() {
    let clock = ManualClock::new(T0);
    let s = Store::builder()
        .clock(clock.clone())
        .sweep_interval(Some(Duration::from_millis(5)))
        .build()
        .unwrap();
    let l = acquire(&s, Key::new("t", "k"), "a");
    s.blocking_complete(&l, b"r", Some(Duration::from_secs(1)))
        .unwrap();
    clock.advance(Duration::from_secs(2));
    let start = Instant::now();
    while s.stats().records != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sweeper never ran"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(s); // joins the sweeper thread; hangs here if it did not stop
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let (s, _) = store();
    let l = acquire(&s, Key::new("t", "keep"), "a");
    s.blocking_complete(&l, b"kept", None).unwrap();
    let before = s.stats();
    let long = vec![b'x'; 256];
    assert_eq!(
        s.blocking_begin(Key::new("t", &long[..]), fp("a"), LEASE)
            .unwrap_err(),
        Error::KeyTooLong { len: 256, max: 255 }
    );
    assert_eq!(
        s.blocking_begin(Key::new(&long[..], "k"), fp("a"), LEASE)
            .unwrap_err(),
        Error::ScopeTooLong { len: 256, max: 255 }
    );
    assert_eq!(
        s.blocking_begin(Key::new("t", ""), fp("a"), LEASE)
            .unwrap_err(),
        Error::EmptyKey
    );
    assert_eq!(
        s.blocking_begin(Key::new("t", "k"), fp("a"), Duration::ZERO)
            .unwrap_err(),
        Error::ZeroDuration {
            what: "the lease duration"
        }
    );
    let l = acquire(&s, Key::new("t", "k"), "a");
    let big = vec![0u8; (1 << 20) + 1];
    assert!(matches!(
        s.blocking_complete(&l, &big, None),
        Err(Error::ValueTooLarge { .. })
    ));
    assert!(matches!(
        s.blocking_complete(&l, b"x", Some(Duration::ZERO)),
        Err(Error::ZeroDuration { .. })
    ));
    assert!(matches!(
        s.blocking_put_pending(Key::new("t", "p"), &big, None),
        Err(Error::ValueTooLarge { .. })
    ));
    assert!(matches!(
        s.blocking_cas(&Write::put_if_absent(OwnedKey::new("t", "v"), big.clone())),
        Err(Error::ValueTooLarge { .. })
    ));
    // The lease still works after the refusals.
    s.blocking_release(l).unwrap();
    let after = s.stats();
    assert_eq!((before.records, before.bytes), (after.records, after.bytes));
    let Begin::Completed(c) = s
        .blocking_begin(Key::new("t", "keep"), fp("a"), LEASE)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(c.response, b"kept");
}

#[test]
fn record_and_byte_limits_refuse_without_evicting() {
    let clock = ManualClock::new(T0);
    let s = Store::builder()
        .clock(clock)
        .sweep_interval(None)
        .max_records(2)
        .build()
        .unwrap();
    let a = acquire(&s, Key::new("t", "a"), "x");
    let _b = acquire(&s, Key::new("t", "b"), "x");
    assert_eq!(
        s.blocking_begin(Key::new("t", "c"), fp("x"), LEASE)
            .unwrap_err(),
        Error::RecordLimit { max: 2 }
    );
    assert_eq!(s.stats().records, 2);
    s.blocking_complete(&a, b"done", None).unwrap();
    assert!(matches!(
        s.blocking_begin(Key::new("t", "a"), fp("x"), LEASE)
            .unwrap(),
        Begin::Completed(_)
    ));

    let s = Store::builder()
        .sweep_interval(None)
        .max_bytes(100)
        .build()
        .unwrap();
    let l = acquire(&s, Key::new("t", "a"), "x"); // 42 bytes
    assert!(matches!(
        s.blocking_complete(&l, &[0u8; 59], None),
        Err(Error::ByteLimit {
            needed: 59,
            max: 100
        })
    ));
    assert_eq!(s.stats().bytes, 42);
    s.blocking_complete(&l, &[0u8; 58], None).unwrap();
    assert_eq!(s.stats().bytes, 100);
    assert!(matches!(
        s.blocking_begin(Key::new("t", "b"), fp("x"), LEASE),
        Err(Error::ByteLimit { .. })
    ));
    assert_eq!(s.stats().records, 1);
}

#[test]
fn invalid_configurations_are_refused() {
    for b in [
        Store::builder().shards(3),
        Store::builder().shards(0),
        Store::builder().max_key_len(0),
        Store::builder().max_key_len(70_000),
        Store::builder().default_ttl(Duration::ZERO),
    ] {
        assert!(matches!(b.build(), Err(Error::InvalidConfig { .. })));
    }
}

#[test]
fn cas_versions_are_unique_and_never_reused() {
    let (s, clock) = store();
    let k = OwnedKey::new("offsets", "p0");
    let CasOutcome::Applied { version: Some(v1) } = s
        .blocking_cas(&Write::put_if_absent(k.clone(), "1"))
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        s.blocking_cas(&Write::put_if_absent(k.clone(), "x"))
            .unwrap(),
        CasOutcome::Conflict { current: Some(v1) }
    );
    assert_eq!(
        s.blocking_cas(&Write::set_if_version(k.clone(), v1 + 100, "x"))
            .unwrap(),
        CasOutcome::Conflict { current: Some(v1) }
    );
    let CasOutcome::Applied { version: Some(v2) } = s
        .blocking_cas(&Write::set_if_version(k.clone(), v1, "2"))
        .unwrap()
    else {
        panic!()
    };
    assert!(v2 > v1);
    assert_eq!(value_of(&s, &k).unwrap().value, b"2");
    assert_eq!(
        s.blocking_cas(&Write::delete_if_version(k.clone(), v1))
            .unwrap(),
        CasOutcome::Conflict { current: Some(v2) }
    );
    assert_eq!(
        s.blocking_cas(&Write::delete_if_version(k.clone(), v2))
            .unwrap(),
        CasOutcome::Applied { version: None }
    );
    // After a delete, a re-created value gets a new version: a stale v1 or v2 cannot match.
    let CasOutcome::Applied { version: Some(v3) } = s
        .blocking_cas(&Write::put_if_absent(k.clone(), "3"))
        .unwrap()
    else {
        panic!()
    };
    assert!(v3 > v2);
    // TTL on values.
    let t = OwnedKey::new("tokens", "x");
    let _ = s
        .blocking_cas(&Write::put_if_absent(t.clone(), "t").with_ttl(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        value_of(&s, &t).unwrap().expires_at,
        Some(Timestamp::from_millis(T0 + 5_000))
    );
    clock.advance(Duration::from_secs(5));
    assert_eq!(value_of(&s, &t), None);
    assert!(matches!(
        s.blocking_cas(&Write::put_if_absent(t.clone(), "again"))
            .unwrap(),
        CasOutcome::Applied { .. }
    ));
}

#[test]
fn kinds_do_not_mix() {
    let (s, _) = store();
    let _l = acquire(&s, Key::new("t", "idem"), "a");
    assert_eq!(
        s.blocking_cas(&Write::put_if_absent(OwnedKey::new("t", "idem"), "v"))
            .unwrap_err(),
        Error::WrongKind {
            expected: RecordKind::Value,
            found: RecordKind::Idempotency
        }
    );
    let _ = s
        .blocking_cas(&Write::put_if_absent(OwnedKey::new("t", "val"), "v"))
        .unwrap();
    assert_eq!(
        s.blocking_begin(Key::new("t", "val"), fp("a"), LEASE)
            .unwrap_err(),
        Error::WrongKind {
            expected: RecordKind::Idempotency,
            found: RecordKind::Value
        }
    );
    let _ = s
        .blocking_put_pending(Key::new("t", "req"), b"p", None)
        .unwrap();
    assert!(matches!(
        s.blocking_begin(Key::new("t", "req"), fp("a"), LEASE),
        Err(Error::WrongKind { .. })
    ));
    assert!(matches!(
        s.blocking_take_pending(Key::new("t", "val"), LEASE),
        Err(Error::WrongKind { .. })
    ));
}

#[test]
fn completion_batch_is_all_or_nothing() {
    let (s, _) = store();
    // Spread keys over shards: 40 accounts.
    let accounts: Vec<OwnedKey> = (0..40)
        .map(|i| OwnedKey::new("acct", format!("c{i}")))
        .collect();
    let mut versions = Vec::new();
    for a in &accounts {
        let CasOutcome::Applied { version: Some(v) } = s
            .blocking_cas(&Write::put_if_absent(a.clone(), "100"))
            .unwrap()
        else {
            panic!()
        };
        versions.push(v);
    }
    let k = Key::new("pay", "p1");
    let lease = acquire(&s, k, "a");
    let mut writes: Vec<Write> = accounts
        .iter()
        .zip(&versions)
        .map(|(a, &v)| Write::set_if_version(a.clone(), v, "90"))
        .collect();
    writes.push(Write::put_if_absent(
        OwnedKey::new("ledger", "p1"),
        "debit 10",
    ));
    // One stale version in the middle: nothing at all is applied.
    writes[17] = Write::set_if_version(accounts[17].clone(), versions[17] + 999, "90");
    let bytes_before = s.stats().bytes;
    assert!(matches!(
        s.blocking_complete_with(&lease, b"ok", None, &writes),
        Err(Error::BatchConflict { index: 17, current: Some(v) }) if v == versions[17]
    ));
    assert_eq!(s.stats().bytes, bytes_before);
    assert!(
        accounts
            .iter()
            .all(|a| value_of(&s, a).unwrap().value == b"100")
    );
    assert_eq!(value_of(&s, &OwnedKey::new("ledger", "p1")), None);
    assert!(matches!(
        s.blocking_get(k).unwrap(),
        Some(Snapshot::InFlight { .. })
    ));
    // Fixed: everything lands together with the completion.
    writes[17] = Write::set_if_version(accounts[17].clone(), versions[17], "90");
    s.blocking_complete_with(&lease, b"ok", None, &writes)
        .unwrap();
    assert!(
        accounts
            .iter()
            .all(|a| value_of(&s, a).unwrap().value == b"90")
    );
    assert_eq!(
        value_of(&s, &OwnedKey::new("ledger", "p1")).unwrap().value,
        b"debit 10"
    );
    assert!(matches!(
        s.blocking_get(k).unwrap(),
        Some(Snapshot::Completed(_))
    ));
    // A stale lease cannot apply a batch either.
    assert!(matches!(
        s.blocking_complete_with(&lease, b"again", None, &writes),
        Err(Error::StaleLease { .. })
    ));
    // A delete in a batch.
    let l2 = acquire(&s, Key::new("pay", "p2"), "a");
    let v = value_of(&s, &OwnedKey::new("ledger", "p1"))
        .unwrap()
        .version;
    s.blocking_complete_with(
        &l2,
        b"ok",
        None,
        &[Write::delete_if_version(OwnedKey::new("ledger", "p1"), v)],
    )
    .unwrap();
    assert_eq!(value_of(&s, &OwnedKey::new("ledger", "p1")), None);
    let st = s.stats();
    assert_eq!(st.records, 40 + 2);
}

#[test]
fn malformed_batches_are_refused() {
    let (s, _) = store();
    let lease = acquire(&s, Key::new("t", "k"), "a");
    let dup = vec![
        Write::put_if_absent(OwnedKey::new("v", "x"), "1"),
        Write::put_if_absent(OwnedKey::new("v", "x"), "2"),
    ];
    assert!(matches!(
        s.blocking_complete_with(&lease, b"", None, &dup),
        Err(Error::InvalidBatch { .. })
    ));
    let own = vec![Write::put_if_absent(OwnedKey::new("t", "k"), "1")];
    assert!(matches!(
        s.blocking_complete_with(&lease, b"", None, &own),
        Err(Error::InvalidBatch { .. })
    ));
    let many: Vec<Write> = (0..65)
        .map(|i| Write::put_if_absent(OwnedKey::new("v", format!("{i}")), "1"))
        .collect();
    assert!(matches!(
        s.blocking_complete_with(&lease, b"", None, &many),
        Err(Error::InvalidBatch { .. })
    ));
    let bad_key = vec![Write::put_if_absent(OwnedKey::new("v", ""), "1")];
    assert_eq!(
        s.blocking_complete_with(&lease, b"", None, &bad_key),
        Err(Error::EmptyKey)
    );
    s.blocking_complete(&lease, b"still mine", None).unwrap();
}

#[test]
fn batch_respects_limits() {
    let s = Store::builder()
        .sweep_interval(None)
        .max_records(3)
        .build()
        .unwrap();
    let lease = acquire(&s, Key::new("t", "k"), "a");
    let writes: Vec<Write> = (0..3)
        .map(|i| Write::put_if_absent(OwnedKey::new("v", format!("{i}")), "1"))
        .collect();
    assert_eq!(
        s.blocking_complete_with(&lease, b"", None, &writes),
        Err(Error::RecordLimit { max: 3 })
    );
    assert_eq!(s.stats().records, 1);
    s.blocking_complete_with(&lease, b"", None, &writes[..2])
        .unwrap();
    assert_eq!(s.stats().records, 3);
}

#[test]
fn pending_request_protocol() {
    let (s, _) = store();
    let k = Key::new("payments", "auth-1");
    assert!(matches!(
        s.blocking_take_pending(k, LEASE).unwrap(),
        Take::NotFound
    ));
    assert_eq!(
        s.blocking_put_pending(k, b"v1", None).unwrap(),
        PutPending::Stored
    );
    assert_eq!(
        s.blocking_put_pending(k, b"v2", None).unwrap(),
        PutPending::Stored
    );
    assert!(
        matches!(s.blocking_get(k).unwrap(), Some(Snapshot::Pending { payload, .. }) if payload == b"v2")
    );
    let Take::Acquired { lease, payload } = s.blocking_take_pending(k, LEASE).unwrap() else {
        panic!()
    };
    assert_eq!(payload, b"v2");
    assert!(matches!(
        s.blocking_take_pending(k, LEASE).unwrap(),
        Take::InProgress { .. }
    ));
    assert!(matches!(
        s.blocking_put_pending(k, b"v3", None).unwrap(),
        PutPending::InProgress { .. }
    ));
    // Released: the request waits again, payload intact.
    s.blocking_release(lease).unwrap();
    assert!(
        matches!(s.blocking_get(k).unwrap(), Some(Snapshot::Pending { payload, .. }) if payload == b"v2")
    );
    let Take::Acquired { lease, .. } = s.blocking_take_pending(k, LEASE).unwrap() else {
        panic!()
    };
    s.blocking_complete(&lease, b"authorized", None).unwrap();
    let Take::Completed(c) = s.blocking_take_pending(k, LEASE).unwrap() else {
        panic!()
    };
    assert_eq!(c.response, b"authorized");
    assert_eq!(
        s.blocking_put_pending(k, b"v4", None).unwrap(),
        PutPending::Completed
    );
    // DELETE forgets all of it; a later take runs nothing.
    assert!(s.blocking_remove(k).unwrap());
    assert!(!s.blocking_remove(k).unwrap());
    assert!(matches!(
        s.blocking_take_pending(k, LEASE).unwrap(),
        Take::NotFound
    ));
    assert_eq!(s.stats().records, 0);
    assert_eq!(s.stats().bytes, 0);
}

#[test]
fn pending_takeover_after_expiry() {
    let (s, clock) = store();
    let k = Key::new("payments", "auth-2");
    let _ = s
        .blocking_put_pending(k, b"p", Some(Duration::from_secs(3600)))
        .unwrap();
    let Take::Acquired { lease: old, .. } = s.blocking_take_pending(k, LEASE).unwrap() else {
        panic!()
    };
    clock.advance(LEASE);
    let Take::Acquired { lease, payload } = s.blocking_take_pending(k, LEASE).unwrap() else {
        panic!()
    };
    assert!(lease.is_takeover());
    assert_eq!(payload, b"p");
    assert!(matches!(
        s.blocking_complete(&old, b"x", None),
        Err(Error::StaleLease { .. })
    ));
    // A pending request not taken in time expires.
    let k2 = Key::new("payments", "auth-3");
    let _ = s
        .blocking_put_pending(k2, b"p", Some(Duration::from_secs(1)))
        .unwrap();
    clock.advance(Duration::from_secs(1));
    assert!(matches!(
        s.blocking_take_pending(k2, LEASE).unwrap(),
        Take::NotFound
    ));
}

#[test]
fn removing_an_in_flight_key_fences_its_holder() {
    let (s, _) = store();
    let k = Key::new("t", "k");
    let l = acquire(&s, k, "a");
    assert!(s.blocking_remove(k).unwrap());
    assert!(matches!(
        s.blocking_complete(&l, b"x", None),
        Err(Error::StaleLease { .. })
    ));
    assert_eq!(s.blocking_get(k).unwrap(), None);
}

#[test]
fn begin_wait_returns_the_replay_when_the_holder_completes() {
    let s = Store::builder().sweep_interval(None).build().unwrap();
    let k = OwnedKey::new("t", "k");
    let lease = acquire(&s, k.as_key(), "a");
    let s2 = s.clone();
    let k2 = k.clone();
    let waiter = std::thread::spawn(move || {
        s2.blocking_begin_wait(k2.as_key(), fp("a"), LEASE, Duration::from_secs(30))
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(20));
    s.blocking_complete(&lease, b"done", None).unwrap();
    match waiter.join().unwrap() {
        Begin::Completed(c) => assert_eq!(c.response, b"done"),
        other => panic!("{other:?}"),
    }
    assert!(
        s.inner
            .shards
            .iter()
            .all(|sh| sh.0.lock().waiters.is_empty())
    );
}

#[test]
fn begin_wait_acquires_after_a_release_and_times_out_otherwise() {
    let s = Store::builder().sweep_interval(None).build().unwrap();
    let k = OwnedKey::new("t", "k");
    let lease = acquire(&s, k.as_key(), "a");
    // Bounded: gives up with InProgress and leaves no waiter behind.
    let started = Instant::now();
    assert!(matches!(
        s.blocking_begin_wait(k.as_key(), fp("a"), LEASE, Duration::from_millis(30))
            .unwrap(),
        Begin::InProgress { .. }
    ));
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert!(
        s.inner
            .shards
            .iter()
            .all(|sh| sh.0.lock().waiters.is_empty())
    );
    let s2 = s.clone();
    let k2 = k.clone();
    let waiter = std::thread::spawn(move || {
        s2.blocking_begin_wait(k2.as_key(), fp("a"), LEASE, Duration::from_secs(30))
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(20));
    s.blocking_release(lease).unwrap();
    assert!(matches!(waiter.join().unwrap(), Begin::Acquired(l) if !l.is_takeover()));
}

#[test]
fn begin_wait_takes_over_when_the_holder_dies() {
    // Real clock: the holder never completes; its 50 ms lease runs out and the waiter takes over.
    let s = Store::builder().sweep_interval(None).build().unwrap();
    let k = Key::new("t", "k");
    let _dead = s
        .blocking_begin(k, fp("a"), Duration::from_millis(50))
        .unwrap();
    match s
        .blocking_begin_wait(k, fp("a"), LEASE, Duration::from_secs(30))
        .unwrap()
    {
        Begin::Acquired(l) => assert!(l.is_takeover()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn async_face_waits_without_blocking_the_executor() {
    use crate::IdempotencyStore;
    let s = Store::builder().sweep_interval(None).build().unwrap();
    let k = OwnedKey::new("t", "k");
    let Begin::Acquired(lease) = IdempotencyStore::begin(&s, k.as_key(), fp("a"), LEASE)
        .await
        .unwrap()
    else {
        panic!()
    };
    let s2 = s.clone();
    let k2 = k.clone();
    let waiter = tokio::spawn(async move {
        IdempotencyStore::begin_wait(&s2, k2.as_key(), fp("a"), LEASE, Duration::from_secs(30))
            .await
    });
    // On a current-thread runtime, the waiter must yield for this to run at all.
    tokio::time::sleep(Duration::from_millis(10)).await;
    IdempotencyStore::complete(&s, &lease, b"r", None, &[])
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(out, Begin::Completed(c) if c.response == b"r"));
}

#[test]
fn async_wait_outside_a_runtime_is_an_error() {
    use crate::IdempotencyStore;
    let s = Store::in_memory();
    let fut = IdempotencyStore::begin_wait(
        &s,
        Key::new("t", "k"),
        fp("a"),
        LEASE,
        Duration::from_secs(1),
    );
    let out = futures_lite_block_on(fut);
    assert_eq!(out.unwrap_err(), Error::NoRuntime);
}

/// Polls a future that never waits, without a runtime.
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("future waited"),
    }
}

#[test]
fn limits_hold_across_reopen_removal_and_sweeping() {
    // Replay re-accounts what it loads (one mutation path, limits off), so a reopened store
    // is as full as the one that was closed; removals and sweeps give room back.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let open = || {
        Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .max_records(3)
            .open(dir.path())
            .unwrap()
    };
    {
        let s = open();
        for id in ["a", "b"] {
            let l = acquire(&s, Key::new("t", id), "x");
            s.blocking_complete(&l, b"done", Some(Duration::from_secs(10)))
                .unwrap();
        }
        let _held = acquire(&s, Key::new("t", "c"), "x");
    }
    let s = open();
    assert_eq!(s.stats().records, 3);
    assert_eq!(
        s.blocking_begin(Key::new("t", "d"), fp("x"), LEASE)
            .unwrap_err(),
        Error::RecordLimit { max: 3 }
    );
    assert!(s.blocking_remove(Key::new("t", "a")).unwrap());
    let _d = acquire(&s, Key::new("t", "d"), "x");
    // "b" expires; the sweeper's removal (logged, through the same path) frees its place.
    clock.advance(Duration::from_secs(11));
    assert_eq!(s.sweep_expired(), 1);
    let _e = acquire(&s, Key::new("t", "e"), "x");
    assert_eq!(s.stats().records, 3);
    drop(s);
    let s = open();
    assert_eq!(s.stats().records, 3);
    assert_eq!(
        s.blocking_begin(Key::new("t", "f"), fp("x"), LEASE)
            .unwrap_err(),
        Error::RecordLimit { max: 3 }
    );
}

#[test]
fn stats_count_completions_releases_and_stale_leases() {
    let s = Store::in_memory();
    let Ok(Begin::Acquired(a)) = s.blocking_begin(Key::new("t", "a"), fp("x"), LEASE) else {
        panic!("acquire a")
    };
    let Ok(Begin::Acquired(b)) = s.blocking_begin(Key::new("t", "b"), fp("x"), LEASE) else {
        panic!("acquire b")
    };
    s.blocking_complete(&a, b"done", None).unwrap();
    s.blocking_release(b).unwrap();
    // Completing again: the lease is no longer held.
    assert!(matches!(
        s.blocking_complete(&a, b"again", None),
        Err(Error::StaleLease { .. })
    ));
    let st = s.stats();
    assert_eq!((st.completions, st.releases, st.stale_leases), (1, 1, 1));
    assert_eq!(st.in_flight, 0);
    let Ok(Begin::Acquired(c)) = s.blocking_begin(Key::new("t", "c"), fp("x"), LEASE) else {
        panic!("acquire c")
    };
    assert_eq!(s.stats().in_flight, 1);
    s.blocking_release(c).unwrap();
    assert_eq!(s.stats().in_flight, 0);
    assert_eq!((st.log_bytes, st.poisoned), (0, false));
}

#[cfg(all(feature = "serde", not(loom)))]
#[test]
fn public_data_types_round_trip_through_serde() {
    let s = Store::in_memory();
    let Ok(Begin::Acquired(l)) = s.blocking_begin(Key::new("t", "a"), fp("x"), LEASE) else {
        panic!("acquire")
    };
    s.blocking_complete(&l, b"done", None).unwrap();
    let stats = s.stats();
    let json = serde_json::to_string(&stats).unwrap();
    assert!(json.contains("\"completions\":1"), "{json}");
    assert_eq!(serde_json::from_str::<Stats>(&json).unwrap(), stats);
    let snap = s.blocking_get(Key::new("t", "a")).unwrap().unwrap();
    let back: Snapshot = serde_json::from_str(&serde_json::to_string(&snap).unwrap()).unwrap();
    assert_eq!(back, snap);
    let d = Durability::Batched {
        max_delay: std::time::Duration::from_millis(10),
    };
    let back: Durability = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
    assert_eq!(back, d);
    let r = RecoveryReport::default();
    let back: RecoveryReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
}

#[test]
fn the_in_flight_count_follows_takeovers_completions_and_sweeps() {
    let (s, clock) = store();
    let key = Key::new("t", "k");
    let Ok(Begin::Acquired(_dead)) = s.blocking_begin(key, fp("x"), LEASE) else {
        panic!("acquire")
    };
    assert_eq!(s.stats().in_flight, 1);
    clock.advance(LEASE * 2);
    // Taken over: still one record held by a lease.
    let Ok(Begin::Acquired(l)) = s.blocking_begin(key, fp("x"), LEASE) else {
        panic!("take over")
    };
    assert_eq!(s.stats().in_flight, 1);
    s.blocking_complete(&l, b"r", None).unwrap();
    assert_eq!(s.stats().in_flight, 0);
    // An abandoned lease, reclaimed by the sweeper after its retention.
    let Ok(Begin::Acquired(_gone)) = s.blocking_begin(Key::new("t", "j"), fp("x"), LEASE) else {
        panic!("acquire j")
    };
    assert_eq!(s.stats().in_flight, 1);
    clock.advance(Duration::from_secs(3 * 24 * 3600));
    assert!(s.sweep_expired() >= 1);
    assert_eq!(s.stats().in_flight, 0);
}

/// The log's last sequence number: how many records were appended.
fn appended(s: &Store) -> u64 {
    s.inner().wal.as_ref().map_or(0, |w| w.appended())
}

/// A durable store in `dir` on `clock`, without the sweeper.
fn durable(dir: &tempfile::TempDir, clock: &ManualClock) -> Store {
    Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .open(dir.path())
        .unwrap()
}

#[tokio::test]
async fn begin_many_answers_each_key_as_begin_would_in_one_log_record() {
    use crate::IdempotencyStore;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let open = || durable(&dir, &clock);
    let s = open();
    let done = acquire(&s, Key::new("t", "done"), "a");
    s.blocking_complete(&done, b"old", None).unwrap();
    let _busy = acquire(&s, Key::new("t", "busy"), "a");
    let stale = acquire(&s, Key::new("t", "stale"), "a");
    clock.advance(LEASE + Duration::from_millis(1));
    let before = appended(&s);
    let keys = [
        (Key::new("t", "n1"), fp("a")),
        (Key::new("t", "done"), fp("a")),
        (Key::new("t", "done"), fp("other")),
        (Key::new("t", "n1"), fp("a")),
        (Key::new("t", ""), fp("a")),
        (Key::new("t", "stale"), fp("a")),
        (Key::new("t", "n2"), fp("a")),
    ];
    let answers = s
        .begin_many(&keys, LEASE, LeaseSync::Deferred)
        .await
        .unwrap();
    assert_eq!(appended(&s), before + 1, "one record for every lease");
    let lease = |i: usize| match &answers[i] {
        Ok(Begin::Acquired(l)) => l,
        other => panic!("{i}: {other:?}"),
    };
    assert!(!lease(0).is_takeover() && !lease(6).is_takeover());
    assert!(matches!(&answers[1], Ok(Begin::Completed(c)) if c.response == b"old"));
    assert!(matches!(answers[2], Ok(Begin::Mismatch)));
    // The repeat is held by its first occurrence.
    assert!(matches!(answers[3], Ok(Begin::InProgress { .. })));
    assert_eq!(answers[4].as_ref().unwrap_err(), &Error::EmptyKey);
    // "stale" was never completed and its lease ran out: a takeover.
    assert!(lease(5).is_takeover() && lease(5).token > stale.token);
    assert!(lease(6).token != lease(0).token);
    let st = s.stats();
    assert_eq!(
        (st.acquired, st.takeovers, st.replayed, st.mismatches),
        (6, 1, 1, 1)
    );
    assert!(matches!(
        s.blocking_begin(Key::new("t", "n2"), fp("a"), LEASE)
            .unwrap(),
        Begin::InProgress { .. }
    ));
    // Every lease is in the log: after a reopen, they are still held.
    let tokens: Vec<u64> = [0, 5, 6].iter().map(|&i| lease(i).token).collect();
    drop(answers);
    drop(s);
    let s = open();
    for (id, token) in ["n1", "stale", "n2"].iter().zip(tokens) {
        match s.blocking_get(Key::new("t", id)).unwrap() {
            Some(Snapshot::InFlight { token: t, .. }) => assert_eq!(t, token, "{id}"),
            other => panic!("{id}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn complete_many_records_each_result_on_its_own_in_one_log_record() {
    use crate::IdempotencyStore;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let open = || durable(&dir, &clock);
    let s = open();
    let leases: Vec<Lease> = (0..4)
        .map(|i| acquire(&s, Key::new("t", &format!("k{i}")), "a"))
        .collect();
    // k3's lease is lost: it expired and was taken over.
    clock.advance(LEASE + Duration::from_millis(1));
    let _taker = match s
        .blocking_begin(Key::new("t", "k3"), fp("a"), LEASE)
        .unwrap()
    {
        Begin::Acquired(l) => l,
        other => panic!("{other:?}"),
    };
    let side = OwnedKey::new("t", "side");
    let writes = [Write::put_if_absent(side.clone(), b"v".to_vec())];
    let conflict = [Write::set_if_version(side.clone(), 999, b"x".to_vec())];
    let huge = vec![0u8; 64 << 20];
    let items = [
        Completion::new(&leases[0], b"r0"),
        Completion {
            writes: &writes,
            ..Completion::new(&leases[1], b"r1")
        },
        Completion::new(&leases[2], &huge),
        Completion::new(&leases[3], b"r3"),
        // The same lease twice: the second finds it already completed.
        Completion {
            ttl: Some(Duration::from_secs(5)),
            ..Completion::new(&leases[0], b"again")
        },
        Completion {
            writes: &conflict,
            ..Completion::new(&leases[2], b"r2")
        },
    ];
    let before = appended(&s);
    let results = s.complete_many(&items).await.unwrap();
    // One record for the plain completions, one for the batch with a write.
    assert_eq!(appended(&s), before + 2);
    assert!(results[0].is_ok() && results[1].is_ok());
    assert!(matches!(results[2], Err(Error::ValueTooLarge { .. })));
    assert!(matches!(results[3], Err(Error::StaleLease { .. })));
    assert!(matches!(results[4], Err(Error::StaleLease { .. })));
    assert!(matches!(
        results[5],
        Err(Error::BatchConflict { index: 0, .. })
    ));
    drop(s);
    let s = open();
    let replay = |id: &str| match s.blocking_begin(Key::new("t", id), fp("a"), LEASE).unwrap() {
        Begin::Completed(c) => c.response,
        other => panic!("{id}: {other:?}"),
    };
    assert_eq!(replay("k0"), b"r0");
    assert_eq!(replay("k1"), b"r1");
    assert_eq!(value_of(&s, &side).unwrap().value, b"v");
    // k2 still holds its lease (nothing was recorded for it).
    assert!(matches!(
        s.blocking_get(Key::new("t", "k2")).unwrap(),
        Some(Snapshot::InFlight { .. })
    ));
}
