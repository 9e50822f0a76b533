//! Redis going away and coming back, under the HTTP layer: typed errors, 503 problem+json with
//! no handler run, and a reconnect on its own. Then an answer lost on the way back, through a
//! loopback proxy that drops it: a script that ran but whose answer never arrived is an
//! `Unavailable` (the outcome is unknown), never an answer from a second run of it. And a
//! server set to evict keys under memory pressure, refused at `connect` unless allowed. The tests
//! run a `redis-server` of their own on a free loopback port (so they can stop it): they need
//! `redis-server` on `PATH`, are skipped loudly without it, and must run under `CI=true`.
#![cfg(all(feature = "http", feature = "redis", not(loom)))]
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use idemkv::http::IdempotencyLayer;
use idemkv::redis::RedisStore;
use idemkv::{Error, Fingerprint, IdempotencyStore, Key};
use tower::{ServiceBuilder, ServiceExt};

#[path = "support/child.rs"]
mod child;
#[path = "support/redis.rs"]
mod redis_support;
use child::{Stderr, sigkill};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server this test stops and starts, its output kept for when it dies on its own.
fn start_redis(port: u16, dir: &std::path::Path) -> (Child, Stderr) {
    let mut child = redis_support::spawn(port, dir);
    let output = Stderr::capture(&mut child, "redis-server");
    let until = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "redis-server exited ({status}); its output:\n{}",
                output.text()
            );
        }
        assert!(
            Instant::now() < until,
            "redis-server did not start:\n{}",
            output.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, output)
}

fn post(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

/// Whether `redis-server` is on `PATH`; without it the test is skipped, loudly, and under
/// `CI=true` it fails instead.
fn redis_installed(test: &str) -> bool {
    let installed = Command::new("redis-server")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true: this test needs redis-server on PATH"
        );
        eprintln!("SKIPPED: no redis-server on PATH; {test} did not run");
    }
    installed
}

/// A store on the server (or proxy) at `port`, with a short command timeout.
async fn store_at(port: u16) -> RedisStore {
    RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_a_typed_error_and_a_503_and_the_store_reconnects() {
    if !redis_installed("the outage test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut server, output) = start_redis(port, dir.path());
    let store = store_at(port).await;
    let runs = Arc::new(AtomicU64::new(0));
    let counted = runs.clone();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()))
        .service(tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let runs = counted.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"created"))))
            }
        }));
    let res = svc.clone().oneshot(post("before")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // The server goes away.
    // It must still be running until this kill: one that died on its own fails here.
    sigkill(&mut server, &output, "redis-server");
    let err = store
        .begin(
            Key::new("s", "k"),
            Fingerprint::of(b"x"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    let res = svc.clone().oneshot(post("during")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("unavailable"),
        "{body:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "no handler runs without a lease"
    );

    // It comes back on the same port: the store reconnects by itself.
    let (mut server, output) = start_redis(port, dir.path());
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let res = svc.clone().oneshot(post("after")).await.unwrap();
        if res.status() == StatusCode::OK {
            break;
        }
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < until, "no reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // It must still be running until this kill: one that died on its own fails here.
    sigkill(&mut server, &output, "redis-server");
}

/// A loopback TCP proxy in front of a Redis server that forwards everything, except that once
/// armed, the next connection to send an `EVALSHA` (a script: every change the store makes) has
/// its next answer swallowed and is closed: the script ran, its answer is lost. Other
/// connections (the notifier's, say) are never touched.
struct LosingProxy {
    port: u16,
    armed: Arc<std::sync::atomic::AtomicBool>,
    /// Answers swallowed so far.
    lost: Arc<AtomicU64>,
}

impl LosingProxy {
    async fn start(upstream: u16) -> LosingProxy {
        use std::sync::atomic::AtomicBool;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicU64::new(0));
        let (armed2, lost2) = (armed.clone(), lost.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                // This connection's next answer is to be lost.
                let doomed = Arc::new(AtomicBool::new(false));
                let (armed, marked) = (armed2.clone(), doomed.clone());
                // Client to server: as it comes; a script sent while armed dooms its answer.
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let script = buf[..n].windows(7).any(|w| w == b"EVALSHA");
                        if script && armed.swap(false, Ordering::SeqCst) {
                            marked.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                // Server to client: as it comes, unless this connection is doomed.
                let lost = lost2.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if doomed.load(Ordering::SeqCst) {
                            lost.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // Dropping the halves closes the client's connection.
                    let _ = cw.shutdown().await;
                });
            }
        });
        LosingProxy { port, armed, lost }
    }

    /// Swallows the answer to the next script sent.
    fn lose_next_answer(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_unavailable_and_never_an_answer_from_a_second_run() {
    if !redis_installed("the lost-answer test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut server, output) = start_redis(port, dir.path());
    let proxy = LosingProxy::start(port).await;
    let store = store_at(proxy.port).await;
    // Straight to the server, to see what really happened.
    let direct = store_at(port).await;
    let fp = Fingerprint::of(b"POST /orders {}");
    let lease = Duration::from_secs(30);
    // Retries of the same call, as a caller makes them, until the proxied store is back.
    async fn again<T>(mut call: impl AsyncFnMut() -> Result<T, Error>) -> T {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match call().await {
                Ok(v) => return v,
                Err(Error::Unavailable { .. }) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }

    // Each script runs once first, so that the answer lost below is the script's own, not the
    // `NOSCRIPT` that makes the store load it (the checks on `direct` would catch that).
    let warm = Key::new("orders", "warm-up");
    let idemkv::Begin::Acquired(l) = store.begin(warm, fp, lease).await.unwrap() else {
        panic!("a fresh key is acquired");
    };
    store.complete(&l, b"ok", None, &[]).await.unwrap();
    let warm_put =
        idemkv::Write::put_if_absent(Key::new("orders", "warm-put").to_owned(), b"v".to_vec());
    let _ = store.cas(&warm_put).await.unwrap();

    // A begin whose answer is lost: the lease was taken, the caller cannot know.
    let key = Key::new("orders", "lost-begin");
    proxy.lose_next_answer();
    let err = store.begin(key, fp, lease).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert_eq!(proxy.lost.load(Ordering::SeqCst), 1, "no answer was lost");
    assert!(
        matches!(
            direct.get(key).await.unwrap(),
            Some(idemkv::Snapshot::InFlight { .. })
        ),
        "the lost begin did not run: the test lost some other answer"
    );
    // The retry sees the first attempt's lease: a second run would have acquired nothing new
    // either, but it must not look like the caller's own fresh lease.
    let retried = again(async || store.begin(key, fp, lease).await).await;
    assert!(
        matches!(retried, idemkv::Begin::InProgress { .. }),
        "{retried:?}"
    );

    // A completion whose answer is lost: it happened, and the retry of the request replays it.
    let key = Key::new("orders", "lost-complete");
    let idemkv::Begin::Acquired(held) = again(async || store.begin(key, fp, lease).await).await
    else {
        panic!("a fresh key is acquired");
    };
    proxy.lose_next_answer();
    let err = store
        .complete(&held, b"201 order o-1", Some(Duration::from_secs(60)), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert_eq!(proxy.lost.load(Ordering::SeqCst), 2, "no answer was lost");
    assert!(
        matches!(
            direct.get(key).await.unwrap(),
            Some(idemkv::Snapshot::Completed(_))
        ),
        "the lost completion did not run: the test lost some other answer"
    );
    match again(async || store.begin(key, fp, lease).await).await {
        idemkv::Begin::Completed(done) => assert_eq!(done.response, b"201 order o-1"),
        other => panic!("the retry must replay the recorded response: {other:?}"),
    }

    // A value write whose answer is lost: written once, and the caller is told nothing.
    let key = Key::new("orders", "lost-put");
    let put = idemkv::Write::put_if_absent(key.to_owned(), b"v1".to_vec());
    proxy.lose_next_answer();
    let err = store.cas(&put).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert_eq!(proxy.lost.load(Ordering::SeqCst), 3, "no answer was lost");
    assert!(
        direct.get(key).await.unwrap().is_some(),
        "the lost write did not run: the test lost some other answer"
    );
    // It must still be running until this kill: one that died on its own fails here.
    sigkill(&mut server, &output, "redis-server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_may_evict_keys_is_refused_unless_allowed() {
    if !redis_installed("the eviction test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut server, output) = start_redis(port, dir.path());
    let url = format!("redis://127.0.0.1:{port}");
    let mut admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let set = async |admin: &mut redis::aio::MultiplexedConnection, name: &str, value: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(admin)
            .await
            .unwrap();
    };
    // No memory limit: nothing is ever evicted, whatever the policy.
    set(&mut admin, "maxmemory-policy", "allkeys-lru").await;
    store_at(port).await;
    // A limit and an evicting policy (`volatile-lru` too: every record has an expiry).
    set(&mut admin, "maxmemory", "1gb").await;
    for policy in ["allkeys-lru", "volatile-lru", "volatile-ttl"] {
        set(&mut admin, "maxmemory-policy", policy).await;
        let reason =
            redis_support::refused_for_eviction(RedisStore::builder(url.as_str()), policy).await;
        assert!(reason.contains(policy), "{reason}");
        assert!(reason.contains("allow_eviction"), "{reason}");
    }
    // A limit without eviction: a full server refuses writes instead (errors, not losses).
    set(&mut admin, "maxmemory-policy", "noeviction").await;
    store_at(port).await;
    // It must still be running until this kill: one that died on its own fails here.
    sigkill(&mut server, &output, "redis-server");
}
