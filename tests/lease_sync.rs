//! `LeaseSync`: what a `begin` waits for with `Durability::Immediate`, and what a power cut
//! leaves in each mode. The log's syncs go through a storage that holds them back on demand
//! (`PowerCut::hold`), so each test decides what is on disk when; a power cut there loses every
//! write since the last sync, and reopening the directory shows what a machine would find.

#[path = "support/storage.rs"]
mod storage;

use std::sync::mpsc;
use std::time::Duration;

use idemkv::{Begin, Durability, Error, Fingerprint, Key, LeaseSync, Store};
use storage::PowerCut;

const LEASE: Duration = Duration::from_secs(60);
/// Long enough for a call that is not blocked on the disk to return on a loaded machine.
const RETURNS: Duration = Duration::from_secs(10);
/// How long a call blocked on a held sync is watched for not returning.
const STAYS: Duration = Duration::from_millis(300);

fn fp() -> Fingerprint {
    Fingerprint::of(b"POST /orders {}")
}

fn key() -> Key<'static> {
    Key::new("orders", "k-1")
}

fn open(dir: &std::path::Path, disk: &PowerCut) -> Store {
    Store::builder()
        .durability(Durability::Immediate)
        .sweep_interval(None)
        .log_storage(disk.clone())
        .open(dir)
        .expect("open")
}

fn reopen(dir: &std::path::Path) -> Store {
    Store::builder()
        .sweep_interval(None)
        .open(dir)
        .expect("reopen after the power cut")
}

/// Lets the held syncs through when dropped, before the store it is declared after: a failing
/// assertion then ends the test instead of leaving the store's writer blocked on the disk.
struct Unhold(PowerCut);

impl Drop for Unhold {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Holds every sync of `disk` back until the returned guard is dropped (or `release`d).
fn hold(disk: &PowerCut) -> Unhold {
    disk.hold();
    Unhold(disk.clone())
}

/// Runs `f` on a thread; its result arrives on the returned channel.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// A deferred `begin` on a fresh key, with the disk held: it must return at once with a lease,
/// and its record must then reach the disk (where the sync is held).
fn acquire_while_the_disk_is_held(store: &Store, disk: &PowerCut) -> idemkv::Lease {
    let s = store.clone();
    let begun = spawn(move || s.blocking_begin(key(), fp(), LEASE));
    let lease = match begun
        .recv_timeout(RETURNS)
        .expect("a deferred begin waits for no disk")
    {
        Ok(Begin::Acquired(lease)) => lease,
        other => panic!("expected a fresh lease, got {other:?}"),
    };
    assert!(
        disk.wait_for_held_sync(),
        "the lease's record goes to the disk"
    );
    lease
}

#[test]
fn deferred_begin_returns_while_the_disk_is_held_and_the_completion_waits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = PowerCut::manual();
    let store = open(dir.path(), &disk).with_lease_sync(LeaseSync::Deferred);
    let _unhold = hold(&disk);
    let lease = acquire_while_the_disk_is_held(&store, &disk);
    let s = store.clone();
    let done = spawn(move || s.blocking_complete(&lease, b"201", None));
    assert!(
        done.recv_timeout(STAYS).is_err(),
        "the completion is acknowledged only once durable"
    );
    disk.release();
    done.recv_timeout(RETURNS)
        .expect("the completion returns once the disk answers")
        .expect("completed");
}

#[test]
fn synced_begin_waits_for_its_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = PowerCut::manual();
    let store = open(dir.path(), &disk);
    let _unhold = hold(&disk);
    let s = store.clone();
    let begun = spawn(move || s.blocking_begin(key(), fp(), LEASE));
    assert!(
        disk.wait_for_held_sync(),
        "the lease's record goes to the disk"
    );
    assert!(
        begun.recv_timeout(STAYS).is_err(),
        "a synced begin returns only once its lease is durable"
    );
    disk.release();
    assert!(matches!(
        begun.recv_timeout(RETURNS).expect("returns"),
        Ok(Begin::Acquired(_))
    ));
}

#[test]
fn deferred_replay_of_a_completion_not_yet_durable_waits_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = PowerCut::manual();
    let store = open(dir.path(), &disk).with_lease_sync(LeaseSync::Deferred);
    let Begin::Acquired(lease) = store.blocking_begin(key(), fp(), LEASE).expect("begin") else {
        panic!("fresh key")
    };
    let _unhold = hold(&disk);
    let s = store.clone();
    let done = spawn(move || s.blocking_complete(&lease, b"201", None));
    assert!(disk.wait_for_held_sync(), "the completion goes to the disk");
    let s = store.clone();
    let replay = spawn(move || s.blocking_begin(key(), fp(), LEASE));
    assert!(
        replay.recv_timeout(STAYS).is_err(),
        "a replay reports a stored response: it waits for that response to be durable"
    );
    disk.release();
    done.recv_timeout(RETURNS)
        .expect("returns")
        .expect("completed");
    match replay.recv_timeout(RETURNS).expect("returns") {
        Ok(Begin::Completed(c)) => assert_eq!(c.response, b"201"),
        other => panic!("expected the replay, got {other:?}"),
    }
}

#[test]
fn deferred_lease_cut_before_the_disk_leaves_no_record_and_the_retry_runs_fresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = PowerCut::manual();
    {
        let store = open(dir.path(), &disk).with_lease_sync(LeaseSync::Deferred);
        let _unhold = hold(&disk);
        let lease = acquire_while_the_disk_is_held(&store, &disk);
        // The handler runs; the power goes before its lease was synced.
        let s = store.clone();
        let done = spawn(move || s.blocking_complete(&lease, b"201", None));
        disk.cut_now();
        let acked = done.recv_timeout(RETURNS).expect("the completion answers");
        assert!(
            matches!(acked, Err(Error::Poisoned { .. })),
            "nothing is acknowledged once the disk is gone: {acked:?}"
        );
        assert!(disk.happened());
    }
    let store = reopen(dir.path());
    assert_eq!(
        store.blocking_get(key()).expect("get"),
        None,
        "a lease that never reached the disk leaves no record"
    );
    match store.blocking_begin(key(), fp(), LEASE).expect("retry") {
        Begin::Acquired(lease) => assert!(!lease.is_takeover(), "the retry runs as fresh"),
        other => panic!("expected a fresh lease, got {other:?}"),
    }
}

#[test]
fn synced_lease_survives_the_cut_and_the_retry_sees_it_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = PowerCut::manual();
    {
        let store = open(dir.path(), &disk);
        let Begin::Acquired(lease) = store.blocking_begin(key(), fp(), LEASE).expect("begin")
        else {
            panic!("fresh key")
        };
        let _unhold = hold(&disk);
        let s = store.clone();
        let done = spawn(move || s.blocking_complete(&lease, b"201", None));
        assert!(disk.wait_for_held_sync(), "the completion goes to the disk");
        disk.cut_now();
        assert!(done.recv_timeout(RETURNS).expect("answers").is_err());
    }
    let store = reopen(dir.path());
    assert!(
        matches!(
            store.blocking_begin(key(), fp(), LEASE).expect("retry"),
            Begin::InProgress { .. }
        ),
        "the synced lease is on disk: the retry waits for it to run out, then takes it over"
    );
}
