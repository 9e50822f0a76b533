//! loom models of the lease protocol: every interleaving of the real store code (its locks,
//! atomics and wake-ups come from loom under `cfg(loom)`, see `src/sync.rs`).
//!
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --test loom_lease`
#![cfg(loom)]

use std::time::Duration;

use idemkv::{Begin, Error, Fingerprint, Key, ManualClock, Snapshot, Store};
use loom::thread;

const LEASE: Duration = Duration::from_secs(10);

fn store(clock: &ManualClock) -> Store {
    Store::builder()
        .shards(1)
        .sweep_interval(None)
        .clock(clock.clone())
        .build()
        .expect("store")
}

fn fp() -> Fingerprint {
    Fingerprint::from_bytes([7; 16])
}

fn key() -> Key<'static> {
    Key::new("s", "k")
}

#[test]
fn two_callers_never_both_hold_a_key() {
    loom::model(|| {
        let clock = ManualClock::new(0);
        let store = store(&clock);
        let other = store.clone();
        let t = thread::spawn(move || {
            matches!(
                other.blocking_begin(key(), fp(), LEASE),
                Ok(Begin::Acquired(_))
            )
        });
        let mine = matches!(
            store.blocking_begin(key(), fp(), LEASE),
            Ok(Begin::Acquired(_))
        );
        let theirs = t.join().expect("join");
        assert!(mine ^ theirs, "mine={mine} theirs={theirs}");
    });
}

#[test]
fn a_stale_holder_never_completes_over_the_new_one() {
    loom::model(|| {
        let clock = ManualClock::new(0);
        let store = store(&clock);
        let Ok(Begin::Acquired(old)) = store.blocking_begin(key(), fp(), LEASE) else {
            panic!()
        };
        clock.advance(LEASE); // the old lease has expired
        let other = store.clone();
        let t = thread::spawn(move || match other.blocking_begin(key(), fp(), LEASE) {
            Ok(Begin::Acquired(new)) => {
                assert!(new.is_takeover());
                other.blocking_complete(&new, b"new", None).is_ok()
            }
            Ok(Begin::Completed(c)) => {
                assert_eq!(c.response, b"old");
                false
            }
            other => panic!("{other:?}"),
        });
        let old_won = match store.blocking_complete(&old, b"old", None) {
            Ok(_) => true,
            Err(Error::StaleLease { .. }) => false,
            Err(e) => panic!("{e}"),
        };
        let new_won = t.join().expect("join");
        assert!(old_won ^ new_won, "old={old_won} new={new_won}");
        let Ok(Some(Snapshot::Completed(c))) = store.blocking_get(key()) else {
            panic!()
        };
        assert_eq!(c.response, if old_won { &b"old"[..] } else { &b"new"[..] });
    });
}

#[test]
fn a_waiter_always_wakes_on_completion() {
    loom::model(|| {
        let clock = ManualClock::new(0);
        let store = store(&clock);
        let Ok(Begin::Acquired(lease)) = store.blocking_begin(key(), fp(), LEASE) else {
            panic!()
        };
        let other = store.clone();
        // loom has no time: if the wake-up were lost, this wait would never end and loom
        // would report a deadlock.
        let t = thread::spawn(move || {
            other.blocking_begin_wait(key(), fp(), LEASE, Duration::from_secs(3600))
        });
        store
            .blocking_complete(&lease, b"r", None)
            .expect("complete");
        match t.join().expect("join") {
            Ok(Begin::Completed(c)) => assert_eq!(c.response, b"r"),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_waiter_always_wakes_on_release() {
    loom::model(|| {
        let clock = ManualClock::new(0);
        let store = store(&clock);
        let Ok(Begin::Acquired(lease)) = store.blocking_begin(key(), fp(), LEASE) else {
            panic!()
        };
        let other = store.clone();
        let t = thread::spawn(move || {
            other.blocking_begin_wait(key(), fp(), LEASE, Duration::from_secs(3600))
        });
        store.blocking_release(lease).expect("release");
        assert!(matches!(t.join().expect("join"), Ok(Begin::Acquired(_))));
    });
}
