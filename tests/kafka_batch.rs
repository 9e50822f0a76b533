//! The Kafka processor's batch path (`src/kafka/processor/batch.rs`) against librdkafka's mock
//! cluster: messages produced before the processor starts arrive together, so one partition
//! task gets them as one batch, with every kind of message the batch path hands on to the
//! per-message path in the middle of it.
#![cfg(all(feature = "kafka", not(loom)))]
#![allow(clippy::unwrap_used)]

#[path = "support/kafka.rs"]
mod kafka_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idemkv::kafka::{
    ERROR, HandlerError, Incoming, KafkaError, KafkaProcessor, Outcome, ProcessorHandle,
    ProcessorStats, REPLAYED,
};
use idemkv::outbox::Outgoing;
use idemkv::{Begin, Fingerprint, IdempotencyStore, Key, OwnedKey, Snapshot, Store, Write};
use kafka_support::{Cluster, read, send};
use parking_lot::Mutex;

/// One handler call: offset, key, attempt.
type Calls = Arc<Mutex<Vec<(i64, String, u32)>>>;

fn key_of(msg: &Incoming) -> String {
    String::from_utf8_lossy(msg.idempotency_key()).into_owned()
}

/// A processor on "requests" (backoffs of 10 ms) whose handler records each call (offset, key,
/// attempt) in the returned list, then answers what `decide` says for the key and attempt.
fn start<F, Fut>(
    cluster: &Cluster,
    store: Store,
    group: &str,
    decide: F,
) -> (
    Calls,
    ProcessorHandle<Store>,
    tokio::task::JoinHandle<Result<ProcessorStats, KafkaError>>,
)
where
    F: Fn(String, u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, HandlerError>> + Send,
{
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    let processor = KafkaProcessor::builder(store, cluster.consumer(group))
        .topics(["requests"])
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .build()
        .unwrap();
    let handle = processor.handle();
    let decide = Arc::new(decide);
    let running = tokio::spawn(processor.run(move |msg: Incoming| {
        let (calls, decide) = (seen.clone(), decide.clone());
        async move {
            let key = key_of(&msg);
            calls
                .lock()
                .push((msg.offset(), key.clone(), msg.attempt()));
            decide(key, msg.attempt()).await
        }
    }));
    (calls, handle, running)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_in_offset_order_and_hands_on_what_it_cannot_do() {
    let cluster = Cluster::new(1);
    cluster.mock.create_topic("out", 1).unwrap();
    let store = Store::in_memory();
    let group = "batch";
    let scope = format!("kafka:{group}");
    // "taken" was leased by a consumer that died: its lease runs out before the batch.
    let Begin::Acquired(_dead) = IdempotencyStore::begin(
        &store,
        Key::new(&scope, "taken"),
        Fingerprint::of(b"p-taken"),
        Duration::from_millis(30),
    )
    .await
    .unwrap() else {
        panic!("fresh key")
    };
    tokio::time::sleep(Duration::from_millis(60)).await;

    let p = cluster.producer();
    let keys = [
        "f0", "f1", "f2", "slow-a", "f3", "retry-b", "f4", "fail-c", "send-d", "write-e", "f2",
        "f5", "taken", "f6", "bad-echo", "f1", "f7",
    ];
    for (i, key) in keys.iter().enumerate() {
        let id = format!("r{i}");
        // The second "f1" carries another payload: a mismatch.
        let payload = if *key == "f1" && i > 1 {
            "changed".to_owned()
        } else {
            format!("p-{key}")
        };
        let echo = if *key == "bad-echo" {
            "Content-Length: 1"
        } else {
            "X-Trace: t"
        };
        let headers = [
            ("idempotency-key", *key),
            ("reply-to", "replies"),
            ("x-request-id", id.as_str()),
            ("x-echo-set-header", echo),
        ];
        send(&p, key, &payload, &headers).await;
    }

    let (calls, handle, running) =
        start(&cluster, store.clone(), group, |key, attempt| async move {
            let reply = Outcome::reply(format!("done {key}"));
            match key.split('-').next().unwrap_or_default() {
                "slow" => {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Ok(reply)
                }
                "retry" if attempt == 1 => Err(HandlerError::retry("flaky")),
                "fail" => Err(HandlerError::fail("refused")),
                "send" => Ok(reply.send(Outgoing::to("out").payload(key.clone()))),
                "write" => Ok(reply.write(Write::put_if_absent(
                    OwnedKey::new("app", &key),
                    b"v".to_vec(),
                ))),
                _ => Ok(reply),
            }
        });
    let replies = read(&cluster, "replies", keys.len(), Duration::from_secs(20)).await;
    let out = read(&cluster, "out", 1, Duration::from_secs(5)).await;
    handle.shutdown();
    let stats = running.await.unwrap().unwrap();

    let calls = calls.lock().clone();
    // Offset order, one message at a time: the retry's second attempt comes before the next
    // message's first.
    assert!(
        calls.windows(2).all(|w| w[0].0 <= w[1].0),
        "out of order: {calls:?}"
    );
    let mut runs: HashMap<&str, Vec<u32>> = HashMap::new();
    for (_, key, attempt) in &calls {
        runs.entry(key).or_default().push(*attempt);
    }
    for key in keys {
        let want: &[u32] = match key {
            "bad-echo" => &[],
            "retry-b" => &[1, 2],
            // The dead consumer's attempt counts.
            "taken" => &[2],
            _ => &[1],
        };
        assert_eq!(
            runs.get(key).map_or(&[][..], Vec::as_slice),
            want,
            "{key}: {calls:?}"
        );
    }
    assert_eq!(replies.len(), keys.len(), "{replies:#?}");
    let reply = |id: &str| {
        replies
            .iter()
            .find(|r| r.header("x-request-id") == Some(id))
            .unwrap_or_else(|| panic!("no reply to {id}: {replies:#?}"))
    };
    for (i, key) in keys.iter().enumerate() {
        let r = reply(&format!("r{i}"));
        match (i, *key) {
            (7, _) => assert_eq!(r.header(ERROR), Some("refused")),
            (10, _) => {
                assert_eq!(r.header(REPLAYED), Some("true"));
                assert_eq!(r.payload, b"done f2");
            }
            (14, _) => assert!(r.header(ERROR).unwrap().contains("Content-Length")),
            (15, _) => assert!(r.header(ERROR).unwrap().contains("different payload")),
            (_, key) => {
                assert_eq!(r.header(ERROR), None, "{key}: {r:?}");
                assert_eq!(r.payload, format!("done {key}").as_bytes());
                assert_eq!(r.header("x-trace"), Some("t"), "{key}");
            }
        }
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].payload, b"send-d");
    assert!(matches!(
        IdempotencyStore::get(&store, Key::new("app", "write-e"))
            .await
            .unwrap(),
        Some(Snapshot::Value(_))
    ));
    assert_eq!(stats.processed, 13, "{stats:?}");
    assert_eq!(
        (stats.failed, stats.retried, stats.replayed, stats.rejected),
        (1, 1, 1, 2),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handler_in_a_long_batch_runs_under_a_live_lease() {
    // Twelve handlers of 60 ms each under a 300 ms lease: the batch's leases, all taken at
    // once, would run out before the last handlers start unless renewed before use.
    let cluster = Cluster::new(1);
    let store = Store::in_memory();
    let group = "long";
    let scope = format!("kafka:{group}");
    let p = cluster.producer();
    let n = 12;
    for i in 0..n {
        let key = format!("s{i}");
        send(&p, &key, "x", &[("idempotency-key", key.as_str())]).await;
    }
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let (checked, st) = (violations.clone(), store.clone());
    let processor = KafkaProcessor::builder(store.clone(), cluster.consumer(group))
        .topics(["requests"])
        .lease(Duration::from_millis(300))
        .build()
        .unwrap();
    let handle = processor.handle();
    let running = tokio::spawn(processor.run(move |msg: Incoming| {
        let (violations, store, scope) = (checked.clone(), st.clone(), scope.clone());
        async move {
            let key = key_of(&msg);
            let found = IdempotencyStore::get(&store, Key::new(&scope, &key)).await;
            match found {
                Ok(Some(Snapshot::InFlight { deadline, .. }))
                    if deadline.as_millis() > now_ms() => {}
                other => violations
                    .lock()
                    .push(format!("{key} started without a live lease: {other:?}")),
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
            Ok(Outcome::done())
        }
    }));
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while handle.stats().processed < n && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle.shutdown();
    let stats = running.await.unwrap().unwrap();
    assert_eq!(stats.processed, n, "{stats:?}");
    assert!(violations.lock().is_empty(), "{:?}", violations.lock());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_retried_and_the_partition_goes_on() {
    // "boom" panics at its first attempt (in the batch path) and "bang" at its first two (the
    // second is a retry, on the per-message path): each is retried after the backoff like a
    // handler's retryable error, the messages after them still run, in order, and every
    // message gets exactly one reply.
    let cluster = Cluster::new(1);
    let store = Store::in_memory();
    let p = cluster.producer();
    let keys = ["a", "boom", "b", "bang", "c"];
    for (i, key) in keys.iter().enumerate() {
        let id = format!("r{i}");
        let headers = [
            ("idempotency-key", *key),
            ("reply-to", "replies"),
            ("x-request-id", id.as_str()),
        ];
        send(&p, key, "x", &headers).await;
    }
    let (calls, handle, running) = start(&cluster, store, "panics", |key, attempt| async move {
        let times = match key.as_str() {
            "boom" => 1,
            "bang" => 2,
            _ => 0,
        };
        if attempt <= times {
            panic!("the handler of {key} panics at attempt {attempt}");
        }
        Ok(Outcome::reply(format!("done {key}")))
    });
    let replies = read(&cluster, "replies", keys.len(), Duration::from_secs(20)).await;
    // Nothing more comes: no message is replied to twice (a reader that waits long enough to
    // see everything already there).
    let extra = read(&cluster, "replies", keys.len() + 1, Duration::from_secs(3)).await;
    handle.shutdown();
    let stats = running.await.unwrap().unwrap();
    assert_eq!(extra.len(), keys.len(), "{extra:#?}");
    let calls = calls.lock().clone();
    let attempts =
        |k: &str| -> Vec<u32> { calls.iter().filter(|c| c.1 == k).map(|c| c.2).collect() };
    assert_eq!(attempts("boom"), [1, 2], "{calls:?}");
    assert_eq!(attempts("bang"), [1, 2, 3], "{calls:?}");
    for k in ["a", "b", "c"] {
        assert_eq!(attempts(k), [1], "{calls:?}");
    }
    assert!(
        calls.windows(2).all(|w| w[0].0 <= w[1].0),
        "out of order: {calls:?}"
    );
    for (i, key) in keys.iter().enumerate() {
        let id = format!("r{i}");
        let r = replies
            .iter()
            .find(|r| r.header("x-request-id") == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no reply to {id}: {replies:#?}"));
        assert_eq!(r.header(ERROR), None, "{key}: {r:?}");
        assert_eq!(r.payload, format!("done {key}").as_bytes());
    }
    assert_eq!((stats.processed, stats.retried), (5, 3), "{stats:?}");
}
