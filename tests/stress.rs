//! Many threads racing on few keys: every key's work runs exactly once, no two callers ever hold
//! a key at the same time, and with leases that expire under the holders' feet, exactly one
//! completion per key succeeds and its response is the one stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use idemkv::{Begin, Error, Fingerprint, Key, Snapshot, Store};

const THREADS: usize = 8;
const KEYS: usize = 64;

fn fp() -> Fingerprint {
    Fingerprint::of(b"same request")
}

#[test]
fn every_key_runs_exactly_once() {
    let store = Store::builder().shards(4).build().expect("store");
    let runs: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let held: Arc<Vec<AtomicBool>> = Arc::new((0..KEYS).map(|_| AtomicBool::new(false)).collect());
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, runs, held) = (store.clone(), Arc::clone(&runs), Arc::clone(&held));
            std::thread::spawn(move || {
                for round in 0..KEYS * 4 {
                    // Each thread walks the keys in its own order, several times.
                    let k = (round * (2 * t + 1) + t) % KEYS;
                    let id = format!("key-{k}");
                    let key = Key::new("stress", &id);
                    // Half the threads wait for the holder, half take "in progress" and move on.
                    let outcome = if t % 2 == 0 {
                        store.blocking_begin_wait(
                            key,
                            fp(),
                            Duration::from_secs(60),
                            Duration::from_secs(60),
                        )
                    } else {
                        store.blocking_begin(key, fp(), Duration::from_secs(60))
                    }
                    .expect("begin");
                    match outcome {
                        Begin::Acquired(lease) => {
                            assert!(
                                !held[k].swap(true, Ordering::SeqCst),
                                "two holders of key {k}"
                            );
                            runs[k].fetch_add(1, Ordering::SeqCst);
                            std::thread::yield_now();
                            held[k].store(false, Ordering::SeqCst);
                            store
                                .blocking_complete(&lease, id.as_bytes(), None)
                                .expect("complete");
                        }
                        Begin::Completed(c) => assert_eq!(c.response, id.as_bytes()),
                        Begin::InProgress { .. } => assert!(t % 2 == 1, "a waiter gave up early"),
                        Begin::Mismatch => panic!("mismatch"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    for (k, r) in runs.iter().enumerate() {
        assert_eq!(
            r.load(Ordering::SeqCst),
            1,
            "key {k} ran {} times",
            r.load(Ordering::SeqCst)
        );
    }
    let s = store.stats();
    assert_eq!(s.acquired, KEYS as u64);
    assert_eq!(s.records, KEYS as u64);
}

#[test]
fn with_expiring_leases_exactly_one_completion_wins() {
    let store = Store::builder().shards(4).build().expect("store");
    let wins: Arc<Vec<AtomicU64>> = Arc::new((0..16).map(|_| AtomicU64::new(0)).collect());
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, wins) = (store.clone(), Arc::clone(&wins));
            std::thread::spawn(move || {
                for round in 0..200 {
                    let k = (round + t) % 16;
                    let id = format!("key-{k}");
                    let key = Key::new("stress", &id);
                    // 1 ms leases: holders are routinely overtaken while they "work".
                    if let Begin::Acquired(lease) = store
                        .blocking_begin(key, fp(), Duration::from_millis(1))
                        .expect("begin")
                    {
                        if round % 3 == 0 {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        let mine = format!("{k}:{t}:{}", lease.token());
                        match store.blocking_complete(&lease, mine.as_bytes(), None) {
                            Ok(_) => {
                                wins[k].fetch_add(1, Ordering::SeqCst);
                                match store.blocking_get(key).expect("get") {
                                    Some(Snapshot::Completed(c)) => {
                                        assert_eq!(c.response, mine.as_bytes())
                                    }
                                    other => panic!("{other:?}"),
                                }
                            }
                            Err(Error::StaleLease { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    for (k, w) in wins.iter().enumerate() {
        assert_eq!(w.load(Ordering::SeqCst), 1, "key {k}");
    }
}
