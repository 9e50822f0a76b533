//! The HTTP layers against hostile use, through tower: cookie-session clients never share a
//! scope, principal scopes from extensions, refusing anonymous requests, no stored
//! credentials, echo policies and their bounds, retention advertised, and a full store.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use idemkv::echo::EchoPolicy;
use idemkv::http::{DefaultStoredHeaders, EchoLayer, IdempotencyLayer, StoredHeaders};
use idemkv::{Snapshot, Store};
use tower::{Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

/// Answers 201 `order-<n>` with a session cookie, an auth-info header and a custom header.
fn orders(
    runs: &Arc<AtomicU64>,
) -> impl Service<Req, Response = Res, Error = Infallible, Future = impl Send> + Clone + Send + 'static
{
    let runs = Arc::clone(runs);
    tower::service_fn(move |_req: Req| {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header("set-cookie", format!("session=s{n}; HttpOnly"))
                    .header("authentication-info", format!("nextnonce=\"n{n}\""))
                    .header("x-order", format!("o-{n}"))
                    .body(Full::new(Bytes::from(format!("order-{n}"))))
                    .expect("response"),
            )
        }
    })
}

fn post(key: &str, headers: &[(&str, &str)]) -> Req {
    let mut b = Request::post("/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", key);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Full::new(Bytes::from_static(b"{\"items\":[1]}")))
        .expect("request")
}

async fn send<S>(svc: &S, req: Req) -> (StatusCode, http::HeaderMap, String)
where
    S: Service<Req, Response = Res> + Clone,
    S::Error: std::fmt::Debug,
{
    let (p, b) = svc
        .clone()
        .oneshot(req)
        .await
        .expect("service")
        .into_parts();
    let bytes = b.collect().await.expect("body").to_bytes();
    (
        p.status,
        p.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn is_problem(h: &http::HeaderMap) -> bool {
    h.get("content-type")
        .is_some_and(|v| v == "application/problem+json")
}

#[tokio::test]
async fn cookie_session_clients_never_share_a_scope() {
    let runs = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(Store::in_memory()))
        .service(orders(&runs));
    let alice = [("cookie", "sid=alice-session")];
    let bob = [("cookie", "sid=bob-session")];
    let (_, _, a1) = send(&svc, post("k", &alice)).await;
    let (_, hb, b1) = send(&svc, post("k", &bob)).await;
    assert_ne!(a1, b1, "bob got alice's response");
    assert!(hb.get("idempotent-replayed").is_none());
    let (_, ha, a2) = send(&svc, post("k", &alice)).await;
    assert_eq!(a2, a1);
    assert_eq!(ha["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // Cookies split over several fields (HTTP/2) are all part of the scope, in order.
    let split = [("cookie", "sid=alice-session"), ("cookie", "theme=dark")];
    let (_, h, s) = send(&svc, post("k", &split)).await;
    assert!(h.get("idempotent-replayed").is_none() && s != a1);
    // Anonymous requests share the anonymous scope, apart from every credentialed one.
    let (_, _, anon) = send(&svc, post("k", &[])).await;
    assert!(anon != a1 && anon != b1 && anon != s);
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[derive(Clone)]
struct UserId(String);

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[tokio::test]
async fn scope_by_an_authenticated_principal_in_the_extensions() {
    let runs = Arc::new(AtomicU64::new(0));
    let inner = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(Store::in_memory())
                .scope_by_extension::<UserId>()
                .require_credentials(HeaderValue::from_static("Bearer")),
        )
        .service(orders(&runs));
    // The "auth layer": x-user (a stand-in for a verified session) becomes a UserId.
    let svc = tower::service_fn(move |mut req: Req| {
        if let Some(u) = req.headers().get("x-user") {
            let user = UserId(u.to_str().unwrap_or_default().to_owned());
            req.extensions_mut().insert(user);
        }
        inner.clone().oneshot(req)
    });
    // The same user with a rotated cookie is the same scope: the retry replays.
    let (_, _, first) = send(&svc, post("k", &[("x-user", "u1"), ("cookie", "sid=1")])).await;
    let (_, h, again) = send(&svc, post("k", &[("x-user", "u1"), ("cookie", "sid=2")])).await;
    assert_eq!(first, again);
    assert_eq!(h["idempotent-replayed"], "true");
    let (_, h, other) = send(&svc, post("k", &[("x-user", "u2")])).await;
    assert!(h.get("idempotent-replayed").is_none() && other != first);
    // No principal: 401 with the challenge, and the handler never runs.
    let (s, h, body) = send(&svc, post("k", &[("cookie", "sid=1")])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h["www-authenticate"], "Bearer");
    assert!(
        is_problem(&h) && body.contains("credentials-required"),
        "{body}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn requests_without_credentials_can_be_refused() {
    let runs = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(Store::in_memory())
                .require_credentials(HeaderValue::from_static("Basic realm=\"api\"")),
        )
        .service(orders(&runs));
    let (s, h, _) = send(&svc, post("k", &[])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h["www-authenticate"], "Basic realm=\"api\"");
    assert!(is_problem(&h));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let (s, _, _) = send(&svc, post("k", &[("authorization", "Basic YTpi")])).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, _) = send(&svc, post("k", &[("cookie", "sid=x")])).await;
    assert_eq!(s, StatusCode::CREATED);
}

#[tokio::test]
async fn per_client_credentials_are_never_stored_or_replayed() {
    let runs = Arc::new(AtomicU64::new(0));
    let store = Store::in_memory();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()))
        .service(orders(&runs));
    let (_, h1, _) = send(&svc, post("k", &[])).await;
    // The first client gets its own cookie.
    assert_eq!(h1["set-cookie"], "session=s1; HttpOnly");
    let (_, h2, _) = send(&svc, post("k", &[])).await;
    assert_eq!(h2["idempotent-replayed"], "true");
    assert!(h2.get("set-cookie").is_none(), "{h2:?}");
    assert!(h2.get("authentication-info").is_none(), "{h2:?}");
    assert_eq!(h2["x-order"], "o-1");
    // Nor are they in the store, where Redis operators and backups would see them.
    // (The anonymous scope of POST /orders; the one record must be found.)
    let mut seen = 0;
    for (_, snap) in store.scan(b"POST /orders -") {
        if let Snapshot::Completed(c) = snap {
            let raw = String::from_utf8_lossy(&c.response);
            assert!(raw.contains("o-1"), "{raw}");
            assert!(
                !raw.contains("session=s1") && !raw.contains("nextnonce"),
                "{raw}"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 1);

    // A policy of the user's: the default, minus x-order too.
    let policy =
        |n: &HeaderName, v: &HeaderValue| DefaultStoredHeaders.store(n, v) && n != "x-order";
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(Store::in_memory()).stored_headers(policy))
        .service(orders(&runs));
    let (_, h1, _) = send(&svc, post("k", &[])).await;
    let (_, h2, _) = send(&svc, post("k", &[])).await;
    assert!(h1.get("x-order").is_some() && h2.get("x-order").is_none());
}

#[tokio::test]
async fn echo_policies_and_their_bounds() {
    let runs = Arc::new(AtomicU64::new(0));
    let with_echo = |echo: &[&str]| {
        let mut r = post("e", &[]);
        for e in echo {
            r.headers_mut()
                .append("x-echo-set-header", e.parse().expect("value"));
        }
        r
    };
    let svc = ServiceBuilder::new()
        .layer(EchoLayer::new())
        .layer(IdempotencyLayer::new(Store::in_memory()))
        .service(orders(&runs));
    // Every header the hostile client tried, refused with 400 before the handler runs.
    for bad in [
        "Alt-Svc: h2=\"evil.example:443\"",
        "Refresh: 0; url=https://evil.example",
        "Cache-Control: public, max-age=31536000",
        "Expires: Thu, 01 Dec 2099 16:00:00 GMT",
        "Vary: *",
        "X-Frame-Options: ALLOWALL",
        "X-Content-Type-Options: none",
        "Content-Disposition: attachment; filename=evil.exe",
        "Link: <https://evil.example/x.js>; rel=preload",
        "Clear-Site-Data: \"*\"",
        "Cross-Origin-Resource-Policy: cross-origin",
        "Report-To: {\"url\":\"https://evil.example\"}",
        "X-Accel-Redirect: /internal/secrets",
    ] {
        let (s, h, body) = send(&svc, with_echo(&[bad])).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            is_problem(&h) && body.contains("invalid-echo-header"),
            "{bad}: {body}"
        );
        let name = bad.split(':').next().expect("name").to_ascii_lowercase();
        assert!(h.get(name.as_str()).is_none(), "{bad}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Custom names are echoed, as the protocol intends.
    let (s, h, _) = send(&svc, with_echo(&["Inventory-Sku: id-17236", "X-Trace: t1"])).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["inventory-sku"], "id-17236");
    assert_eq!(h["x-trace"], "t1");
    // 17 echo headers, or more than 4 KiB of them: 431.
    let many: Vec<String> = (0..17).map(|i| format!("x-e{i}: v")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let (s, h, body) = send(&svc, with_echo(&many)).await;
    assert_eq!(s, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "{body}");
    assert!(is_problem(&h) && body.contains("echo-headers-too-large"));
    let big = format!("x-big: {}", "v".repeat(4100));
    let (s, _, _) = send(&svc, with_echo(&[&big])).await;
    assert_eq!(s, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // An allow-list policy: only its names.
    let strict = ServiceBuilder::new()
        .layer(EchoLayer::policy(EchoPolicy::allow_only(["x-trace"])))
        .layer(IdempotencyLayer::new(Store::in_memory()))
        .service(orders(&runs));
    let (s, h, _) = send(&strict, with_echo(&["X-Trace: t2"])).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["x-trace"], "t2");
    let (s, _, _) = send(&strict, with_echo(&["Inventory-Sku: 1"])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn conflicts_say_what_the_client_can_do_and_retention_is_advertised() {
    let runs = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(Store::in_memory()).ttl(std::time::Duration::from_secs(3600)))
        .service(orders(&runs));
    let (_, h, _) = send(&svc, post("k", &[])).await;
    assert_eq!(h["idempotency-ttl"], "3600");
    let mut other = post("k", &[]);
    *other.body_mut() = Full::new(Bytes::from_static(b"{\"items\":[2]}"));
    let (s, h, body) = send(&svc, other).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(h["idempotency-ttl"], "3600");
    assert!(body.contains("new key") && body.contains("3600"), "{body}");
}

#[tokio::test]
async fn a_full_store_answers_503_with_retry_after_and_keeps_what_it_holds() {
    let runs = Arc::new(AtomicU64::new(0));
    let store = Store::builder().max_records(3).build().expect("store");
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()))
        .service(orders(&runs));
    for k in ["a", "b", "c"] {
        let (s, _, _) = send(&svc, post(k, &[])).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, h, body) = send(&svc, post("d", &[])).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(h["retry-after"], "30");
    assert!(is_problem(&h) && body.contains("store-full"), "{body}");
    assert!(
        !body.contains("maximum of 3"),
        "internal text leaked: {body}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "nothing ran without a record"
    );
    // What was stored is untouched: every earlier key still replays.
    for (k, n) in [("a", 1), ("b", 2), ("c", 3)] {
        let (s, h, body) = send(&svc, post(k, &[])).await;
        assert_eq!((s, body), (StatusCode::CREATED, format!("order-{n}")));
        assert_eq!(h["idempotent-replayed"], "true");
    }
    assert_eq!(store.stats().records, 3);
}
