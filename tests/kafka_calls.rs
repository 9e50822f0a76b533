//! Exactly-once HTTP calls from a Kafka handler (`Incoming::invoke_http`): the four phases
//! against a real `ExactlyOnce` endpoint over TCP on 127.0.0.1, on librdkafka's mock cluster.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used)]

#[path = "support/kafka.rs"]
mod kafka_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use idemkv::http::{ExactlyOnce, Processed, StoredRequest};
use idemkv::kafka::{HandlerError, Incoming, KafkaProcessor, MockKafka, Outcome};
use idemkv::outbox::Outgoing;
use idemkv::{Snapshot, Store};
use parking_lot::Mutex;
use rdkafka::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// The payments service: an `ExactlyOnce` endpoint counting its runs per id. With `lose_first`,
/// the first POST of each id runs, but its answer is replaced by a 503 (the caller must fetch
/// the stored response by GET instead of running it again).
struct Payments {
    store: Store,
    runs: Arc<Mutex<HashMap<String, u32>>>,
    /// GETs that answered with a stored response.
    fetched: Arc<std::sync::atomic::AtomicU64>,
    url: String,
}

/// Faults the payments server injects, once per id each.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// The first POST runs, but its answer is replaced by a 503.
    lose_post: bool,
    /// The first PUT is refused with 503 (nothing stored).
    fail_put: bool,
    /// The first DELETE is refused with 503 (nothing forgotten).
    fail_delete: bool,
}

async fn payments(lose_first: bool) -> Payments {
    payments_with(Faults {
        lose_post: lose_first,
        ..Faults::default()
    })
    .await
}

async fn payments_with(faults: Faults) -> Payments {
    let store = Store::in_memory();
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let counted = runs.clone();
    let svc = ExactlyOnce::new(store.clone(), "payments", move |req: StoredRequest| {
        *counted.lock().entry(req.id.clone()).or_default() += 1;
        let amount = String::from_utf8_lossy(&req.payload).into_owned();
        async move {
            if amount == "too much" {
                return Ok::<_, std::convert::Infallible>(Processed::new(
                    StatusCode::BAD_REQUEST,
                    "insufficient funds",
                ));
            }
            Ok(Processed::new(
                StatusCode::OK,
                format!("authorized {amount}"),
            ))
        }
    });
    let lost: Arc<Mutex<HashSet<String>>> = Arc::default();
    let failed: Arc<Mutex<HashSet<(http::Method, String)>>> = Arc::default();
    let fetched: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let fetches = fetched.clone();
    let app = axum::Router::new().route_service(
        "/payments/authorize/{id}",
        tower::service_fn(move |req: http::Request<axum::body::Body>| {
            let (svc, lost, fetches, failed) =
                (svc.clone(), lost.clone(), fetches.clone(), failed.clone());
            async move {
                let id = req
                    .uri()
                    .path()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let refuse = (faults.fail_put && req.method() == http::Method::PUT)
                    || (faults.fail_delete && req.method() == http::Method::DELETE);
                if refuse && failed.lock().insert((req.method().clone(), id)) {
                    let mut r = http::Response::new(http_body_util::Full::new(Bytes::new()));
                    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    return Ok::<_, std::convert::Infallible>(r);
                }
                let post = req.method() == http::Method::POST;
                let get = req.method() == http::Method::GET;
                let id = req
                    .uri()
                    .path()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let res = match tower::ServiceExt::oneshot(svc, req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                if get && ![StatusCode::CONFLICT, StatusCode::NOT_FOUND].contains(&res.status()) {
                    fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                if faults.lose_post && post && lost.lock().insert(id) {
                    let mut r = http::Response::new(http_body_util::Full::new(Bytes::new()));
                    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    return Ok::<_, std::convert::Infallible>(r);
                }
                Ok(res)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Payments {
        store,
        runs,
        fetched,
        url: format!("http://{addr}/payments/authorize/{{uniqueId}}"),
    }
}

fn cluster() -> MockKafka {
    let mock = MockKafka::start(1).unwrap();
    mock.create_topic("billing.requests", 2).unwrap();
    mock.create_topic("billing.follow-up", 2).unwrap();
    mock.create_topic("billing.replies", 1).unwrap();
    mock.create_topic("billing.events", 1).unwrap();
    mock
}

async fn request(p: &FutureProducer, key: &str, amount: &str, request_id: &str) {
    let hs = OwnedHeaders::new()
        .insert(Header {
            key: "idempotency-key",
            value: Some(key),
        })
        .insert(Header {
            key: "reply-to",
            value: Some("billing.replies"),
        })
        .insert(Header {
            key: "x-request-id",
            value: Some(request_id),
        })
        .insert(Header {
            key: "x-echo-set-header",
            value: Some("X-Trace: t"),
        });
    let record = FutureRecord::to("billing.requests")
        .key(key)
        .payload(amount)
        .headers(hs);
    p.send(record, Duration::from_secs(5)).await.unwrap();
}

/// A message read back: its headers and payload.
type Got = (HashMap<String, String>, String);

/// (headers, payload) of `topic`'s messages, until `n` arrived (then 300 ms more) or 20 s.
async fn read(mock: &MockKafka, topic: &str, n: usize) -> Vec<Got> {
    let consumer = kafka_support::reader(mock.client_config(), topic);
    let mut out = Vec::new();
    let mut until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if out.len() >= n {
            until = until.min(tokio::time::Instant::now() + Duration::from_millis(300));
        }
        let Ok(Ok(m)) = tokio::time::timeout_at(until, consumer.recv()).await else {
            break;
        };
        let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
        let headers = kafka_support::text_headers(&m);
        out.push((headers, text(m.payload())));
    }
    out
}

/// The billing handler: the call, then on its follow-up the reply and an event.
async fn billing(msg: Incoming, url: Arc<str>) -> Result<Outcome, HandlerError> {
    if let Some(done) = msg.follow_up() {
        let status = if done.response().status.is_success() {
            "succeeded"
        } else {
            "failed"
        };
        let reply = format!("{status} {}", done.unique_id());
        return Ok(Outcome::reply(reply.clone()).send(
            Outgoing::to("billing.events")
                .key(msg.key().unwrap_or_default().to_vec())
                .payload(reply),
        ));
    }
    let body = msg.payload().unwrap_or_default().to_vec();
    let call = msg.invoke_http(&url, body, "authorize").await?;
    Ok(Outcome::done().follow_up(call))
}

async fn run_billing(lose_first: bool) {
    let service = payments(lose_first).await;
    let mock = cluster();
    let p: FutureProducer = mock.client_config().create().unwrap();
    for copy in 0..2 {
        for k in 0..4 {
            let amount = if k == 3 {
                "too much".to_owned()
            } else {
                format!("{k}.50")
            };
            request(&p, &format!("o{k}"), &amount, &format!("r{k}-{copy}")).await;
        }
    }
    let mut consumer = mock.client_config();
    consumer
        .set("group.id", "billing")
        .set("auto.offset.reset", "earliest")
        .set("auto.commit.interval.ms", "100");
    let store = Store::in_memory();
    let processor = KafkaProcessor::builder(store.clone(), consumer)
        .topics(["billing.requests"])
        .follow_up_topic("billing.follow-up")
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .build()
        .unwrap();
    let handle = processor.handle();
    let url: Arc<str> = service.url.clone().into();
    let running = tokio::spawn(processor.run(move |msg: Incoming| billing(msg, url.clone())));
    let replies = read(&mock, "billing.replies", 8).await;
    let events = read(&mock, "billing.events", 4).await;
    // Give the last DELETEs a moment.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while service.store.stats().records > 0 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown();
    let stats = running.await.unwrap().unwrap();

    // Each payment ran once on the service, under one unique id.
    let runs = service.runs.lock().clone();
    assert_eq!(runs.len(), 4, "{runs:?}");
    assert!(runs.values().all(|&n| n == 1), "{runs:?}");
    // Every request got a reply; the copies of one order agree, and carry their own
    // request id and the echo header; the second copy is marked replayed.
    assert_eq!(replies.len(), 8, "{replies:#?}");
    let mut by_order: HashMap<String, Vec<&Got>> = HashMap::new();
    for r in &replies {
        let id = r.0["x-request-id"].clone();
        by_order.entry(id[..2].to_owned()).or_default().push(r);
    }
    for (order, got) in &by_order {
        assert_eq!(got.len(), 2, "{order}: {got:#?}");
        assert_eq!(got[0].1, got[1].1, "{order}: copies disagree");
        let ids: HashSet<&str> = got.iter().map(|r| r.0["x-request-id"].as_str()).collect();
        assert_eq!(ids.len(), 2);
        assert!(
            got.iter()
                .all(|r| r.0.get("x-trace").map(String::as_str) == Some("t"))
        );
        assert!(
            got.iter()
                .any(|r| r.0.get("idempotent-replayed").map(String::as_str) == Some("true"))
        );
        let want = if order == "r3" { "failed" } else { "succeeded" };
        assert!(got[0].1.starts_with(want), "{order}: {}", got[0].1);
        let unique = got[0].1.split(' ').nth(1).unwrap();
        assert!(
            runs.contains_key(unique),
            "{order}: payment id {unique} never ran"
        );
    }
    // One event per order, after deduplication by its key.
    let keys: HashSet<&str> = events
        .iter()
        .map(|e| e.0["idempotency-key"].as_str())
        .collect();
    assert_eq!(keys.len(), 4, "{events:#?}");
    // Nothing left behind: the service forgot every call, the processor holds no outbox or
    // calls record.
    assert_eq!(
        service.store.stats().records,
        0,
        "the service still holds calls"
    );
    let left: Vec<_> = ["kafka:billing#outbox", "kafka:billing#calls"]
        .iter()
        .flat_map(|scope| store.scan(scope.as_bytes()))
        .filter(|(_, s)| matches!(s, Snapshot::Value(_)))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(stats.processed, 8, "4 requests and 4 follow-ups");
    let fetched = service.fetched.load(std::sync::atomic::Ordering::SeqCst);
    if lose_first {
        assert_eq!(fetched, 4, "each lost POST answer fetched by GET once");
    } else {
        assert_eq!(fetched, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billing_handler_calls_the_service_once_per_order_and_cleans_up() {
    run_billing(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_post_answer_is_fetched_by_get_not_run_again() {
    run_billing(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_http_without_a_follow_up_topic_is_a_recorded_failure() {
    let mock = cluster();
    let p: FutureProducer = mock.client_config().create().unwrap();
    request(&p, "x", "1.00", "rx").await;
    let mut consumer = mock.client_config();
    consumer
        .set("group.id", "nofu")
        .set("auto.offset.reset", "earliest");
    let processor = KafkaProcessor::builder(Store::in_memory(), consumer)
        .topics(["billing.requests"])
        .build()
        .unwrap();
    let handle = processor.handle();
    let running = tokio::spawn(
        processor.run(|msg: Incoming| billing(msg, "http://127.0.0.1:1/{uniqueId}".into())),
    );
    let replies = read(&mock, "billing.replies", 1).await;
    handle.shutdown();
    running.await.unwrap().unwrap();
    assert_eq!(replies.len(), 1);
    let error = replies[0]
        .0
        .get(idemkv::kafka::ERROR)
        .cloned()
        .unwrap_or_default();
    assert!(error.contains("follow-up topic"), "{replies:?}");
}

/// Every crash point of the four phases, in one process: the first PUT of each call refused
/// (phase 1 retried under the same URL); the request's first attempt dies after its PUT (its
/// call loses, and must be deleted once the second attempt's result commits); the first POST's
/// answer lost (phase 3: GET); the follow-up's first attempt dies after its POST ran (the
/// second POSTs again: a replay, not a second payment); the first DELETE refused (phase 4
/// retried). Each payment still runs once, every reply agrees, and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_of_the_four_phases_is_survived() {
    let service = payments_with(Faults {
        lose_post: true,
        fail_put: true,
        fail_delete: true,
    })
    .await;
    let mock = cluster();
    let p: FutureProducer = mock.client_config().create().unwrap();
    for k in 0..3 {
        request(&p, &format!("o{k}"), &format!("{k}.50"), &format!("r{k}-0")).await;
    }
    let mut consumer = mock.client_config();
    consumer
        .set("group.id", "crash-points")
        .set("auto.offset.reset", "earliest")
        .set("auto.commit.interval.ms", "100");
    let store = Store::in_memory();
    let processor = KafkaProcessor::builder(store.clone(), consumer)
        .topics(["billing.requests"])
        .follow_up_topic("billing.follow-up")
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .unwrap();
    let handle = processor.handle();
    let url: Arc<str> = service.url.clone().into();
    let running = tokio::spawn(processor.run(move |msg: Incoming| {
        let url = url.clone();
        async move {
            let first = msg.attempt() == 1;
            if msg.follow_up().is_some() && first {
                return Err(HandlerError::retry("the follow-up died after its POST"));
            }
            let outcome = billing(msg, url).await?;
            if first {
                return Err(HandlerError::retry("the request died after its PUT"));
            }
            Ok(outcome)
        }
    }));
    let replies = read(&mock, "billing.replies", 3).await;
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while service.store.stats().records > 0 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown();
    let stats = running.await.unwrap().unwrap();

    assert_eq!(replies.len(), 3, "{replies:#?}");
    // Two calls were stored per order (the dead attempt's and the winner's); one ran, once.
    let runs = service.runs.lock().clone();
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs.values().all(|&n| n == 1), "{runs:?}");
    for r in &replies {
        let unique = r.1.split(' ').nth(1).unwrap();
        assert!(
            runs.contains_key(unique),
            "replied payment {unique} never ran"
        );
    }
    assert_eq!(service.fetched.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(
        service.store.stats().records,
        0,
        "the service still holds calls"
    );
    let left: Vec<_> = ["kafka:crash-points#outbox", "kafka:crash-points#calls"]
        .iter()
        .flat_map(|scope| store.scan(scope.as_bytes()))
        .filter(|(_, s)| matches!(s, Snapshot::Value(_)))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        stats.retried, 6,
        "3 requests and 3 follow-ups died once each"
    );
}
