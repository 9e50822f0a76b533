//! The HTTP layers, driven through tower: replay, conflicts, waiting, mismatch, malformed keys,
//! scope isolation, what is kept, panics, limits, takeover, and echoed headers.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use idemkv::http::{EchoLayer, IdempotencyInfo, IdempotencyLayer};
use idemkv::{Begin, Fingerprint, IdempotencyStore, Key, Store};
use tower::{Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

/// A handler that counts its runs, sleeps `work`, and answers 201 with two cookies.
#[derive(Clone)]
struct Orders {
    runs: Arc<AtomicU64>,
    work: Duration,
    status: StatusCode,
    body_len: usize,
}

impl Orders {
    fn new() -> Self {
        Orders {
            runs: Arc::default(),
            work: Duration::ZERO,
            status: StatusCode::CREATED,
            body_len: 0,
        }
    }
    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }
    fn service(
        &self,
    ) -> impl Service<Req, Response = Res, Error = Infallible, Future = impl Send> + Clone + Send + 'static
    {
        let me = self.clone();
        tower::service_fn(move |req: Req| {
            let me = me.clone();
            async move {
                let n = me.runs.fetch_add(1, Ordering::SeqCst) + 1;
                if req.uri().path() == "/panic" {
                    panic!("handler panicked");
                }
                let takeover = req
                    .extensions()
                    .get::<IdempotencyInfo>()
                    .is_some_and(|i| i.takeover);
                tokio::time::sleep(me.work).await;
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let mut text = format!("order-{n} for {} bytes, takeover={takeover}", body.len());
                text.push_str(&"x".repeat(me.body_len));
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(me.status)
                        .header("x-order", format!("o-{n}"))
                        .header("set-cookie", "a=1")
                        .header("link", "</a>; rel=next")
                        .header("set-cookie", "b=2")
                        .header("link", "</b>; rel=prev")
                        .body(Full::new(Bytes::from(text)))
                        .expect("response"),
                )
            }
        })
    }
}

fn post(key: Option<&str>, body: &str) -> Req {
    let mut b = Request::post("/orders").header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from(body.to_owned())))
        .expect("request")
}

async fn body(res: Res) -> (StatusCode, http::HeaderMap, Bytes) {
    let (p, b) = res.into_parts();
    (
        p.status,
        p.headers,
        b.collect().await.expect("body").to_bytes(),
    )
}

async fn send<S>(svc: &S, req: Req) -> (StatusCode, http::HeaderMap, Bytes)
where
    S: Service<Req, Response = Res> + Clone,
    S::Error: std::fmt::Debug,
{
    body(svc.clone().oneshot(req).await.expect("service")).await
}

#[tokio::test]
async fn a_repeat_replays_the_stored_response_exactly() {
    repeat_replays(Store::in_memory(), "").await;
}

async fn repeat_replays<St: IdempotencyStore + Clone>(store: St, p: &str) {
    let orders = Orders::new();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store))
        .service(orders.service());
    let key = format!("{p}k-1");
    let (s1, h1, b1) = send(&svc, post(Some(&key), "{\"items\":[1]}")).await;
    let (s2, h2, b2) = send(&svc, post(Some(&key), "{\"items\":[1]}")).await;
    assert_eq!(s1, StatusCode::CREATED);
    assert_eq!((s1, &b1), (s2, &b2));
    assert_eq!(h1.get("x-order"), h2.get("x-order"));
    // Multi-valued headers replay in order; the first client's cookies go to it alone.
    let links: Vec<_> = h2.get_all("link").iter().collect();
    assert_eq!(links, ["</a>; rel=next", "</b>; rel=prev"]);
    let cookies: Vec<_> = h1.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert!(h2.get("set-cookie").is_none(), "{h2:?}");
    assert_eq!(h1["idempotency-ttl"], "86400");
    assert_eq!(h2["idempotency-ttl"], "86400");
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(orders.runs(), 1);
    // The IETF draft's quoted form names the same key.
    let quoted = format!("\"{key}\"");
    let (_, h3, b3) = send(&svc, post(Some(&quoted), "{\"items\":[1]}")).await;
    assert_eq!(b3, b1);
    assert_eq!(h3["idempotent-replayed"], "true");
    assert_eq!(orders.runs(), 1);
}

#[tokio::test]
async fn concurrent_duplicates_run_once_and_get_409_or_wait_for_the_replay() {
    concurrent_duplicates(Store::in_memory(), "").await;
}

async fn concurrent_duplicates<St: IdempotencyStore + Clone>(store: St, p: &str) {
    let mut orders = Orders::new();
    orders.work = Duration::from_millis(300);
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store))
        .service(orders.service());
    let key = format!("{p}dup");
    let first = tokio::spawn({
        let (svc, key) = (svc.clone(), key.clone());
        async move { send(&svc, post(Some(&key), "same")).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, h, b) = send(&svc, post(Some(&key), "same")).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(h["content-type"], "application/problem+json");
    let retry: u64 = h["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    assert!(String::from_utf8_lossy(&b).contains("in-progress"));
    let mut waiting = post(Some(&key), "same");
    waiting
        .headers_mut()
        .insert("prefer", "wait=10".parse().expect("value"));
    let (s, h, b) = send(&svc, waiting).await;
    let (s0, _, b0) = first.await.expect("first");
    assert_eq!((s, &b), (s0, &b0));
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(orders.runs(), 1);
}

#[tokio::test]
async fn same_key_other_payload_is_422_and_bad_keys_are_400() {
    let orders = Orders::new();
    let layer = IdempotencyLayer::new(Store::in_memory());
    let svc = ServiceBuilder::new().layer(layer).service(orders.service());
    assert_eq!(
        send(&svc, post(Some("k"), "a")).await.0,
        StatusCode::CREATED
    );
    let (s, h, b) = send(&svc, post(Some("k"), "b")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(h["content-type"], "application/problem+json");
    assert!(String::from_utf8_lossy(&b).contains("key-reused"));
    for bad in [&"x".repeat(256)[..], "has space", "\"\""] {
        let (s, _, b) = send(&svc, post(Some(bad), "a")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(String::from_utf8_lossy(&b).contains("invalid-key"));
    }
    let mut two = post(Some("k2"), "a");
    two.headers_mut()
        .append("idempotency-key", "k3".parse().expect("value"));
    assert_eq!(send(&svc, two).await.0, StatusCode::BAD_REQUEST);
    // No key: passes through, runs every time.
    let before = orders.runs();
    send(&svc, post(None, "a")).await;
    send(&svc, post(None, "a")).await;
    assert_eq!(orders.runs(), before + 2);
    // Other methods are not touched.
    let get = Request::get("/orders")
        .header("idempotency-key", "k")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert_eq!(send(&svc, get).await.0, StatusCode::CREATED);
    // Required keys, UUID keys.
    let strict = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(Store::in_memory())
                .require_key(true)
                .uuid_keys(true),
        )
        .service(orders.service());
    let (s, _, b) = send(&strict, post(None, "a")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&b).contains("missing-key"));
    assert_eq!(
        send(&strict, post(Some("not-a-uuid"), "a")).await.0,
        StatusCode::BAD_REQUEST
    );
    let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    assert_eq!(
        send(&strict, post(Some(uuid), "a")).await.0,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn another_client_never_receives_the_first_clients_response() {
    let orders = Orders::new();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(Store::in_memory()))
        .service(orders.service());
    let as_client = |who: &str| {
        let mut r = post(Some("shared-key"), "same");
        r.headers_mut().insert(
            "authorization",
            format!("Bearer {who}").parse().expect("value"),
        );
        r
    };
    let (_, _, alice) = send(&svc, as_client("alice")).await;
    let (_, h, bob) = send(&svc, as_client("bob")).await;
    assert_ne!(alice, bob);
    assert!(h.get("idempotent-replayed").is_none());
    let (_, h, alice2) = send(&svc, as_client("alice")).await;
    assert_eq!(alice2, alice);
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(orders.runs(), 2);
}

#[tokio::test]
async fn server_errors_and_panics_release_the_key_for_a_retry() {
    let mut failing = Orders::new();
    failing.status = StatusCode::SERVICE_UNAVAILABLE;
    let store = Store::in_memory();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()))
        .service(failing.service());
    send(&svc, post(Some("k"), "a")).await;
    send(&svc, post(Some("k"), "a")).await;
    assert_eq!(failing.runs(), 2, "a 503 is not kept: the retry runs again");

    let orders = Orders::new();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()))
        .service(orders.service());
    let panicking = Request::post("/panic")
        .header("idempotency-key", "p")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let joined = tokio::spawn({
        let svc = svc.clone();
        async move { svc.oneshot(panicking).await }
    })
    .await;
    assert!(joined.is_err(), "the handler panicked");
    // The release is spawned when the panic unwinds; give it a moment to land.
    for _ in 0..100 {
        if store.stats().records == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let retry = Request::post("/panic")
        .header("idempotency-key", "p")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let _ = tokio::spawn(async move { svc.oneshot(retry).await }).await;
    assert_eq!(orders.runs(), 2, "after a panic the retry runs again");
}

#[tokio::test]
async fn limits_413_and_responses_too_large_to_keep() {
    let mut orders = Orders::new();
    orders.body_len = 5000;
    let svc = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(Store::in_memory())
                .max_body(100)
                .max_stored_response(1000),
        )
        .service(orders.service());
    let (s, _, b) = send(&svc, post(Some("big-req"), &"y".repeat(101))).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&b).contains("body-too-large"));
    assert_eq!(orders.runs(), 0);
    let (s, _, b) = send(&svc, post(Some("big-res"), "small")).await;
    assert_eq!((s, b.len() > 5000), (StatusCode::CREATED, true));
    let (s, h, b) = send(&svc, post(Some("big-res"), "small")).await;
    assert_eq!(s, StatusCode::GONE);
    assert_eq!(h["idempotency-original-status"], "201");
    assert_eq!(h["idempotent-replayed"], "true");
    assert!(String::from_utf8_lossy(&b).contains("response-too-large"));
    assert_eq!(orders.runs(), 1, "recorded as done, never run again");
}

#[tokio::test]
async fn a_dead_holder_is_taken_over_after_its_lease_and_the_handler_knows() {
    let orders = Orders::new();
    let store = Store::in_memory();
    // Fixed scope and fingerprint, so the test can play a process that died holding the key.
    let layer = IdempotencyLayer::new(store.clone())
        .scope_with(|_| b"orders".to_vec())
        .fingerprint_with(|_, body| Fingerprint::of(body));
    let svc = ServiceBuilder::new().layer(layer).service(orders.service());
    let fp = Fingerprint::of(b"payload");
    assert!(matches!(
        store
            .blocking_begin(Key::new("orders", "k"), fp, Duration::from_millis(300))
            .expect("begin"),
        Begin::Acquired(_)
    ));
    assert_eq!(
        send(&svc, post(Some("k"), "payload")).await.0,
        StatusCode::CONFLICT
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (s, _, b) = send(&svc, post(Some("k"), "payload")).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(
        String::from_utf8_lossy(&b).contains("takeover=true"),
        "{b:?}"
    );
}

#[tokio::test]
async fn echo_headers_on_fresh_and_replayed_responses_from_the_current_request() {
    echo_headers(Store::in_memory(), "").await;
}

async fn echo_headers<St: IdempotencyStore + Clone>(store: St, p: &str) {
    let orders = Orders::new();
    let svc = ServiceBuilder::new()
        .layer(EchoLayer::new())
        .layer(IdempotencyLayer::new(store))
        .service(orders.service());
    let key = format!("{p}e-1");
    let with = |id: &str, echo: &[&str]| {
        let mut r = post(Some(&key), "same");
        r.headers_mut()
            .insert("x-request-id", id.parse().expect("value"));
        for e in echo {
            r.headers_mut()
                .append("x-echo-set-header", e.parse().expect("value"));
        }
        r
    };
    let (_, h, _) = send(
        &svc,
        with("req-1", &["X-Correlation: c1", "X-Order: overridden"]),
    )
    .await;
    assert_eq!(h["x-request-id"], "req-1");
    assert_eq!(h["x-correlation"], "c1");
    assert_eq!(h["x-order"], "overridden");
    let mut replay = with("req-2", &["X-Correlation: c2"]);
    replay
        .headers_mut()
        .append("x-reply-set-header", "X-Other: o".parse().expect("value"));
    let (_, h, _) = send(&svc, replay).await;
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(h["x-request-id"], "req-2");
    assert_eq!(h["x-correlation"], "c2");
    assert_eq!(h["x-other"], "o");
    let before = orders.runs();
    for bad in [
        "Content-Length: 1",
        "Set-Cookie: s=1",
        "no colon",
        "Bad Name: v",
    ] {
        let (s, h, b) = send(&svc, with("req-3", &[bad])).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(h["content-type"], "application/problem+json");
        assert!(String::from_utf8_lossy(&b).contains("invalid-echo-header"));
    }
    assert_eq!(
        orders.runs(),
        before,
        "refused requests never reach the handler"
    );
}

/// The same behaviour on the Redis backend (`tests/support/redis.rs`: required under `CI=true`),
/// with keys of this run's own.
#[cfg(feature = "redis")]
#[path = "support/child.rs"]
mod child;
#[cfg(feature = "redis")]
#[path = "support/redis.rs"]
mod redis_support;

#[cfg(feature = "redis")]
mod on_redis {
    use super::*;

    async fn store() -> Option<(idemkv::redis::RedisStore, String)> {
        let url = super::redis_support::url()?;
        let store = idemkv::redis::RedisStore::builder(url)
            .connect()
            .await
            .expect("redis");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        Some((store, format!("{}-{nanos}-", std::process::id())))
    }

    #[tokio::test]
    async fn a_repeat_replays_the_stored_response_exactly() {
        let Some((s, p)) = store().await else { return };
        repeat_replays(s, &p).await;
    }

    #[tokio::test]
    async fn concurrent_duplicates_run_once_and_get_409_or_wait_for_the_replay() {
        let Some((s, p)) = store().await else { return };
        concurrent_duplicates(s, &p).await;
    }

    #[tokio::test]
    async fn echo_headers_on_fresh_and_replayed_responses_from_the_current_request() {
        let Some((s, p)) = store().await else { return };
        echo_headers(s, &p).await;
    }
}

#[tokio::test]
async fn a_cloned_layer_keeps_its_own_configuration() {
    let base = IdempotencyLayer::new(Store::in_memory());
    let _kept = base.clone(); // a clone alive elsewhere must not make settings vanish
    let strict = base.clone().max_body(10).require_key(true);
    let orders = Orders::new();
    let svc = ServiceBuilder::new()
        .layer(strict)
        .service(orders.service());
    let (s, _, b) = send(&svc, post(Some("k"), &"y".repeat(11))).await;
    assert_eq!(
        s,
        StatusCode::PAYLOAD_TOO_LARGE,
        "max_body on a clone was dropped"
    );
    assert!(String::from_utf8_lossy(&b).contains("body-too-large"));
    let (s, _, _) = send(&svc, post(None, "{}")).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "require_key on a clone was dropped"
    );
    // The original keeps the defaults.
    let svc = ServiceBuilder::new().layer(base).service(orders.service());
    let (s, _, _) = send(&svc, post(Some("k2"), &"y".repeat(11))).await;
    assert_eq!(s, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_loses_its_lease_gets_no_silent_completion() {
    // The handler outlives its lease while something else takes the key: the run ends as
    // "lease lost" (409, nothing recorded), and the other holder's result stands.
    let store = Store::in_memory();
    let mut orders = Orders::new();
    orders.work = Duration::from_millis(400);
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()).lease(Duration::from_millis(90)))
        .service(orders.service());
    let req = post(Some("lost"), "{}");
    let running = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, req).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    // An operator removes the key; a retry elsewhere takes it and completes first.
    let key = Key::new("POST /orders -", "lost");
    assert_eq!(
        store.scan(b"POST /orders -").len(),
        1,
        "the default scope changed"
    );
    assert!(store.blocking_remove(key).expect("remove"));
    let Begin::Acquired(other) = store
        .blocking_begin(key, Fingerprint::NONE, Duration::from_secs(60))
        .expect("begin")
    else {
        panic!("the removed key was not free");
    };
    store
        .blocking_complete(&other, b"other", None)
        .expect("complete");
    let (s, _, b) = running.await.expect("task");
    assert_eq!(s, StatusCode::CONFLICT, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("lease-lost"));
    match store.blocking_get(key).expect("get") {
        Some(idemkv::Snapshot::Completed(c)) => assert_eq!(c.response, b"other"),
        other => panic!("{other:?}"),
    }
}
