//! The Redis backend against the floor of any Redis-based design, side by side in one run on
//! the same server and connection setup:
//!
//! - `raw SET NX + SET XX`: the same two round trips per request without any of our logic
//!   (`SET key 1 NX PX 30000`, then `SET key response XX PX 86400000`), pipelined across the
//!   concurrent callers on one multiplexed connection;
//! - `RedisStore begin + complete`: our two scripts, same pipelining;
//! - the same with `client_clock(50 ms)`: the scripts take the time from the caller instead of
//!   calling `TIME` (one of the issue-14 ideas; the others are in DESIGN.md);
//! - `embedded begin + complete`: the in-memory store, for scale.
//!
//! Prints ops/s, p50 and p99 per row, the server's time per request (from `INFO
//! commandstats`, summed over every command) and the ratio to the raw row; rows interleaved
//! over rounds, median round reported. `.ci/with-redis cargo bench --features redis --bench redis`
//! (`IDEMKV_BENCH_QUICK=1`: short rows). Writes `target/bench-redis.csv`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idemkv::redis::RedisStore;
use idemkv::{Begin, Fingerprint, IdempotencyStore, Key, Store};

const CALLERS: usize = 16;
const RESPONSE: &[u8] = br#"{"id":"o-1","items":[{"sku":"id-17236","count":1}]}"#;

#[derive(Clone, Copy)]
enum Row {
    Raw,
    /// Index into the Redis stores.
    Backend(usize),
    Embedded,
}

async fn run_row(
    row: Row,
    conn: &redis::aio::ConnectionManager,
    stores: &[RedisStore],
    embedded: &Store,
    dur: Duration,
    tag: &str,
) -> (f64, f64, f64) {
    static N: AtomicU64 = AtomicU64::new(0);
    let until = Instant::now() + dur;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let store = match row {
            Row::Backend(i) => stores[i].clone(),
            _ => stores[0].clone(),
        };
        let (mut conn, store, embedded, tag) =
            (conn.clone(), store, embedded.clone(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let id = format!("{tag}-{c}-{}", N.fetch_add(1, Ordering::Relaxed));
                let t = Instant::now();
                match row {
                    Row::Raw => {
                        let key = format!("bench:raw:{id}");
                        let ok: Option<String> = redis::cmd("SET")
                            .arg(&key)
                            .arg(1)
                            .arg("NX")
                            .arg("PX")
                            .arg(30_000)
                            .query_async(&mut conn)
                            .await
                            .expect("SET NX");
                        assert!(ok.is_some());
                        let _: Option<String> = redis::cmd("SET")
                            .arg(&key)
                            .arg(RESPONSE)
                            .arg("XX")
                            .arg("PX")
                            .arg(86_400_000)
                            .query_async(&mut conn)
                            .await
                            .expect("SET XX");
                    }
                    Row::Backend(_) => {
                        let key = Key::new("bench", &id);
                        let Begin::Acquired(lease) = store
                            .begin(key, Fingerprint::of(b"req"), Duration::from_secs(30))
                            .await
                            .expect("begin")
                        else {
                            panic!("fresh key not acquired")
                        };
                        IdempotencyStore::complete(&store, &lease, RESPONSE, None, &[])
                            .await
                            .expect("complete");
                    }
                    Row::Embedded => {
                        let key = Key::new("bench", &id);
                        let Begin::Acquired(lease) = IdempotencyStore::begin(
                            &embedded,
                            key,
                            Fingerprint::of(b"req"),
                            Duration::from_secs(30),
                        )
                        .await
                        .expect("begin") else {
                            panic!("fresh key not acquired")
                        };
                        IdempotencyStore::complete(&embedded, &lease, RESPONSE, None, &[])
                            .await
                            .expect("complete");
                    }
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    (all.len() as f64 / secs, pct(0.5), pct(0.99))
}

fn median(mut v: Vec<(f64, f64, f64, f64)>) -> (f64, f64, f64, f64) {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v[v.len() / 2]
}

/// The server's busy time so far in the commands the rows send, µs: `usec=` of `INFO
/// commandstats` for `SET`, `EVALSHA`, `EVAL` and `SCRIPT` (a script's own time includes its
/// inner calls, which commandstats also counts apart: those are left out, not counted twice).
async fn server_usec(conn: &redis::aio::ConnectionManager) -> f64 {
    let mut c = conn.clone();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .expect("INFO");
    info.lines()
        .filter(|l| {
            [
                "cmdstat_set:",
                "cmdstat_evalsha:",
                "cmdstat_eval:",
                "cmdstat_script",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .filter_map(|l| {
            l.split("usec=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

fn main() {
    let Ok(url) = std::env::var("IDEMKV_REDIS_URL") else {
        eprintln!("set IDEMKV_REDIS_URL (or run under .ci/with-redis)");
        std::process::exit(2);
    };
    let quick = std::env::var("IDEMKV_BENCH_QUICK").is_ok_and(|v| v != "0");
    let (dur, rounds) = if quick {
        (Duration::from_millis(700), 1)
    } else {
        (Duration::from_secs(3), 3)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).expect("url");
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .expect("connect");
        let store = RedisStore::builder(&url)
            .prefix("bench:idemkv:")
            .connect()
            .await
            .expect("store");
        let client_clock = RedisStore::builder(&url)
            .prefix("bench:idemkv:")
            .client_clock(Duration::from_millis(50))
            .connect()
            .await
            .expect("store");
        let stores = [store, client_clock];
        let embedded = Store::in_memory();
        let rows = [
            ("raw SET NX + SET XX", Row::Raw),
            ("RedisStore begin+complete", Row::Backend(0)),
            ("... with client_clock", Row::Backend(1)),
            ("embedded begin+complete", Row::Embedded),
        ];
        let mut results: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); rows.len()];
        for round in 0..rounds {
            for (i, (name, row)) in rows.iter().enumerate() {
                let busy = server_usec(&conn).await;
                let (ops, p50, p99) =
                    run_row(*row, &conn, &stores, &embedded, dur, &format!("r{round}")).await;
                let per = (server_usec(&conn).await - busy) / (ops * dur.as_secs_f64()).max(1.0);
                eprintln!("round {round}: {name}: {ops:.0} ops/s, server {per:.1} µs/request");
                results[i].push((ops, p50, p99, per));
            }
        }
        let base = median(results[0].clone()).0;
        let mut csv =
            String::from("row,ops_per_s,p50_us,p99_us,server_us_per_request,ratio_to_raw\n");
        println!(
            "\n{CALLERS} concurrent callers, 2 round trips per request, median of {rounds} round(s)"
        );
        println!(
            "{:<28} {:>10} {:>9} {:>9} {:>10} {:>8}",
            "row", "ops/s", "p50 µs", "p99 µs", "server µs", "vs raw"
        );
        for (i, (name, _)) in rows.iter().enumerate() {
            let (ops, p50, p99, per) = median(results[i].clone());
            println!(
                "{name:<28} {ops:>10.0} {p50:>9.0} {p99:>9.0} {per:>10.1} {:>8.2}",
                ops / base
            );
            csv.push_str(&format!(
                "{name},{ops:.0},{p50:.0},{p99:.0},{per:.2},{:.3}\n",
                ops / base
            ));
        }
        let _ = std::fs::write("target/bench-redis.csv", csv);
        // Leave the server as we found it.
        let mut c = conn.clone();
        let _: () = redis::cmd("FLUSHDB")
            .query_async(&mut c)
            .await
            .unwrap_or(());
    });
}
