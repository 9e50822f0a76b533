//! Checkpoints are incremental: each rewrites only the keys the log changed since the last one.
//! The property that must hold whatever the changes: the checkpoint database alone (no log at
//! all) reopens to exactly the state the store had when the checkpoint was taken, and the
//! checkpoint with the log reopens to the state at the end.
//!
//! `PROPTEST_CASES=2000 cargo test --release --test checkpoints` for a long run.

use std::path::Path;
use std::time::Duration;

use idemkv::{
    Begin, CasOutcome, Fingerprint, Key, Lease, ManualClock, OwnedKey, Snapshot, Store,
    StoreBuilder, Write,
};
use proptest::prelude::*;

const T0: u64 = 1_700_000_000_000;
const KEYS: u8 = 12;

#[derive(Clone, Debug)]
enum Op {
    Begin { key: u8, lease_ms: u64 },
    Complete { lease: usize, ttl_ms: Option<u64> },
    Release { lease: usize },
    Remove { key: u8 },
    Put { key: u8, value: u8 },
    Advance { ms: u64 },
    Sweep,
    Checkpoint,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS, 1u64..5_000).prop_map(|(key, lease_ms)| Op::Begin { key, lease_ms }),
        4 => (0usize..16, prop::option::of(1u64..8_000))
            .prop_map(|(lease, ttl_ms)| Op::Complete { lease, ttl_ms }),
        1 => (0usize..16).prop_map(|lease| Op::Release { lease }),
        1 => (0..KEYS).prop_map(|key| Op::Remove { key }),
        2 => (0..KEYS, any::<u8>()).prop_map(|(key, value)| Op::Put { key, value }),
        2 => (1u64..4_000).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Sweep),
        2 => Just(Op::Checkpoint),
    ]
}

fn builder(clock: &ManualClock) -> StoreBuilder {
    Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .checkpoint_every(u64::MAX)
        .lease_retention(Duration::from_secs(3))
        // Small segments, so checkpoints also remove some and later ones read across several.
        .log_segment_size(4 << 10)
}

fn id(k: u8) -> String {
    format!("key-{k}")
}

/// Every key's visible state.
fn state(s: &Store) -> Vec<Option<Snapshot>> {
    (0..KEYS)
        .map(|k| s.blocking_get(Key::new("t", &id(k))).expect("get"))
        .collect()
}

/// A copy of `dir` holding only its checkpoint database.
fn checkpoint_alone(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        dir.join("checkpoint.redb"),
        copy.path().join("checkpoint.redb"),
    )
    .expect("copy checkpoint");
    copy
}

fn run(ops: &[Op]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let s = builder(&clock).open(dir.path()).expect("open");
    let fp = Fingerprint::of(b"request");
    let mut leases: Vec<Lease> = Vec::new();
    // (the checkpoint alone, the state and time when it was taken)
    let mut taken = Vec::new();
    let mut now = T0;
    for op in ops {
        match *op {
            Op::Begin { key, lease_ms } => {
                if let Ok(Begin::Acquired(l)) =
                    s.blocking_begin(Key::new("t", &id(key)), fp, Duration::from_millis(lease_ms))
                {
                    leases.push(l);
                }
            }
            Op::Complete { lease, ttl_ms } => {
                if let Some(l) = leases.get(lease % leases.len().max(1)) {
                    let _ = s.blocking_complete(l, b"response", ttl_ms.map(Duration::from_millis));
                }
            }
            Op::Release { lease } => {
                if !leases.is_empty() {
                    let l = leases.remove(lease % leases.len());
                    let _ = s.blocking_release(l);
                }
            }
            Op::Remove { key } => {
                s.blocking_remove(Key::new("t", &id(key))).expect("remove");
            }
            Op::Put { key, value } => {
                let _ = s.blocking_cas(&Write::put_if_absent(
                    OwnedKey::new("t", id(key)),
                    vec![value],
                ));
            }
            Op::Advance { ms } => {
                clock.advance(Duration::from_millis(ms));
                now += ms;
            }
            Op::Sweep => {
                s.sweep_expired();
            }
            Op::Checkpoint => {
                // What a checkpoint leaves out is what a sweep would drop: sweep first, so
                // that the state to compare is exactly what it must hold.
                s.sweep_expired();
                s.checkpoint().expect("checkpoint");
                taken.push((checkpoint_alone(dir.path()), state(&s), now));
            }
        }
    }
    s.sweep_expired();
    let end = state(&s);
    drop(s);
    for (i, (copy, then, at)) in taken.iter().enumerate() {
        let at_clock = ManualClock::new(*at);
        let r = builder(&at_clock)
            .open(copy.path())
            .expect("open the checkpoint alone");
        assert_eq!(&state(&r), then, "checkpoint {i} alone");
    }
    let r = builder(&clock).open(dir.path()).expect("reopen");
    assert_eq!(state(&r), end, "checkpoint and log");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn the_checkpoint_alone_holds_the_state_it_was_taken_at(
        ops in prop::collection::vec(op(), 1..80)
    ) {
        run(&ops);
    }
}

/// A store holding a value under every key.
fn filled() -> (tempfile::TempDir, ManualClock, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let s = builder(&clock).open(dir.path()).expect("open");
    for k in 0..KEYS {
        let put = s.blocking_cas(&Write::put_if_absent(OwnedKey::new("t", id(k)), "v"));
        assert!(matches!(put.expect("put"), CasOutcome::Applied { .. }));
    }
    (dir, clock, s)
}

#[test]
fn a_checkpoint_rewrites_only_what_changed() {
    let (dir, clock, s) = filled();
    let first = s.checkpoint().expect("checkpoint");
    assert_eq!((first.records, first.removed), (u64::from(KEYS), 0));
    s.blocking_remove(Key::new("t", &id(1))).expect("remove");
    s.blocking_remove(Key::new("t", &id(2))).expect("remove");
    let put = s.blocking_cas(&Write::put_if_absent(OwnedKey::new("t", id(2)), "w"));
    assert!(matches!(put.expect("put"), CasOutcome::Applied { .. }));
    let second = s.checkpoint().expect("checkpoint");
    assert_eq!((second.records, second.removed), (1, 1), "{second:?}");
    let nothing = s.checkpoint().expect("checkpoint");
    assert_eq!((nothing.records, nothing.removed), (0, 0), "{nothing:?}");
    let then = state(&s);
    drop(s);
    let copy = checkpoint_alone(dir.path());
    let r = builder(&clock).open(copy.path()).expect("open");
    assert_eq!(state(&r), then);
}

#[test]
fn a_checkpoint_writes_everything_when_the_log_cannot_say_what_changed() {
    let (dir, clock, s) = filled();
    // The log's files vanish (an operator's mistake): the writer keeps its open segment, but
    // the checkpoint cannot read back which keys changed, so it writes every live record.
    for entry in std::fs::read_dir(dir.path().join("wal")).expect("wal") {
        std::fs::remove_file(entry.expect("entry").path()).expect("remove");
    }
    let cp = s.checkpoint().expect("checkpoint");
    assert_eq!((cp.records, cp.removed), (u64::from(KEYS), 0), "{cp:?}");
    let then = state(&s);
    drop(s);
    let copy = checkpoint_alone(dir.path());
    let r = builder(&clock).open(copy.path()).expect("open");
    assert_eq!(state(&r), then);
}
