//! Operation sequences with a power cut at a random sync: after reopening, the store holds
//! exactly what an in-memory shadow that received only the acknowledged operations holds.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use idemkv::{Begin, Error, Fingerprint, ManualClock, OwnedKey, Snapshot, Store, Write};

#[path = "../../tests/support/storage.rs"]
mod storage;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Begin { key: u8, fp: bool },
    Complete { key: u8, len: u8 },
    Release { key: u8 },
    Cas { key: u8, value: u8 },
    Remove { key: u8 },
    Advance { secs: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    cut_at: u8,
    torn: u8,
    ops: Vec<Op>,
}

fn key(k: u8) -> OwnedKey {
    OwnedKey::new(if k & 8 == 0 { "a" } else { "b" }, [b'k', k % 4])
}

fn vkey(k: u8) -> OwnedKey {
    OwnedKey::new("v", [k % 4])
}

fn norm(s: &Store, k: &OwnedKey) -> Option<Snapshot> {
    match s.blocking_get(k.as_key()).ok()? {
        Some(Snapshot::InFlight { deadline, fingerprint, pending, .. }) => {
            Some(Snapshot::InFlight { token: 0, deadline, fingerprint, pending })
        }
        Some(Snapshot::Value(mut v)) => {
            v.version = 0;
            Some(Snapshot::Value(v))
        }
        other => other,
    }
}

/// Applies one operation; `Ok` means acknowledged.
fn apply(s: &Store, clock: &ManualClock, leases: &mut [Option<idemkv::Lease>; 16], op: &Op) -> Result<(), Error> {
    match *op {
        Op::Begin { key: k, fp } => {
            let f = Fingerprint::of(&[u8::from(fp)]);
            if let Begin::Acquired(l) = s.blocking_begin(key(k).as_key(), f, Duration::from_secs(5))? {
                leases[usize::from(k % 16)] = Some(l);
            }
        }
        Op::Complete { key: k, len } => {
            if let Some(l) = leases[usize::from(k % 16)].take() {
                match s.blocking_complete(&l, &vec![len; usize::from(len)], None) {
                    Ok(_) | Err(Error::StaleLease { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Op::Release { key: k } => {
            if let Some(l) = leases[usize::from(k % 16)].take() {
                match s.blocking_release(l) {
                    Ok(()) | Err(Error::StaleLease { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Op::Cas { key: k, value } => {
            let w = match s.blocking_get(vkey(k).as_key())? {
                Some(Snapshot::Value(v)) => Write::set_if_version(vkey(k), v.version, vec![value]),
                _ => Write::put_if_absent(vkey(k), vec![value]),
            };
            let _ = s.blocking_cas(&w)?;
        }
        Op::Remove { key: k } => {
            let _ = s.blocking_remove(key(k).as_key())?;
        }
        Op::Advance { secs } => clock.advance(Duration::from_secs(u64::from(secs % 8))),
    }
    Ok(())
}

fuzz_target!(|input: Input| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let clock = ManualClock::new(1_700_000_000_000);
    let faults = storage::PowerCut::new(u64::from(input.cut_at) + 1, usize::from(input.torn));
    let Ok(durable) = Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .log_segment_size(1 << 14)
        .log_storage(faults)
        .open(dir.path())
    else {
        return;
    };
    // Two shadows: `without` gets the acknowledged operations, `with` also the one that failed
    // (its record may have reached the disk whole before the power cut: unacknowledged changes
    // may survive, but only whole).
    let shadow = || Store::builder().clock(clock.clone()).sweep_interval(None).build();
    let (Ok(without), Ok(with)) = (shadow(), shadow()) else { return };
    let mut ld: [Option<idemkv::Lease>; 16] = Default::default();
    let mut lw: [Option<idemkv::Lease>; 16] = Default::default();
    let mut lx: [Option<idemkv::Lease>; 16] = Default::default();
    for op in input.ops.iter().take(200) {
        let before = idemkv::Clock::now(&clock).as_millis();
        let result = apply(&durable, &clock, &mut ld, op);
        let after = idemkv::Clock::now(&clock).as_millis();
        clock.set(before);
        apply(&with, &clock, &mut lx, op).expect("the shadow refuses nothing");
        match result {
            Ok(()) => {
                clock.set(before);
                apply(&without, &clock, &mut lw, op).expect("the shadow refuses nothing");
                clock.set(after);
            }
            Err(Error::Poisoned { .. }) => break,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    drop(durable);
    let reopened = Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .open(dir.path())
        .expect("reopen after the power cut");
    let state = |s: &Store| -> Vec<Option<Snapshot>> {
        (0..16u8).flat_map(|k| [norm(s, &key(k)), norm(s, &vkey(k))]).collect()
    };
    let got = state(&reopened);
    assert!(got == state(&without) || got == state(&with), "reopened state matches neither shadow");
});
