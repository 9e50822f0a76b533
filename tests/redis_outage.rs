//! Redis going away and coming back, under the HTTP layer: typed errors, 503 problem+json with
//! no handler run, and a reconnect on its own. The test runs a `redis-server` of its own on a
//! free loopback port (so it can stop it): it needs `redis-server` on `PATH`, is skipped
//! loudly without it, and must run under `CI=true`.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_a_typed_error_and_a_503_and_the_store_reconnects() {
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
        eprintln!("SKIPPED: no redis-server on PATH; the outage test did not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut server, output) = start_redis(port, dir.path());
    let store = RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
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
