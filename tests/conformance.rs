//! One behavioural suite for every backend of [`IdempotencyStore`]: the embedded store in
//! memory, the embedded store on disk, and (feature `redis`) Redis. A backend that drifts from
//! the others fails here.
//!
//! Redis: `IDEMKV_REDIS_URL` if set, else a `redis-server` of the test run's own from `PATH`
//! (`tests/support/redis.rs`). Under `CI=true` with the `redis` feature one of them is
//! required, so the suite cannot silently skip it.
#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

#[cfg(feature = "redis")]
#[path = "support/child.rs"]
mod child;
#[cfg(feature = "redis")]
#[path = "support/redis.rs"]
mod redis_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idemkv::{
    Begin, CasOutcome, Error, Fingerprint, IdempotencyStore, Key, OwnedKey, PutPending, RecordKind,
    Snapshot, Store, Take, Write,
};

/// A scope no other test (or earlier run against the same Redis) uses.
fn scope(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{test}/{}/{nanos}/{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

const FP: Fingerprint = Fingerprint::from_bytes([7; 16]);
const OTHER: Fingerprint = Fingerprint::from_bytes([8; 16]);
const LONG: Duration = Duration::from_secs(30);

async fn acquire<S: IdempotencyStore>(s: &S, key: Key<'_>, lease: Duration) -> idemkv::Lease {
    match s.begin(key, FP, lease).await.unwrap() {
        Begin::Acquired(l) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

async fn begin_complete_replay_mismatch<S: IdempotencyStore>(s: S) {
    let sc = scope("basic");
    let key = Key::new(&sc, "k1");
    let lease = acquire(&s, key, LONG).await;
    assert!(!lease.is_takeover());
    assert!(matches!(
        s.begin(key, FP, LONG).await.unwrap(),
        Begin::InProgress { .. }
    ));
    assert!(matches!(
        s.begin(key, OTHER, LONG).await.unwrap(),
        Begin::Mismatch
    ));
    match s.get(key).await.unwrap() {
        Some(Snapshot::InFlight {
            token,
            fingerprint,
            pending,
            ..
        }) => {
            assert_eq!((token, fingerprint, pending), (lease.token(), FP, false));
        }
        other => panic!("{other:?}"),
    }
    let expires = s.complete(&lease, b"201 created", None, &[]).await.unwrap();
    match s.begin(key, FP, LONG).await.unwrap() {
        Begin::Completed(done) => {
            assert_eq!(done.response, b"201 created");
            assert_eq!(done.fingerprint, FP);
            assert_eq!(done.expires_at, expires);
            assert!(done.completed_at < done.expires_at);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.begin(key, OTHER, LONG).await.unwrap(),
        Begin::Mismatch
    ));
    assert!(matches!(
        s.get(key).await.unwrap(),
        Some(Snapshot::Completed(_))
    ));
    // Completing twice is a stale lease: the first completion stands.
    let again = s.complete(&lease, b"other", None, &[]).await.unwrap_err();
    assert_eq!(
        again,
        Error::StaleLease {
            token: lease.token()
        }
    );
}

async fn expired_leases_are_taken_over_and_fenced<S: IdempotencyStore>(s: S) {
    let sc = scope("fence");
    let key = Key::new(&sc, "k");
    let mut old = acquire(&s, key, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let new = match s.begin(key, FP, LONG).await.unwrap() {
        Begin::Acquired(l) => l,
        other => panic!("{other:?}"),
    };
    assert!(new.is_takeover());
    assert!(new.token() > old.token());
    let stale = Error::StaleLease { token: old.token() };
    assert_eq!(
        s.complete(&old, b"late", None, &[]).await.unwrap_err(),
        stale
    );
    assert_eq!(s.renew(&mut old, LONG).await.unwrap_err(), stale);
    let token = old.token();
    assert_eq!(
        s.release(old).await.unwrap_err(),
        Error::StaleLease { token }
    );
    s.complete(&new, b"fresh", None, &[]).await.unwrap();
    match s.begin(key, FP, LONG).await.unwrap() {
        Begin::Completed(d) => assert_eq!(d.response, b"fresh"),
        other => panic!("{other:?}"),
    }
}

async fn release_and_renew<S: IdempotencyStore>(s: S) {
    let sc = scope("release");
    let key = Key::new(&sc, "k");
    let lease = acquire(&s, key, LONG).await;
    s.release(lease).await.unwrap();
    assert_eq!(s.get(key).await.unwrap(), None);
    let mut lease = acquire(&s, key, Duration::from_millis(100)).await;
    assert!(!lease.is_takeover(), "a released key is acquired afresh");
    let before = lease.deadline();
    let deadline = s.renew(&mut lease, LONG).await.unwrap();
    assert!(deadline > before);
    assert_eq!(lease.deadline(), deadline);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        matches!(
            s.begin(key, FP, LONG).await.unwrap(),
            Begin::InProgress { .. }
        ),
        "renewed"
    );
}

async fn completion_batches_are_all_or_nothing<S: IdempotencyStore>(s: S) {
    let sc = scope("batch");
    let (a, b) = (OwnedKey::new(&sc, "{o}a"), OwnedKey::new(&sc, "{o}b"));
    let v1 = match s.cas(&Write::put_if_absent(a.clone(), "1")).await.unwrap() {
        CasOutcome::Applied { version: Some(v) } => v,
        other => panic!("{other:?}"),
    };
    let lease = acquire(&s, Key::new(&sc, "{o}req"), LONG).await;
    // A stale version: nothing applied, the lease still held.
    let err = s
        .complete(
            &lease,
            b"r",
            None,
            &[
                Write::put_if_absent(b.clone(), "x"),
                Write::set_if_version(a.clone(), v1 + 1, "2"),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::BatchConflict {
            index: 1,
            current: Some(v1)
        }
    );
    assert_eq!(s.get(b.as_key()).await.unwrap(), None);
    assert!(matches!(
        s.get(Key::new(&sc, "{o}req")).await.unwrap(),
        Some(Snapshot::InFlight { .. })
    ));
    // Malformed batches.
    let own = s
        .complete(
            &lease,
            b"r",
            None,
            &[Write::put_if_absent(OwnedKey::new(&sc, "{o}req"), "x")],
        )
        .await;
    assert!(matches!(own, Err(Error::InvalidBatch { .. })), "{own:?}");
    let twice = [
        Write::put_if_absent(b.clone(), "x"),
        Write::put_if_absent(b.clone(), "y"),
    ];
    assert!(matches!(
        s.complete(&lease, b"r", None, &twice).await,
        Err(Error::InvalidBatch { .. })
    ));
    // The right versions: everything at once.
    s.complete(
        &lease,
        b"r",
        None,
        &[
            Write::put_if_absent(b.clone(), "x").with_ttl(LONG),
            Write::set_if_version(a.clone(), v1, "2"),
        ],
    )
    .await
    .unwrap();
    match s.get(a.as_key()).await.unwrap() {
        Some(Snapshot::Value(v)) => {
            assert!(v.version > v1);
            assert_eq!((v.value.as_slice(), v.expires_at), (b"2".as_slice(), None));
        }
        other => panic!("{other:?}"),
    }
    match s.get(b.as_key()).await.unwrap() {
        Some(Snapshot::Value(v)) => assert!(v.expires_at.is_some()),
        other => panic!("{other:?}"),
    }
    // A write onto a key of another kind.
    let lease = acquire(&s, Key::new(&sc, "{o}req2"), LONG).await;
    let wrong = s
        .complete(
            &lease,
            b"r",
            None,
            &[Write::delete_if_version(OwnedKey::new(&sc, "{o}req"), 1)],
        )
        .await;
    assert_eq!(
        wrong.unwrap_err(),
        Error::WrongKind {
            expected: RecordKind::Value,
            found: RecordKind::Idempotency
        }
    );
}

async fn compare_and_set<S: IdempotencyStore>(s: S) {
    let sc = scope("cas");
    let k = OwnedKey::new(&sc, "v");
    let v1 = match s.cas(&Write::put_if_absent(k.clone(), "a")).await.unwrap() {
        CasOutcome::Applied { version: Some(v) } => v,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        s.cas(&Write::put_if_absent(k.clone(), "b")).await.unwrap(),
        CasOutcome::Conflict { current: Some(v1) }
    );
    assert_eq!(
        s.cas(&Write::set_if_version(k.clone(), v1 + 7, "b"))
            .await
            .unwrap(),
        CasOutcome::Conflict { current: Some(v1) }
    );
    let v2 = match s
        .cas(&Write::set_if_version(k.clone(), v1, "b"))
        .await
        .unwrap()
    {
        CasOutcome::Applied { version: Some(v) } => v,
        other => panic!("{other:?}"),
    };
    assert!(v2 > v1);
    assert_eq!(
        s.cas(&Write::delete_if_version(k.clone(), v2))
            .await
            .unwrap(),
        CasOutcome::Applied { version: None }
    );
    assert_eq!(s.get(k.as_key()).await.unwrap(), None);
    assert_eq!(
        s.cas(&Write::delete_if_version(k.clone(), v2))
            .await
            .unwrap(),
        CasOutcome::Conflict { current: None }
    );
    // TTLs are enforced.
    let t = OwnedKey::new(&sc, "ttl");
    let _ = s
        .cas(&Write::put_if_absent(t.clone(), "x").with_ttl(Duration::from_millis(100)))
        .await
        .unwrap();
    assert!(s.get(t.as_key()).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(s.get(t.as_key()).await.unwrap(), None);
    // Kinds do not mix.
    let _ = s.cas(&Write::put_if_absent(t.clone(), "x")).await.unwrap();
    let err = s.begin(t.as_key(), FP, LONG).await.unwrap_err();
    assert_eq!(
        err,
        Error::WrongKind {
            expected: RecordKind::Idempotency,
            found: RecordKind::Value
        }
    );
    let lease = acquire(&s, Key::new(&sc, "idem"), LONG).await;
    let err = s
        .cas(&Write::put_if_absent(OwnedKey::new(&sc, "idem"), "x"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::WrongKind {
            expected: RecordKind::Value,
            found: RecordKind::Idempotency
        }
    );
    s.release(lease).await.unwrap();
}

async fn pending_requests<S: IdempotencyStore>(s: S) {
    let sc = scope("pending");
    let key = Key::new(&sc, "pay-1");
    assert!(matches!(
        s.take_pending(key, LONG).await.unwrap(),
        Take::NotFound
    ));
    assert_eq!(
        s.put_pending(key, b"v1", None).await.unwrap(),
        PutPending::Stored
    );
    assert_eq!(
        s.put_pending(key, b"v2", None).await.unwrap(),
        PutPending::Stored,
        "replaced"
    );
    assert!(
        matches!(s.get(key).await.unwrap(), Some(Snapshot::Pending { payload, .. }) if payload == b"v2")
    );
    let lease = match s.take_pending(key, LONG).await.unwrap() {
        Take::Acquired { lease, payload } => {
            assert_eq!(payload, b"v2");
            lease
        }
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        s.take_pending(key, LONG).await.unwrap(),
        Take::InProgress { .. }
    ));
    assert!(matches!(
        s.put_pending(key, b"v3", None).await.unwrap(),
        PutPending::InProgress { .. }
    ));
    assert!(matches!(
        s.get(key).await.unwrap(),
        Some(Snapshot::InFlight { pending: true, .. })
    ));
    // Released: back to pending, payload kept.
    s.release(lease).await.unwrap();
    assert!(
        matches!(s.get(key).await.unwrap(), Some(Snapshot::Pending { payload, .. }) if payload == b"v2")
    );
    let lease = match s.take_pending(key, LONG).await.unwrap() {
        Take::Acquired { lease, .. } => lease,
        other => panic!("{other:?}"),
    };
    s.complete(&lease, b"paid", None, &[]).await.unwrap();
    match s.take_pending(key, LONG).await.unwrap() {
        Take::Completed(done) => assert_eq!(done.response, b"paid"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.put_pending(key, b"v4", None).await.unwrap(),
        PutPending::Completed
    );
    assert!(s.remove(key).await.unwrap());
    assert!(!s.remove(key).await.unwrap());
    assert!(matches!(
        s.take_pending(key, LONG).await.unwrap(),
        Take::NotFound
    ));
    // A begin on a pending key is the wrong kind.
    assert_eq!(
        s.put_pending(key, b"v5", None).await.unwrap(),
        PutPending::Stored
    );
    let err = s.begin(key, FP, LONG).await.unwrap_err();
    assert_eq!(
        err,
        Error::WrongKind {
            expected: RecordKind::Idempotency,
            found: RecordKind::Pending
        }
    );
}

async fn waiting_for_a_holder<S: IdempotencyStore + Clone>(s: S) {
    let sc = scope("wait");
    // The holder completes: the waiter gets the result without polling for it.
    let key = Key::new(&sc, "done");
    let lease = acquire(&s, key, LONG).await;
    let holder = s.clone();
    let finish = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        holder.complete(&lease, b"result", None, &[]).await.unwrap();
    });
    match s
        .begin_wait(key, FP, LONG, Duration::from_secs(10))
        .await
        .unwrap()
    {
        Begin::Completed(d) => assert_eq!(d.response, b"result"),
        other => panic!("{other:?}"),
    }
    finish.await.unwrap();
    // A short budget runs out: still in progress.
    let key = Key::new(&sc, "held");
    let _held = acquire(&s, key, LONG).await;
    assert!(matches!(
        s.begin_wait(key, FP, LONG, Duration::from_millis(100))
            .await
            .unwrap(),
        Begin::InProgress { .. }
    ));
    // The holder dies: the waiter takes over at the lease deadline.
    let key = Key::new(&sc, "dead");
    let _dead = acquire(&s, key, Duration::from_millis(200)).await;
    match s
        .begin_wait(key, FP, LONG, Duration::from_secs(10))
        .await
        .unwrap()
    {
        Begin::Acquired(l) => assert!(l.is_takeover()),
        other => panic!("{other:?}"),
    }
}

async fn bad_input_is_a_typed_error<S: IdempotencyStore>(s: S) {
    let sc = scope("input");
    assert_eq!(
        s.begin(Key::new(&sc, ""), FP, LONG).await.unwrap_err(),
        Error::EmptyKey
    );
    assert!(matches!(
        s.begin(Key::new(&sc, "k"), FP, Duration::ZERO).await,
        Err(Error::ZeroDuration { .. })
    ));
    let long = "x".repeat(256);
    assert!(matches!(
        s.begin(Key::new(&sc, &long), FP, LONG).await,
        Err(Error::KeyTooLong { .. })
    ));
    let scope_long = "s".repeat(256);
    assert!(matches!(
        s.get(Key::new(&scope_long, "k")).await,
        Err(Error::ScopeTooLong { .. })
    ));
    let big = vec![0u8; (1 << 20) + 1];
    assert!(matches!(
        s.put_pending(Key::new(&sc, "k"), &big, None).await,
        Err(Error::ValueTooLarge { .. })
    ));
}

async fn many_keys_at_once<S: IdempotencyStore>(s: S) {
    let sc = scope("many");
    let k = |id: &'static str| Key::new(&sc, id);
    let done = acquire(&s, k("{m}done"), LONG).await;
    s.complete(&done, b"old", None, &[]).await.unwrap();
    let _held = acquire(&s, k("{m}held"), LONG).await;
    let old = acquire(&s, k("{m}stale"), Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let keys = [
        (k("{m}a"), FP),
        (k("{m}b"), FP),
        (k("{m}a"), FP),
        (k("{m}done"), FP),
        (k("{m}done"), OTHER),
        (k("{m}held"), FP),
        (k(""), FP),
        (k("{m}stale"), FP),
    ];
    let answers = s
        .begin_many(&keys, LONG, idemkv::LeaseSync::Deferred)
        .await
        .unwrap();
    assert_eq!(answers.len(), keys.len());
    let mut leases = Vec::new();
    for (i, answer) in answers.into_iter().enumerate() {
        match (i, answer) {
            (0 | 1, Ok(Begin::Acquired(l))) => {
                assert!(!l.is_takeover());
                leases.push(l);
            }
            // The repeat is held by its first occurrence.
            (2 | 5, Ok(Begin::InProgress { .. })) => {}
            (3, Ok(Begin::Completed(c))) => assert_eq!(c.response, b"old"),
            (4, Ok(Begin::Mismatch)) => {}
            (6, Err(Error::EmptyKey)) => {}
            (7, Ok(Begin::Acquired(l))) => {
                assert!(l.is_takeover() && l.token() > old.token());
                leases.push(l);
            }
            (i, other) => panic!("{i}: {other:?}"),
        }
    }
    let side = OwnedKey::new(&sc, "{m}side");
    let writes = [Write::put_if_absent(side.clone(), "v")];
    let items = [
        idemkv::Completion::new(&leases[0], b"ra"),
        idemkv::Completion {
            writes: &writes,
            ..idemkv::Completion::new(&leases[1], b"rb")
        },
        // Taken over: refused, and it changes nothing.
        idemkv::Completion::new(&old, b"late"),
        idemkv::Completion::new(&leases[2], b"rs"),
    ];
    let results = s.complete_many(&items).await.unwrap();
    assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok());
    assert_eq!(
        results[2].as_ref().unwrap_err(),
        &Error::StaleLease { token: old.token() }
    );
    for (id, want) in [("{m}a", "ra"), ("{m}b", "rb"), ("{m}stale", "rs")] {
        match s.begin(k(id), FP, LONG).await.unwrap() {
            Begin::Completed(c) => assert_eq!(c.response, want.as_bytes(), "{id}"),
            other => panic!("{id}: {other:?}"),
        }
    }
    assert!(matches!(
        s.get(side.as_key()).await.unwrap(),
        Some(Snapshot::Value(_))
    ));
}

macro_rules! suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn begin_complete_replay_mismatch() {
                let Some(s) = $make else { return };
                super::begin_complete_replay_mismatch(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expired_leases_are_taken_over_and_fenced() {
                let Some(s) = $make else { return };
                super::expired_leases_are_taken_over_and_fenced(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn release_and_renew() {
                let Some(s) = $make else { return };
                super::release_and_renew(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn completion_batches_are_all_or_nothing() {
                let Some(s) = $make else { return };
                super::completion_batches_are_all_or_nothing(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn compare_and_set() {
                let Some(s) = $make else { return };
                super::compare_and_set(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pending_requests() {
                let Some(s) = $make else { return };
                super::pending_requests(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn waiting_for_a_holder() {
                let Some(s) = $make else { return };
                super::waiting_for_a_holder(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn many_keys_at_once() {
                let Some(s) = $make else { return };
                super::many_keys_at_once(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bad_input_is_a_typed_error() {
                let Some(s) = $make else { return };
                super::bad_input_is_a_typed_error(s).await
            }
        }
    };
}

suite!(memory, Some(Store::in_memory()));

fn durable() -> Store {
    // The directory is removed when the process exits; each test has its own.
    let dir = tempfile::tempdir().unwrap().keep();
    Store::builder().open(dir).unwrap()
}
suite!(durable, Some(durable()));

#[cfg(feature = "redis")]
async fn redis() -> Option<idemkv::redis::RedisStore> {
    let url = redis_support::url()?;
    Some(
        idemkv::redis::RedisStore::builder(url)
            .connect()
            .await
            .unwrap(),
    )
}
#[cfg(feature = "redis")]
suite!(redis_backend, redis().await);

/// The same suite with the client's clock instead of the server's `TIME` (a 20 ms skew
/// bound: takeovers come that much later).
#[cfg(feature = "redis")]
async fn redis_client_clock() -> Option<idemkv::redis::RedisStore> {
    let url = redis_support::url()?;
    Some(
        idemkv::redis::RedisStore::builder(url)
            .client_clock(Duration::from_millis(20))
            .connect()
            .await
            .unwrap(),
    )
}
#[cfg(feature = "redis")]
suite!(redis_client_clock_backend, redis_client_clock().await);

/// The same suite on a real Redis Cluster (three masters, a replica each) of this test run's
/// own: scripts routed by slot, sharded pub/sub for waiters.
#[cfg(feature = "redis")]
async fn redis_cluster() -> Option<idemkv::redis::RedisStore> {
    let urls = redis_support::shared_cluster()?;
    Some(
        idemkv::redis::RedisStore::cluster(urls)
            .connect()
            .await
            .unwrap(),
    )
}
#[cfg(feature = "redis")]
suite!(redis_cluster_backend, redis_cluster().await);

/// The local cache of completed records: replays without a round trip, and exactly the
/// staleness its documentation allows.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_of_completed_records() {
    let Some(url) = redis_support::url() else {
        return;
    };
    let cached = idemkv::redis::RedisStore::builder(&url)
        .cache(100, Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let plain = idemkv::redis::RedisStore::builder(&url)
        .connect()
        .await
        .unwrap();
    let sc = scope("cache");
    let key = Key::new(&sc, "k");
    let lease = acquire(&cached, key, LONG).await;
    cached.complete(&lease, b"r1", None, &[]).await.unwrap();
    assert!(matches!(
        cached.begin(key, FP, LONG).await.unwrap(),
        Begin::Completed(_)
    ));
    // Removed elsewhere: this process may replay it until the entry's max age...
    assert!(plain.remove(key).await.unwrap());
    assert!(matches!(
        cached.begin(key, FP, LONG).await.unwrap(),
        Begin::Completed(_)
    ));
    assert!(matches!(
        cached.begin(key, OTHER, LONG).await.unwrap(),
        Begin::Mismatch
    ));
    // ...and no longer.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let lease = acquire(&cached, key, LONG).await;
    cached.complete(&lease, b"r2", None, &[]).await.unwrap();
    match cached.begin(key, FP, LONG).await.unwrap() {
        Begin::Completed(d) => assert_eq!(d.response, b"r2"),
        other => panic!("{other:?}"),
    }
    // Removed through the caching store: gone at once.
    assert!(cached.remove(key).await.unwrap());
    let _ = acquire(&cached, key, LONG).await;
}

/// `RedisStore::stats`: this process's operations, counted like the embedded store's.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counts_its_operations() {
    let Some(url) = redis_support::url() else {
        return;
    };
    let store = idemkv::redis::RedisStore::builder(&url)
        .connect()
        .await
        .unwrap();
    let sc = scope("counts");
    let (a, b) = (Key::new(&sc, "a"), Key::new(&sc, "b"));
    let fp = FP;
    let la = acquire(&store, a, LONG).await;
    let lb = acquire(&store, b, LONG).await;
    assert!(matches!(
        store.begin(b, fp, LONG).await.unwrap(),
        Begin::InProgress { .. }
    ));
    store.complete(&la, b"r", None, &[]).await.unwrap();
    assert!(matches!(
        store.begin(a, fp, LONG).await.unwrap(),
        Begin::Completed(_)
    ));
    assert!(matches!(
        store.begin(a, Fingerprint::of(b"y"), LONG).await.unwrap(),
        Begin::Mismatch
    ));
    let token = lb.token();
    store.release(lb).await.unwrap();
    assert!(matches!(
        store.complete(&la, b"again", None, &[]).await,
        Err(idemkv::Error::StaleLease { .. })
    ));
    let s = store.stats();
    assert_eq!(
        (s.acquired, s.in_progress, s.replayed, s.mismatches),
        (2, 1, 1, 1),
        "{s:?}"
    );
    assert_eq!(
        (s.completions, s.releases, s.stale_leases),
        (1, 1, 1),
        "{s:?} (released {token})"
    );
}

/// With the client's clock, a lease is taken over only once it is past its deadline by more
/// than the skew bound: a caller whose clock runs ahead by up to the bound never takes over a
/// live holder.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_client_clock_delays_takeovers_by_the_skew_bound() {
    let Some(url) = redis_support::url() else {
        return;
    };
    let store = idemkv::redis::RedisStore::builder(&url)
        .client_clock(Duration::from_millis(600))
        .connect()
        .await
        .unwrap();
    let sc = scope("skew");
    let key = Key::new(&sc, "k");
    let first = acquire(&store, key, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Past the deadline, within the bound: still held.
    assert!(matches!(
        store.begin(key, FP, LONG).await.unwrap(),
        Begin::InProgress { .. }
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    match store.begin(key, FP, LONG).await.unwrap() {
        Begin::Acquired(l) => {
            assert!(l.is_takeover());
            assert!(l.token() > first.token());
        }
        other => panic!("{other:?}"),
    }
}
