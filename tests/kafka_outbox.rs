//! The Kafka adapter's outbox, on librdkafka's mock cluster: messages a handler sends are
//! produced once each, after its result, under stable ids; a result whose messages could not
//! be produced is redelivered, and the redelivery produces them without running the handler.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idemkv::kafka::{Incoming, KafkaProcessor, MockKafka, Outcome};
use idemkv::outbox::Outgoing;
use idemkv::{Key, Snapshot, Store};
use parking_lot::Mutex;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

fn cluster() -> MockKafka {
    let mock = MockKafka::start(1).unwrap();
    mock.create_topic("requests", 2).unwrap();
    mock.create_topic("events", 1).unwrap();
    mock
}

fn consumer(mock: &MockKafka, group: &str) -> ClientConfig {
    let mut c = mock.client_config();
    c.set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("auto.commit.interval.ms", "100");
    c
}

async fn request(p: &FutureProducer, key: &str) {
    let hs = OwnedHeaders::new().insert(Header {
        key: "idempotency-key",
        value: Some(key),
    });
    let record = FutureRecord::to("requests")
        .key(key)
        .payload(key)
        .headers(hs);
    p.send(record, Duration::from_secs(5)).await.unwrap();
}

/// The `events` topic from the beginning: (idempotency-key header, key, payload), until `n`
/// arrived or 20 s passed, then 300 ms more to catch any extra copy.
async fn events(mock: &MockKafka, n: usize) -> Vec<(String, String, String)> {
    let mut config = mock.client_config();
    config.set("group.id", "test-reader");
    let consumer: StreamConsumer = config.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("events", 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if out.len() == n {
            until = until.min(tokio::time::Instant::now() + Duration::from_millis(300));
        }
        let Ok(Ok(m)) = tokio::time::timeout_at(until, consumer.recv()).await else {
            break;
        };
        let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
        let id = m
            .headers()
            .and_then(|hs| hs.iter().find(|h| h.key == "idempotency-key"))
            .map(|h| text(h.value))
            .unwrap_or_default();
        out.push((id, text(m.key()), text(m.payload())));
    }
    out
}

type Runs = Arc<Mutex<HashMap<String, u32>>>;

/// A handler that sends two events per request and counts its runs.
fn sender(
    runs: Runs,
) -> impl Fn(Incoming) -> std::future::Ready<Result<Outcome, idemkv::kafka::HandlerError>>
+ Send
+ Sync
+ 'static {
    move |msg: Incoming| {
        let key = String::from_utf8_lossy(msg.idempotency_key()).into_owned();
        *runs.lock().entry(key.clone()).or_default() += 1;
        let event = |kind: &str| {
            Outgoing::to("events")
                .key(key.clone())
                .header("idempotency-key", "the publisher sets this")
                .payload(format!("{kind} {key}"))
        };
        std::future::ready(Ok(Outcome::reply("ok")
            .send(event("accepted"))
            .send(event("billed"))))
    }
}

fn outbox_of(store: &Store, group: &str, key: &str) -> Option<Snapshot> {
    let scope = format!("kafka:{group}#outbox");
    store.blocking_get(Key::new(&scope, key)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_messages_are_produced_once_each_under_stable_ids() {
    let mock = cluster();
    let p: FutureProducer = mock.client_config().create().unwrap();
    for _copy in 0..2 {
        for k in 0..5 {
            request(&p, &format!("k{k}")).await;
        }
    }
    let store = Store::in_memory();
    let runs: Runs = Arc::default();
    let processor = KafkaProcessor::builder(store.clone(), consumer(&mock, "outbox"))
        .topics(["requests"])
        .build()
        .unwrap();
    let handle = processor.handle();
    let running = tokio::spawn(processor.run(sender(runs.clone())));
    let got = events(&mock, 10).await;
    handle.shutdown();
    let stats = running.await.unwrap().unwrap();

    assert_eq!(got.len(), 10, "{got:#?}");
    for k in 0..5 {
        let key = format!("k{k}");
        for (i, kind) in ["accepted", "billed"].iter().enumerate() {
            let id = format!("{key}/{i}");
            let copies: Vec<_> = got.iter().filter(|e| e.0 == id).collect();
            assert_eq!(copies.len(), 1, "{id}: {got:#?}");
            assert_eq!(copies[0].1, key);
            assert_eq!(copies[0].2, format!("{kind} {key}"));
        }
        // Produced in order: message 0 of a request before its message 1.
        let pos = |i: usize| got.iter().position(|e| e.0 == format!("{key}/{i}"));
        assert!(pos(0) < pos(1), "{got:#?}");
        assert_eq!(
            outbox_of(&store, "outbox", &key),
            None,
            "{key}'s outbox left behind"
        );
    }
    assert!(runs.lock().values().all(|&n| n == 1), "{:?}", runs.lock());
    assert_eq!(stats.sent, 10);
    assert_eq!(stats.processed, 5);
    assert_eq!(stats.replayed, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_not_produced_before_a_stop_are_produced_by_the_redelivery() {
    let mock = cluster();
    let p: FutureProducer = mock.client_config().create().unwrap();
    request(&p, "k-stuck").await;
    let store = Store::in_memory();
    let runs: Runs = Arc::default();

    // First run: the result commits, but the producer reaches no broker, so the outbox cannot
    // be flushed; the processor is stopped with the messages still recorded.
    let mut dead = ClientConfig::new();
    dead.set("bootstrap.servers", "127.0.0.1:1")
        .set("message.timeout.ms", "300");
    let processor = KafkaProcessor::builder(store.clone(), consumer(&mock, "stuck"))
        .topics(["requests"])
        .producer_config(dead)
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .shutdown_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let handle = processor.handle();
    let running = tokio::spawn(processor.run(sender(runs.clone())));
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while runs.lock().get("k-stuck").copied() != Some(1) {
        assert!(std::time::Instant::now() < until, "the handler never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The result and the outbox commit together; the outbox stays while the broker is away.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let Some(Snapshot::Value(v)) = outbox_of(&store, "stuck", "k-stuck") else {
        panic!("no outbox recorded with the result")
    };
    assert_eq!(&v.value[..2], b"O\x01");
    assert_eq!(&v.value[2..4], &0u16.to_le_bytes(), "nothing produced yet");
    handle.shutdown();
    let stats = running.await.unwrap().unwrap();
    assert_eq!(stats.sent, 0);
    assert_eq!(
        stats.offsets_stored, 0,
        "the offset was stored with the outbox not empty"
    );

    // Second run, with a working producer: the message comes again, its result is replayed
    // (the handler does not run), and the recorded messages go out.
    let processor = KafkaProcessor::builder(store.clone(), consumer(&mock, "stuck"))
        .topics(["requests"])
        .build()
        .unwrap();
    let handle = processor.handle();
    let ran = Arc::new(AtomicU32::new(0));
    let counted = ran.clone();
    let running = tokio::spawn(processor.run(move |msg: Incoming| {
        counted.fetch_add(1, Ordering::SeqCst);
        sender(Arc::default())(msg)
    }));
    let got = events(&mock, 2).await;
    handle.shutdown();
    let stats = running.await.unwrap().unwrap();
    let ids: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(ids, ["k-stuck/0", "k-stuck/1"]);
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the handler ran again");
    assert_eq!(stats.replayed, 1);
    assert_eq!(stats.sent, 2);
    assert_eq!(outbox_of(&store, "stuck", "k-stuck"), None);
}
