//! A crash at each step of creating or removing a log segment, deterministically: the storage
//! lets the chosen call through and then "dies" (every later call fails, nothing more reaches
//! the files), as a `SIGKILL` right after that call would. After each one the directory is
//! reopened with the operating system's files: everything acknowledged must be there, the
//! store must accept writes, and a second restart must see those too (no crash loop).

use std::path::Path;
use std::time::Duration;

use idemkv::{Begin, Error, Fingerprint, Key, OwnedKey, Snapshot, Store, StoreBuilder};

#[path = "support/storage.rs"]
mod storage;
use storage::{CrashAfter, Point};

const LEASE: Duration = Duration::from_secs(60);
/// Small segments, so that a few dozen completions roll over several of them.
const SEGMENT: u64 = 4096;

fn builder() -> StoreBuilder {
    Store::builder()
        .log_segment_size(SEGMENT)
        .sweep_interval(None)
        // Checkpoints only when a test asks for one.
        .checkpoint_every(u64::MAX)
        .checkpoint_interval(Duration::from_secs(24 * 3600))
}

fn key(i: usize) -> OwnedKey {
    OwnedKey::new("crash-points", format!("order-{i:04}"))
}

fn response(i: usize) -> Vec<u8> {
    format!("201 created order {i} {}", "x".repeat(100)).into_bytes()
}

/// Completes keys `from..` until the store refuses; returns the acknowledged ones.
fn write_until_refused(store: &Store, from: usize, limit: usize) -> (Vec<usize>, Option<Error>) {
    let mut acked = Vec::new();
    for i in from..from + limit {
        let fp = Fingerprint::of(&response(i));
        let lease = match store.blocking_begin(key(i).as_key(), fp, LEASE) {
            Ok(Begin::Acquired(l)) => l,
            Ok(other) => panic!("key {i} was fresh, got {other:?}"),
            Err(e) => return (acked, Some(e)),
        };
        match store.blocking_complete(&lease, &response(i), None) {
            Ok(_) => acked.push(i),
            Err(e) => return (acked, Some(e)),
        }
    }
    (acked, None)
}

fn assert_completed(store: &Store, keys: &[usize], context: &str) {
    for &i in keys {
        match store.blocking_get(key(i).as_key()).expect("get") {
            Some(Snapshot::Completed(c)) => {
                assert_eq!(c.response, response(i), "{context}: key {i} changed")
            }
            other => panic!("{context}: acknowledged key {i} is {other:?}"),
        }
    }
}

/// Reopens `dir`, checks the acknowledged keys, writes more, and does it all once more.
fn reopen_and_check(dir: &Path, acked: &[usize], next: usize, context: &str) {
    let mut all = acked.to_vec();
    let mut next = next;
    for round in 0..2 {
        let store = builder()
            .open(dir)
            .unwrap_or_else(|e| panic!("{context}: reopen {round} failed: {e}"));
        assert_completed(&store, &all, context);
        let (more, err) = write_until_refused(&store, next, 40);
        assert!(
            err.is_none(),
            "{context}: the reopened store (round {round}) refused a write: {err:?}"
        );
        assert_eq!(more.len(), 40);
        // The new writes must have rolled over to new segments too.
        assert_completed(&store, &more, context);
        all.extend(more);
        next += 40;
        drop(store);
    }
}

/// Opens a fresh store that dies right after the `nth` call of kind `point`, writes until it
/// is refused, and checks the directory after the crash.
fn crash_in_segment_creation(point: Point, nth: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let context = format!("crash after {point:?} #{nth}");
    let storage = CrashAfter::new(point, nth);
    let store = builder()
        .log_storage(storage.clone())
        .open(dir.path())
        .expect("open");
    let (acked, err) = write_until_refused(&store, 0, 400);
    assert!(
        storage.crashed(),
        "{context}: the crash point was never reached"
    );
    assert!(
        matches!(err, Some(Error::Poisoned { .. })),
        "{context}: after the crash the store must refuse writes as poisoned, got {err:?}"
    );
    if nth > 1 {
        assert!(
            !acked.is_empty(),
            "{context}: nothing was acknowledged before the crash"
        );
    }
    drop(store);
    reopen_and_check(dir.path(), &acked, 10_000, &context);
}

#[test]
fn crash_after_segment_create() {
    crash_in_segment_creation(Point::Create, 1);
    crash_in_segment_creation(Point::Create, 3);
}

#[test]
fn crash_after_segment_preallocation() {
    crash_in_segment_creation(Point::Allocate, 1);
    crash_in_segment_creation(Point::Allocate, 3);
}

#[test]
fn crash_after_segment_header_write() {
    crash_in_segment_creation(Point::HeaderWrite, 1);
    crash_in_segment_creation(Point::HeaderWrite, 3);
}

#[test]
fn crash_after_segment_header_sync() {
    crash_in_segment_creation(Point::HeaderSync, 1);
    crash_in_segment_creation(Point::HeaderSync, 3);
}

#[test]
fn crash_after_directory_sync() {
    crash_in_segment_creation(Point::DirSync, 1);
    crash_in_segment_creation(Point::DirSync, 3);
}

#[test]
fn crash_after_a_torn_first_batch_in_a_new_segment() {
    // The batch that asked for the segment was written but never synced: not acknowledged.
    crash_in_segment_creation(Point::BatchWrite, 1);
    crash_in_segment_creation(Point::BatchWrite, 7);
}

/// Fills several segments, then checkpoints with a storage that dies after removing `nth`
/// covered segments.
fn crash_in_checkpoint_removal(nth: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let context = format!("crash after removing covered segment #{nth}");
    let storage = CrashAfter::new(Point::Remove, nth);
    let store = builder()
        .log_storage(storage.clone())
        .open(dir.path())
        .expect("open");
    let (acked, err) = write_until_refused(&store, 0, 150);
    assert!(err.is_none(), "{context}: {err:?}");
    let segments_before = wal_segments(dir.path());
    assert!(
        segments_before >= 4,
        "{context}: only {segments_before} segments"
    );
    let result = store.checkpoint();
    assert!(
        storage.crashed(),
        "{context}: the crash point was never reached"
    );
    assert!(
        result.is_err(),
        "{context}: the checkpoint cannot finish after the crash"
    );
    assert_eq!(wal_segments(dir.path()), segments_before - nth as usize);
    // The process is gone: nothing more is acknowledged.
    let (late, err) = write_until_refused(&store, 5_000, 5);
    assert!(
        late.is_empty() && err.is_some(),
        "{context}: wrote after the crash"
    );
    drop(store);
    reopen_and_check(dir.path(), &acked, 10_000, &context);
}

#[test]
fn crash_mid_checkpoint_segment_deletion() {
    crash_in_checkpoint_removal(1);
    crash_in_checkpoint_removal(2);
}

#[test]
fn covered_segments_removed_out_of_order_still_open() {
    // A power cut before the directory sync may keep an older removal and lose a newer one's
    // order: the oldest segment comes back while the ones after it stay removed. The gap is
    // wholly covered by the checkpoint, so the store must open.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = builder().open(dir.path()).expect("open");
    let (acked, err) = write_until_refused(&store, 0, 150);
    assert!(err.is_none(), "{err:?}");
    let wal = dir.path().join("wal");
    let mut names: Vec<_> = std::fs::read_dir(&wal)
        .expect("read wal")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    let oldest = names[0].clone();
    let saved = std::fs::read(&oldest).expect("read oldest");
    let stats = store.checkpoint().expect("checkpoint");
    assert!(stats.segments_deleted >= 2, "{stats:?}");
    drop(store);
    std::fs::write(&oldest, saved).expect("restore the oldest segment");
    reopen_and_check(dir.path(), &acked, 10_000, "out-of-order removal");
}

#[test]
fn a_leftover_empty_segment_is_removed_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = CrashAfter::new(Point::DirSync, 2);
    let store = builder()
        .log_storage(storage.clone())
        .open(dir.path())
        .expect("open");
    let (acked, _) = write_until_refused(&store, 0, 400);
    assert!(storage.crashed());
    drop(store);
    let store = builder().open(dir.path()).expect("reopen");
    let report = store.recovery_report().expect("report");
    assert_eq!(report.empty_segments_removed.len(), 1, "{report:?}");
    assert!(!report.empty_segments_removed[0].exists());
    assert_completed(&store, &acked, "leftover");
    let k = Key::new("crash-points", "after");
    assert!(matches!(
        store.blocking_begin(k, Fingerprint::NONE, LEASE),
        Ok(Begin::Acquired(_))
    ));
}

fn wal_segments(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("wal"))
        .expect("read wal")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "wal"))
        })
        .count()
}
