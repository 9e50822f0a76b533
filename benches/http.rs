//! The HTTP layer's cost, over loopback: the same axum handler (a) without the layer, (b) with
//! the Idempotency-Key layer on fresh keys in each durability mode, (c) with the layer on
//! replays; (d) a realistic handler (a JSON parse and about 200 µs of computation, calibrated at
//! start) without and with the layer (fresh keys, `Batched`); the same keep-alive load generator
//! and connection count for every row, rows interleaved over rounds. Each row's ratio is to its
//! own baseline: the trivial handler without the layer, or the realistic one without it; the
//! keyed rows also against `no layer, keyed` (the same requests, key header and the load
//! generator's key formatting included, to the server without the layer).
//!
//! Then the same routers called in process, without sockets or a load generator: the layer's
//! own cost per request (µs of one core) and its heap allocations per request, against the
//! bare router.
//!
//! `cargo bench --bench http` (`IDEMKV_BENCH_QUICK=1`: shorter rows; `IDEMKV_BENCH_ONLY` with a
//! row's name runs that row alone for 10 s, with "in process" only the in-process rows).

use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use idemkv::http::IdempotencyLayer;
use idemkv::{Durability, Store};

#[path = "support/cpu.rs"]
mod cpu;
#[path = "support/timed.rs"]
mod timed;

const CONNECTIONS: usize = 16;

/// Counts heap allocations made on the thread that turned counting on (the in-process rows run
/// on the bench's own thread, so the idle servers' workers are not counted).
struct Counting;
thread_local! {
    static COUNT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}
fn counted() {
    // `try_with`: an allocation during thread teardown must not panic.
    let _ = COUNT.try_with(|c| c.set(c.get().map(|n| n + 1)));
}
// SAFETY: every call is forwarded unchanged to the system allocator; the counter is bookkeeping
// in a const-initialised thread local, which never allocates.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        counted();
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        counted();
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.realloc(p, l, new) }
    }
}
#[global_allocator]
static ALLOC: Counting = Counting;

/// The Idempotency-Key of request `i` on connection `conn` (`None`: no header).
type KeyFn = Arc<dyn Fn(usize, u64) -> Option<String> + Send + Sync>;
const BODY: &str = r#"{"items":[{"sku":"id-17236","count":1}]}"#;

async fn create(body: axum::body::Bytes) -> (StatusCode, String) {
    let n = body.len();
    (
        StatusCode::CREATED,
        format!("{{\"id\":\"{}\",\"bytes\":{n}}}", uuid_like()),
    )
}

#[derive(serde::Deserialize)]
struct Order {
    items: Vec<Item>,
}

#[derive(serde::Deserialize)]
struct Item {
    sku: String,
    count: u32,
}

/// Rounds of [`work`] that take about 200 µs on this machine, measured once at start.
static WORK_ROUNDS: AtomicU64 = AtomicU64::new(1);

/// The realistic handler's computation: `rounds` of hashing the order (a stand-in for pricing,
/// validation and the like, which a real handler does between parsing and answering).
fn work(order: &Order, rounds: u64) -> u64 {
    let mut acc = 0u64;
    for r in 0..rounds {
        for item in &order.items {
            acc = acc.wrapping_add(fnv1a(item.sku.as_bytes(), r ^ u64::from(item.count)));
        }
    }
    acc
}

/// A small keyed hash (FNV-1a), so the bench needs no hashing crate of its own.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn calibrate() {
    let order: Order = serde_json::from_str(BODY).expect("body");
    let mut rounds = 1_000u64;
    loop {
        let t = Instant::now();
        std::hint::black_box(work(&order, rounds));
        let took = t.elapsed();
        if took >= Duration::from_millis(20) {
            let per_200us = rounds as f64 * 200.0 / took.as_micros() as f64;
            WORK_ROUNDS.store(per_200us.max(1.0) as u64, Ordering::Relaxed);
            return;
        }
        rounds *= 2;
    }
}

async fn realistic(body: axum::body::Bytes) -> (StatusCode, String) {
    let Ok(order) = serde_json::from_slice::<Order>(&body) else {
        return (StatusCode::BAD_REQUEST, String::new());
    };
    let total = work(&order, WORK_ROUNDS.load(Ordering::Relaxed));
    (
        StatusCode::CREATED,
        format!("{{\"id\":\"{}\",\"check\":{total}}}", uuid_like()),
    )
}

fn uuid_like() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{:032x}", N.fetch_add(1, Ordering::Relaxed))
}

fn serve(rt: &tokio::runtime::Runtime, router: Router) -> SocketAddr {
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        addr
    })
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns its status.
fn read_response(r: &mut BufReader<TcpStream>) -> Option<u16> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let status = line.split(' ').nth(1)?.parse().ok()?;
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some(status)
}

/// One row's run: requests/s, p50 and p99 in µs, and the process's CPU µs per request (the
/// server's, the client's and the kernel's work for it, all on this machine).
#[derive(Clone, Copy)]
struct Run {
    rps: f64,
    p50: f64,
    p99: f64,
    cpu_us: f64,
}

/// `CONNECTIONS` keep-alive connections sending POST /orders for `dur`; `key(conn, i)` gives
/// the Idempotency-Key of request `i` on connection `conn` (`None`: no header).
fn load(addr: SocketAddr, dur: Duration, key: KeyFn) -> Run {
    let (cpu0, t0) = (cpu::cpu_seconds(), Instant::now());
    let (rps, p50, p99) = load_for(addr, dur, key);
    let requests = rps * t0.elapsed().as_secs_f64();
    let cpu_us = (cpu::cpu_seconds() - cpu0) * 1e6 / requests.max(1.0);
    Run {
        rps,
        p50,
        p99,
        cpu_us,
    }
}

fn load_for(addr: SocketAddr, dur: Duration, key: KeyFn) -> (f64, f64, f64) {
    timed::run_for(CONNECTIONS, dur, move |c, stop| {
        let mut lat = Vec::new();
        let Ok(stream) = TcpStream::connect(addr) else {
            return lat;
        };
        let _ = stream.set_nodelay(true);
        let mut w = stream.try_clone().expect("clone");
        let mut r = BufReader::new(stream);
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let k = key(c, i)
                .map(|k| format!("Idempotency-Key: {k}\r\n"))
                .unwrap_or_default();
            let req = format!(
                "POST /orders HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{k}Content-Length: {}\r\n\r\n{BODY}",
                BODY.len()
            );
            let t = Instant::now();
            if w.write_all(req.as_bytes()).is_err() {
                break;
            }
            match read_response(&mut r) {
                Some(201) => lat.push(t.elapsed()),
                Some(s) => panic!("unexpected status {s}"),
                None => break,
            }
            i += 1;
        }
        lat
    })
}

/// `n` requests through `router`, awaited one at a time on this task: µs per request, and the
/// heap allocations (and reallocations) per request made while the router ran (building the
/// request and reading the response out are not counted).
async fn in_process(router: Router, key: &KeyFn, n: u64) -> (f64, f64) {
    use tower::ServiceExt as _;
    let mut allocations = 0;
    let start = Instant::now();
    for i in 0..n {
        let mut req =
            axum::http::Request::post("/orders").header("content-type", "application/json");
        if let Some(k) = key(0, i) {
            req = req.header("idempotency-key", k);
        }
        let req = req.body(axum::body::Body::from(BODY)).expect("request");
        COUNT.with(|c| c.set(Some(0)));
        let res = router.clone().oneshot(req).await.expect("infallible");
        allocations += COUNT.with(|c| c.take()).unwrap_or(0);
        assert_eq!(res.status(), StatusCode::CREATED);
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .expect("body");
        std::hint::black_box(body);
    }
    (
        start.elapsed().as_secs_f64() * 1e6 / n as f64,
        allocations as f64 / n as f64,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var_os("IDEMKV_BENCH_QUICK").is_some();
    let (dur, rounds) = if quick {
        (Duration::from_millis(700), 3)
    } else {
        (Duration::from_secs(3), 3)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let store = |d: Durability, i: usize| {
        let _guard = rt.enter();
        Store::builder()
            .durability(d)
            .open(dirs[i].path())
            .expect("open")
    };
    calibrate();
    let plain = serve(&rt, Router::new().route("/orders", post(create)));
    let real_plain = serve(&rt, Router::new().route("/orders", post(realistic)));
    let real_batched = serve(
        &rt,
        Router::new()
            .route("/orders", post(realistic))
            .layer(IdempotencyLayer::new(store(
                Durability::Batched {
                    max_delay: Duration::from_millis(10),
                },
                2,
            ))),
    );
    let with = |s: Store| {
        serve(
            &rt,
            Router::new()
                .route("/orders", post(create))
                .layer(IdempotencyLayer::new(s)),
        )
    };
    let mem = with(Store::in_memory());
    let batched = with(store(
        Durability::Batched {
            max_delay: Duration::from_millis(10),
        },
        0,
    ));
    let immediate = with(store(Durability::Immediate, 1));
    let replay_store = Store::in_memory();
    let replay = with(replay_store.clone());
    // Complete a fixed set of keys once, to replay them.
    let replay_keys: u64 = 2_000;
    load(replay, Duration::from_millis(1), Arc::new(|_, _| None)); // warm
    for c in 0..CONNECTIONS {
        let addr = replay;
        let mut s = TcpStream::connect(addr).expect("connect");
        for i in 0..replay_keys / CONNECTIONS as u64 {
            let req = format!(
                "POST /orders HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nIdempotency-Key: r-{c}-{i}\r\nContent-Length: {}\r\n\r\n{BODY}",
                BODY.len()
            );
            s.write_all(req.as_bytes()).expect("write");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            read_response(&mut r).expect("response");
        }
    }
    let fresh = |tag: &'static str| -> KeyFn {
        Arc::new(move |c, i| Some(format!("{tag}-{c}-{i}-{}", uuid_like())))
    };
    let per_conn = replay_keys / CONNECTIONS as u64;
    let systems: Vec<(&str, SocketAddr, KeyFn)> = vec![
        ("no layer", plain, Arc::new(|_, _| None)),
        ("no layer, keyed", plain, fresh("n")),
        ("fresh, memory", mem, fresh("m")),
        ("fresh, batched", batched, fresh("b")),
        ("fresh, immediate", immediate, fresh("i")),
        (
            "replays",
            replay,
            Arc::new(move |c, i| Some(format!("r-{c}-{}", i % per_conn))),
        ),
        ("realistic, none", real_plain, fresh("rn")),
        ("realistic, batched", real_batched, fresh("rb")),
    ];
    // The row each row is compared with: the trivial handler bare, or the realistic one bare.
    // Rows with a key header are also given against "no layer, keyed": the same requests,
    // headers and key generation included, to a server without the layer.
    let baseline_of = |name: &str| usize::from(name.starts_with("realistic")) * 6;
    // `IDEMKV_BENCH_ONLY="fresh, batched"` runs one row alone for 10 s (for profiling).
    let only = std::env::var("IDEMKV_BENCH_ONLY").ok();
    let in_process_only = only.as_deref() == Some("in process");
    if let Some(only) = only.filter(|_| !in_process_only) {
        if let Some((name, addr, key)) = systems.iter().find(|s| s.0 == only) {
            let r = load(*addr, Duration::from_secs(10), Arc::clone(key));
            println!(
                "{name}: {:.0} req/s, p50 {:.0} us, p99 {:.0} us, {:.1} CPU us/request",
                r.rps, r.p50, r.p99, r.cpu_us
            );
        }
        return;
    }
    let mut csv = String::from(
        "variant,req_per_sec,p50_us,p99_us,ratio_to_its_baseline,cpu_us_per_request\n",
    );
    // `IDEMKV_BENCH_ONLY="in process"`: only the in-process rows (for profiling).
    if !in_process_only {
        let mut results: Vec<Vec<Run>> = vec![Vec::new(); systems.len()];
        for round in 0..rounds {
            for j in 0..systems.len() {
                let k = (round + j) % systems.len();
                let (_, addr, key) = &systems[k];
                results[k].push(load(*addr, dur, Arc::clone(key)));
            }
        }
        let bases: Vec<f64> = (0..systems.len())
            .map(|k| {
                median(
                    results[baseline_of(systems[k].0)]
                        .iter()
                        .map(|r| r.rps)
                        .collect(),
                )
            })
            .collect();
        println!(
            "\nPOST /orders over loopback, {CONNECTIONS} keep-alive connections, median of {rounds} interleaved rounds"
        );
        println!(
            "{:<18} {:>10} {:>9} {:>9} {:>10} {:>12}",
            "variant", "req/s", "p50 us", "p99 us", "vs none", "CPU us/req"
        );
        let rounds_per_req = WORK_ROUNDS.load(Ordering::Relaxed);
        for (k, (name, _, _)) in systems.iter().enumerate() {
            let rps = median(results[k].iter().map(|r| r.rps).collect());
            let p50 = median(results[k].iter().map(|r| r.p50).collect());
            let p99 = median(results[k].iter().map(|r| r.p99).collect());
            let cpu = median(results[k].iter().map(|r| r.cpu_us).collect());
            let base = bases[k];
            println!(
                "{name:<18} {rps:>10.0} {p50:>9.0} {p99:>9.0} {:>10.2} {cpu:>12.1}",
                rps / base
            );
            csv.push_str(&format!(
                "{name},{rps:.0},{p50:.0},{p99:.0},{:.3},{cpu:.2}\n",
                rps / base
            ));
        }
        let keyed = median(results[1].iter().map(|r| r.rps).collect());
        for (k, (name, _, _)) in systems.iter().enumerate() {
            if name.starts_with("fresh") || *name == "replays" {
                let rps = median(results[k].iter().map(|r| r.rps).collect());
                println!("{name:<18} vs \"no layer, keyed\": {:.2}", rps / keyed);
                csv.push_str(&format!("# {name} vs no layer keyed,{:.3}\n", rps / keyed));
            }
        }
        println!(
            "(realistic rows: compared with \"realistic, none\"; the handler parses the JSON body and \
             computes for about 200 us, {rounds_per_req} rounds; target: the layer costs <= 5 %, ratio >= 0.95)"
        );
    }
    // In process: the routers as services, one request at a time.
    let n = if quick { 20_000 } else { 100_000 };
    let routed = |store: Option<Store>, handler_realistic: bool| {
        let route = if handler_realistic {
            post(realistic)
        } else {
            post(create)
        };
        let router = Router::new().route("/orders", route);
        match store {
            Some(s) => router.layer(IdempotencyLayer::new(s)),
            None => router,
        }
    };
    let replayed = Store::in_memory();
    let in_rows: Vec<(&str, Router, KeyFn)> = vec![
        ("bare router", routed(None, false), fresh("pn")),
        (
            "layer, fresh, memory",
            routed(Some(Store::in_memory()), false),
            fresh("pm"),
        ),
        (
            "layer, replays",
            routed(Some(replayed.clone()), false),
            Arc::new(|_, i| Some(format!("pr-{}", i % 1000))),
        ),
    ];
    println!("\nin process, {n} requests one at a time (µs per request, one core)");
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); in_rows.len()];
    let mut allocs = vec![0.0; in_rows.len()];
    for round in 0..rounds {
        for j in 0..in_rows.len() {
            let k = (round + j) % in_rows.len();
            let (_, router, key) = &in_rows[k];
            let (us, a) = rt.block_on(in_process(router.clone(), key, n));
            per[k].push(us);
            allocs[k] = a;
        }
    }
    let bare_us = median(per[0].clone());
    for (k, (name, _, _)) in in_rows.iter().enumerate() {
        let us = median(per[k].clone());
        println!(
            "{name:<22} {us:>8.2} us  (+{:.2} us over the bare router), {:.1} allocations",
            us - bare_us,
            allocs[k]
        );
        csv.push_str(&format!("# in process {name} us per request,{us:.3}\n"));
        csv.push_str(&format!(
            "# in process {name} allocations per request,{:.1}\n",
            allocs[k]
        ));
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-http.csv");
    match std::fs::write(&path, csv) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
    drop(replay_store);
}
