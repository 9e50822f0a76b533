//! Criterion micro-benchmarks of the core operations:
//! `begin` on a miss, on a replay, on a conflict, a whole begin + complete cycle, and the same
//! cycle through the batch calls (`begin_many` + `complete_many`, 256 keys a call), in memory
//! and with a log.
//!
//! `cargo bench --bench core`

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use idemkv::{Begin, Completion, Durability, Fingerprint, IdempotencyStore, Key, LeaseSync, Store};

const LEASE: Duration = Duration::from_secs(30);
const RESPONSE: &[u8] = b"201 {\"id\":\"3f1c7a52\"}";

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("order-{i:08}")).collect()
}

fn store() -> Store {
    Store::builder()
        .sweep_interval(None)
        .build()
        .expect("store")
}

/// A store with a log (`Batched`: no call waits for the disk), on a fresh directory.
fn logged() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::builder()
        .durability(Durability::Batched {
            max_delay: Duration::from_millis(10),
        })
        .sweep_interval(None)
        .open(dir.path())
        .expect("open");
    (dir, s)
}

/// Begin and complete each of `ids`, one call each.
fn singles(s: &Store, ids: &[String], fp: Fingerprint) {
    for id in ids {
        if let Ok(Begin::Acquired(l)) = s.blocking_begin(Key::new("bench", id), fp, LEASE) {
            black_box(s.blocking_complete(&l, RESPONSE, None).ok());
        }
    }
}

/// The same through `begin_many` and `complete_many`, 256 keys a call.
fn many(rt: &tokio::runtime::Runtime, s: &Store, ids: &[String], fp: Fingerprint) {
    for chunk in ids.chunks(256) {
        let keys: Vec<(Key<'_>, Fingerprint)> =
            chunk.iter().map(|id| (Key::new("bench", id), fp)).collect();
        let begun = rt
            .block_on(IdempotencyStore::begin_many(
                s,
                &keys,
                LEASE,
                LeaseSync::Deferred,
            ))
            .expect("begin_many");
        let leases: Vec<_> = begun
            .into_iter()
            .filter_map(|b| match b {
                Ok(Begin::Acquired(l)) => Some(l),
                _ => None,
            })
            .collect();
        let done: Vec<Completion<'_>> = leases
            .iter()
            .map(|l| Completion::new(l, RESPONSE))
            .collect();
        black_box(
            rt.block_on(IdempotencyStore::complete_many(s, &done))
                .expect("complete_many"),
        );
    }
}

fn bench(c: &mut Criterion) {
    let fp = Fingerprint::of(b"POST /orders {}");
    let ids = keys(1 << 16);
    let mut g = c.benchmark_group("core");

    g.throughput(Throughput::Elements(1024));
    g.bench_function("begin_miss", |b| {
        b.iter_batched_ref(
            store,
            |s| {
                for id in &ids[..1024] {
                    black_box(s.blocking_begin(Key::new("bench", id), fp, LEASE).ok());
                }
            },
            BatchSize::LargeInput,
        );
    });

    let replay = store();
    for id in &ids {
        if let Ok(Begin::Acquired(l)) = replay.blocking_begin(Key::new("bench", id), fp, LEASE) {
            let _ = replay.blocking_complete(&l, RESPONSE, None);
        }
    }
    let mut i = 0usize;
    g.throughput(Throughput::Elements(1));
    g.bench_function("begin_replay", |b| {
        b.iter(|| {
            i = (i + 1) & (ids.len() - 1);
            black_box(
                replay
                    .blocking_begin(Key::new("bench", &ids[i]), fp, LEASE)
                    .ok(),
            )
        });
    });

    let conflict = store();
    let _held: Vec<_> = ids
        .iter()
        .map(|id| conflict.blocking_begin(Key::new("bench", id), fp, LEASE))
        .collect();
    g.bench_function("begin_conflict", |b| {
        b.iter(|| {
            i = (i + 1) & (ids.len() - 1);
            black_box(
                conflict
                    .blocking_begin(Key::new("bench", &ids[i]), fp, LEASE)
                    .ok(),
            )
        });
    });

    g.throughput(Throughput::Elements(1024));
    // The batch calls the Kafka processor makes: 1024 keys as 4 calls of 256 (a partition's
    // batch runs to a few hundred messages), against 1024 single calls; in memory, and on a
    // store with a log (`Batched`), where the batch calls write one record a call.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let ids = &ids[..1024];
    g.bench_function("begin_complete", |b| {
        b.iter_batched_ref(store, |s| singles(s, ids, fp), BatchSize::LargeInput);
    });
    g.bench_function("begin_complete_many_256", |b| {
        b.iter_batched_ref(store, |s| many(&rt, s, ids, fp), BatchSize::LargeInput);
    });
    g.bench_function("begin_complete_logged", |b| {
        b.iter_batched_ref(logged, |(_, s)| singles(s, ids, fp), BatchSize::LargeInput);
    });
    g.bench_function("begin_complete_many_256_logged", |b| {
        b.iter_batched_ref(
            logged,
            |(_, s)| many(&rt, s, ids, fp),
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

/// criterion's generated entry points.
mod group {
    use super::*;
    criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
    }
}
criterion_main!(group::benches);
