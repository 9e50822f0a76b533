//! The exactly-once PUT / POST / GET / DELETE protocol, with a handler whose state change (an
//! account debit) commits atomically with "processed".
#![cfg(feature = "http")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use idemkv::http::{BoxError, ExactlyOnce, ExactlyOnceHandler, Processed, StoredRequest};
use idemkv::outbox::Outgoing;
use idemkv::{OwnedKey, Snapshot, Store, Write};
use tower::ServiceExt;

/// Debits `amount` cents from `customer` (balance starts at 10000), or answers 400.
#[derive(Clone)]
struct Payments {
    store: Store,
    runs: Arc<AtomicU64>,
}

impl ExactlyOnceHandler for Payments {
    async fn process(&self, req: StoredRequest) -> Result<Processed, BoxError> {
        Ok(self.debit(&req.payload))
    }
}

impl Payments {
    fn debit(&self, payload: &[u8]) -> Processed {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let text = String::from_utf8_lossy(payload).into_owned();
        let (customer, amount) = text.split_once(':').unwrap_or(("?", "0"));
        let amount: i64 = amount.parse().unwrap_or(0);
        let account = OwnedKey::new("accounts", customer);
        let (balance, write) = match self.store.blocking_get(account.as_key()) {
            Ok(Some(Snapshot::Value(v))) => {
                let b: i64 = String::from_utf8_lossy(&v.value).parse().unwrap_or(0);
                (b, Some(v.version))
            }
            _ => (10_000, None),
        };
        if amount > balance {
            return Processed::new(StatusCode::BAD_REQUEST, "insufficient funds");
        }
        let new = (balance - amount).to_string();
        let w = match write {
            Some(version) => Write::set_if_version(account, version, new.clone()),
            None => Write::put_if_absent(account, new.clone()),
        };
        Processed::new(StatusCode::OK, format!("debited {amount}, balance {new}")).write(w)
    }
}

fn req(method: Method, id: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("/payments/authorize/{id}"))
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request")
}

async fn call(
    svc: &ExactlyOnce<Store, Payments>,
    r: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, String) {
    let res = svc.clone().oneshot(r).await.expect("infallible");
    let (p, b) = res.into_parts();
    (
        p.status,
        p.headers,
        String::from_utf8_lossy(&b.collect().await.expect("body").to_bytes()).into_owned(),
    )
}

fn setup() -> (ExactlyOnce<Store, Payments>, Payments, Store) {
    let store = Store::in_memory();
    let payments = Payments {
        store: store.clone(),
        runs: Arc::default(),
    };
    (
        ExactlyOnce::new(store.clone(), "payments/authorize", payments.clone()),
        payments,
        store,
    )
}

fn balance(store: &Store, customer: &str) -> String {
    match store
        .blocking_get(OwnedKey::new("accounts", customer).as_key())
        .expect("get")
    {
        Some(Snapshot::Value(v)) => String::from_utf8_lossy(&v.value).into_owned(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn put_post_get_delete() {
    let (svc, payments, store) = setup();
    assert_eq!(
        call(&svc, req(Method::POST, "p1", "")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        payments.runs.load(Ordering::SeqCst),
        0,
        "an unknown id runs nothing"
    );
    assert_eq!(
        call(&svc, req(Method::PUT, "p1", "c1:1250")).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        call(&svc, req(Method::PUT, "p1", "c1:1250")).await.0,
        StatusCode::ACCEPTED,
        "PUT is repeatable"
    );
    let (s, h, b) = call(&svc, req(Method::GET, "p1", "")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(b.contains("not-processed-yet") && h["content-type"] == "application/problem+json");
    let (s, h, b) = call(&svc, req(Method::POST, "p1", "")).await;
    assert_eq!(
        (s, b.as_str()),
        (StatusCode::OK, "debited 1250, balance 8750")
    );
    assert!(h.get("idempotent-replayed").is_none());
    // Duplicate and late POSTs replay; nothing runs twice, nothing is debited twice.
    let (s, h, b) = call(&svc, req(Method::POST, "p1", "")).await;
    assert_eq!(
        (s, b.as_str()),
        (StatusCode::OK, "debited 1250, balance 8750")
    );
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(payments.runs.load(Ordering::SeqCst), 1);
    assert_eq!(balance(&store, "c1"), "8750");
    assert_eq!(
        call(&svc, req(Method::GET, "p1", "")).await.2,
        "debited 1250, balance 8750"
    );
    assert_eq!(
        call(&svc, req(Method::PUT, "p1", "c1:1")).await.0,
        StatusCode::CONFLICT
    );
    // DELETE forgets everything (repeatably); a POST after it runs nothing.
    assert_eq!(
        call(&svc, req(Method::DELETE, "p1", "")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&svc, req(Method::DELETE, "p1", "")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&svc, req(Method::GET, "p1", "")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&svc, req(Method::POST, "p1", "")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(payments.runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        store
            .blocking_get(idemkv::Key::new("payments/authorize", "p1"))
            .expect("get"),
        None
    );
    assert_eq!(
        call(&svc, req(Method::PATCH, "p1", "")).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn insufficient_funds_is_a_recorded_400() {
    let (svc, payments, _) = setup();
    call(&svc, req(Method::PUT, "big", "c2:20000")).await;
    let (s, _, b) = call(&svc, req(Method::POST, "big", "")).await;
    assert_eq!(
        (s, b.as_str()),
        (StatusCode::BAD_REQUEST, "insufficient funds")
    );
    let (s, h, _) = call(&svc, req(Method::POST, "big", "")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(payments.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_payments_on_one_account_each_debit_exactly_once() {
    let (svc, payments, store) = setup();
    let n = 40;
    for i in 0..n {
        call(&svc, req(Method::PUT, &format!("pay-{i}"), "c3:100")).await;
    }
    // Every payment POSTed three times at once, all payments at once.
    let mut tasks = Vec::new();
    for i in 0..n {
        for _ in 0..3 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                call(&svc, req(Method::POST, &format!("pay-{i}"), ""))
                    .await
                    .0
            }));
        }
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => {}
            other => panic!("{other}"),
        }
    }
    assert!(ok >= n);
    assert_eq!(
        balance(&store, "c3"),
        (10_000 - 100 * n).to_string(),
        "each payment debited once"
    );
    // Runs can exceed n only through conflict retries, which commit nothing.
    assert!(payments.runs.load(Ordering::SeqCst) >= n as u64);
    for i in 0..n {
        let (s, _, b) = call(&svc, req(Method::GET, &format!("pay-{i}"), "")).await;
        assert_eq!(s, StatusCode::OK);
        assert!(b.starts_with("debited 100"));
    }
}

/// A handler that takes `work` and counts how often it ran.
#[derive(Clone)]
struct Slow {
    work: std::time::Duration,
    runs: Arc<AtomicU64>,
}

impl ExactlyOnceHandler for Slow {
    async fn process(&self, _req: StoredRequest) -> Result<Processed, BoxError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.work).await;
        Ok(Processed::new(StatusCode::OK, "done"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_running_three_times_its_lease_never_runs_twice() {
    let store = Store::in_memory();
    let lease = std::time::Duration::from_millis(150);
    let slow = Slow {
        work: lease * 3,
        runs: Arc::default(),
    };
    let svc = ExactlyOnce::new(store.clone(), "slow", slow.clone()).lease(lease);
    let put = svc
        .clone()
        .oneshot(req(Method::PUT, "s1", "payload"))
        .await
        .expect("put");
    assert_eq!(put.status(), StatusCode::ACCEPTED);
    // POSTs keep arriving all through the handler's run, past its lease's first deadline.
    let mut posts = Vec::new();
    for i in 0..12u64 {
        let svc = svc.clone();
        posts.push(tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(40 * i)).await;
            svc.oneshot(req(Method::POST, "s1", ""))
                .await
                .expect("post")
        }));
    }
    let mut ok = 0;
    for p in posts {
        let res = p.await.expect("task");
        match res.status() {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(slow.runs.load(Ordering::SeqCst), 1, "the handler ran twice");
    assert!(ok >= 1, "the first POST got the result");
    // And afterwards every POST replays.
    let again = svc
        .oneshot(req(Method::POST, "s1", ""))
        .await
        .expect("post");
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(slow.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_post_frees_its_id_at_once() {
    let store = Store::in_memory();
    let slow = Slow {
        work: std::time::Duration::from_secs(3600),
        runs: Arc::default(),
    };
    // A long lease: only an explicit release can free the id within this test.
    let svc = ExactlyOnce::new(store.clone(), "slow", slow.clone())
        .lease(std::time::Duration::from_secs(600));
    let put = svc
        .clone()
        .oneshot(req(Method::PUT, "c1", "payload"))
        .await
        .expect("put");
    assert_eq!(put.status(), StatusCode::ACCEPTED);
    // The client gives up: the POST's future is dropped mid-handler.
    let cancelled = tokio::time::timeout(
        std::time::Duration::from_millis(100),
        svc.clone().oneshot(req(Method::POST, "c1", "")),
    )
    .await;
    assert!(cancelled.is_err(), "the handler cannot have finished");
    assert_eq!(slow.runs.load(Ordering::SeqCst), 1);
    // The stored request is pending again at once (not held until the lease's deadline).
    let key = OwnedKey::new("slow", "c1");
    let mut pending = false;
    for _ in 0..100 {
        if let Some(Snapshot::Pending { .. }) = store.blocking_get(key.as_key()).expect("get") {
            pending = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(pending, "the cancelled POST still holds its id");
}

/// Records what it publishes; refuses everything while `down`.
#[derive(Clone, Default)]
struct Log {
    got: Arc<parking_lot::Mutex<Vec<(String, String)>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl idemkv::outbox::Publisher for Log {
    async fn publish(&self, msg: &Outgoing, id: &[u8]) -> Result<(), BoxError> {
        if self.down.load(Ordering::SeqCst) {
            return Err("broker down".into());
        }
        let id = String::from_utf8_lossy(id).into_owned();
        self.got.lock().push((msg.topic().to_owned(), id));
        Ok(())
    }
}

async fn call_any<S>(svc: &S, r: Request<Full<Bytes>>) -> (StatusCode, String)
where
    S: tower::Service<Request<Full<Bytes>>, Response = http::Response<Full<Bytes>>> + Clone,
    S::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(r).await.expect("infallible");
    let (p, b) = res.into_parts();
    let body = b.collect().await.expect("body").to_bytes();
    (p.status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_closure_handler_sees_the_posts_headers_and_its_errors_record_nothing() {
    let store = Store::in_memory();
    let runs = Arc::new(AtomicU64::new(0));
    let counted = runs.clone();
    let svc = ExactlyOnce::new(store.clone(), "auth", move |req: StoredRequest| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                return Err::<Processed, _>(std::io::Error::other("database away"));
            }
            let who = req
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("nobody")
                .to_owned();
            Ok(Processed::new(
                StatusCode::OK,
                format!("{who} paid {}", req.id),
            ))
        }
    });
    assert_eq!(
        call_any(&svc, req(Method::PUT, "a1", "x")).await.0,
        StatusCode::ACCEPTED
    );
    let post = || {
        Request::builder()
            .method(Method::POST)
            .uri("/auth/a1")
            .header(http::header::AUTHORIZATION, "Bearer alice")
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    // The first run fails: 503, nothing recorded, the request still waits.
    let (status, _) = call_any(&svc, post()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(matches!(
        store
            .blocking_get(idemkv::Key::new("auth", "a1"))
            .expect("get"),
        Some(Snapshot::Pending { .. })
    ));
    // The retried POST runs it, with its headers.
    assert_eq!(
        call_any(&svc, post()).await,
        (StatusCode::OK, "Bearer alice paid a1".into())
    );
    assert_eq!(
        call_any(&svc, post()).await,
        (StatusCode::OK, "Bearer alice paid a1".into())
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn sent_messages_are_published_after_processing_and_before_delete_forgets_them() {
    let store = Store::in_memory();
    let log = Log::default();
    let svc = ExactlyOnce::new(store.clone(), "pay", |req: StoredRequest| async move {
        Ok::<_, BoxError>(
            Processed::new(StatusCode::OK, "ok")
                .send(Outgoing::to("events").payload(format!("authorized {}", req.id)))
                .send(Outgoing::to("audit").payload("x")),
        )
    })
    .publisher(log.clone());
    let outbox = |id: &str| {
        store
            .blocking_get(idemkv::Key::new("pay#outbox", id))
            .expect("get")
    };

    // Published at once after the POST, in order, under stable ids.
    assert_eq!(
        call_any(&svc, req(Method::PUT, "p1", "x")).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        call_any(&svc, req(Method::POST, "p1", "")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        *log.got.lock(),
        [
            ("events".to_owned(), "p1/0".to_owned()),
            ("audit".into(), "p1/1".into())
        ]
    );
    assert_eq!(outbox("p1"), None);
    // A replay publishes nothing again.
    assert_eq!(
        call_any(&svc, req(Method::POST, "p1", "")).await.0,
        StatusCode::OK
    );
    assert_eq!(log.got.lock().len(), 2);

    // With the broker away the POST still answers (the result is recorded); the messages wait.
    log.down.store(true, Ordering::SeqCst);
    assert_eq!(
        call_any(&svc, req(Method::PUT, "p2", "x")).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        call_any(&svc, req(Method::POST, "p2", "")).await.0,
        StatusCode::OK
    );
    assert!(matches!(outbox("p2"), Some(Snapshot::Value(_))));
    // DELETE refuses to forget unpublished messages...
    assert_eq!(
        call_any(&svc, req(Method::DELETE, "p2", "")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(matches!(
        store
            .blocking_get(idemkv::Key::new("pay", "p2"))
            .expect("get"),
        Some(Snapshot::Completed(_))
    ));
    // ...and, once they can go, publishes them first.
    log.down.store(false, Ordering::SeqCst);
    assert_eq!(
        call_any(&svc, req(Method::DELETE, "p2", "")).await.0,
        StatusCode::NO_CONTENT
    );
    let got = log.got.lock().clone();
    assert_eq!(
        &got[2..],
        [
            ("events".to_owned(), "p2/0".to_owned()),
            ("audit".into(), "p2/1".into())
        ]
    );
    assert_eq!(outbox("p2"), None);
    assert_eq!(
        store
            .blocking_get(idemkv::Key::new("pay", "p2"))
            .expect("get"),
        None
    );
}

#[tokio::test]
async fn a_handler_that_sends_without_a_publisher_records_nothing() {
    let store = Store::in_memory();
    let svc = ExactlyOnce::new(store.clone(), "nopub", |_req: StoredRequest| async move {
        Ok::<_, BoxError>(Processed::new(StatusCode::OK, "ok").send(Outgoing::to("events")))
    });
    assert_eq!(
        call_any(&svc, req(Method::PUT, "n1", "x")).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        call_any(&svc, req(Method::POST, "n1", "")).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert!(matches!(
        store
            .blocking_get(idemkv::Key::new("nopub", "n1"))
            .expect("get"),
        Some(Snapshot::Pending { .. })
    ));
}
