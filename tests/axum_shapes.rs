//! The shapes an axum user writes: `IdempotencyInfo` as an extractor (required or optional),
//! `CompleteWith` returned as a response part (committed with the completion), and one store
//! type chosen at run time with `Either`.
#![cfg(all(feature = "axum", not(loom)))]

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use http_body_util::BodyExt;
use idemkv::http::{CompleteWith, IdempotencyInfo, IdempotencyLayer};
use idemkv::{Either, OwnedKey, Snapshot, Store, Write};
use tower::ServiceExt;

async fn create(info: IdempotencyInfo) -> (StatusCode, CompleteWith, String) {
    let write = Write::put_if_absent(OwnedKey::new("orders", &info.key), "order");
    (
        StatusCode::CREATED,
        CompleteWith(vec![write]),
        format!("order for {}", info.key),
    )
}

async fn maybe(info: Option<IdempotencyInfo>) -> String {
    info.map_or("no key".into(), |i| format!("key {}", i.key))
}

fn app(store: Either<Store, Store>) -> Router {
    Router::new()
        .route("/orders", post(create))
        .route("/maybe", post(maybe))
        .layer(IdempotencyLayer::new(store))
}

async fn call(app: &Router, path: &str, key: Option<&str>) -> (StatusCode, String) {
    let mut b = Request::post(path);
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    let res = app
        .clone()
        .oneshot(b.body(Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = res.status();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn extractor_and_response_part() {
    let inner = Store::in_memory();
    let app = app(Either::Left(inner.clone()));
    assert_eq!(
        call(&app, "/orders", Some("k-1")).await,
        (StatusCode::CREATED, "order for k-1".into())
    );
    // The write went in with the completion, and a retry replays without running again.
    assert!(matches!(
        inner.blocking_get(idemkv::Key::new("orders", b"k-1")),
        Ok(Some(Snapshot::Value(_)))
    ));
    assert_eq!(
        call(&app, "/orders", Some("k-1")).await,
        (StatusCode::CREATED, "order for k-1".into())
    );
    // A required IdempotencyInfo without a key (the layer passed the request through): 500.
    let (status, body) = call(&app, "/orders", None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("no-idempotency-layer"), "{body}");
    // An optional one is None.
    assert_eq!(call(&app, "/maybe", None).await.1, "no key");
    assert_eq!(call(&app, "/maybe", Some("k-2")).await.1, "key k-2");
}

#[tokio::test]
async fn either_side_serves_the_same_router() {
    for store in [
        Either::Left(Store::in_memory()),
        Either::Right(Store::in_memory()),
    ] {
        let app = app(store);
        assert_eq!(
            call(&app, "/orders", Some("k")).await.0,
            StatusCode::CREATED
        );
    }
}
