//! Token-based deduplication between two processors sharing one store, on the mock cluster:
//! the sender's messages carry tokens created with its result; the receiver processes a
//! message only while its token exists, deletes it with its result, and keeps no record per
//! message afterwards. Re-published copies and messages without a token are skipped.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemkv::Store;
use idemkv::kafka::{Incoming, KafkaProcessor, MockKafka, Outcome};
use idemkv::outbox::Outgoing;
use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn consumer(mock: &MockKafka, group: &str) -> ClientConfig {
    let mut c = mock.client_config();
    c.set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("auto.commit.interval.ms", "100");
    c
}

async fn produce(p: &FutureProducer, topic: &str, id: &str) {
    let hs = OwnedHeaders::new().insert(Header {
        key: "idempotency-key",
        value: Some(id),
    });
    let record = FutureRecord::to(topic).key(id).payload(id).headers(hs);
    p.send(record, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_lets_each_message_run_once_and_nothing_is_kept() {
    let mock = MockKafka::start(1).unwrap();
    mock.create_topic("orders", 2).unwrap();
    mock.create_topic("events", 2).unwrap();
    let store = Store::in_memory();
    let p: FutureProducer = mock.client_config().create().unwrap();
    for copy in 0..2 {
        for i in 0..10 {
            let _ = copy;
            produce(&p, "orders", &format!("o{i}")).await;
        }
    }

    // The sender: one event per order, with a token in the shared store.
    let sender = KafkaProcessor::builder(store.clone(), consumer(&mock, "sender"))
        .topics(["orders"])
        .build()
        .unwrap();
    let sender_handle = sender.handle();
    let sending = tokio::spawn(sender.run(|msg: Incoming| async move {
        let id = String::from_utf8_lossy(msg.idempotency_key()).into_owned();
        Ok(Outcome::done().send(
            Outgoing::to("events")
                .key(id.clone())
                .payload(id)
                .with_token("tokens"),
        ))
    }));
    // The receiver: runs an event only while its token exists.
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let counted = runs.clone();
    let receiver = KafkaProcessor::builder(store.clone(), consumer(&mock, "receiver"))
        .topics(["events"])
        .require_tokens("tokens")
        .build()
        .unwrap();
    let receiver_handle = receiver.handle();
    let receiving = tokio::spawn(receiver.run(move |msg: Incoming| {
        let runs = counted.clone();
        async move {
            let id = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
            *runs.lock().entry(id).or_default() += 1;
            Ok(Outcome::done())
        }
    }));
    let until = Instant::now() + Duration::from_secs(20);
    while runs.lock().len() < 10 {
        assert!(
            Instant::now() < until,
            "events not all received: {:?}",
            runs.lock()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A re-published copy of a processed event (its token is gone), and an event that was
    // never given a token: both skipped.
    produce(&p, "events", "o0/0").await;
    produce(&p, "events", "stray").await;
    let until = Instant::now() + Duration::from_secs(20);
    while receiver_handle.stats().untokened < 2 {
        assert!(
            Instant::now() < until,
            "copies not skipped: {:?}",
            receiver_handle.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sender_handle.shutdown();
    receiver_handle.shutdown();
    sending.await.unwrap().unwrap();
    let stats = receiving.await.unwrap().unwrap();

    assert!(runs.lock().values().all(|&n| n == 1), "{:?}", runs.lock());
    assert_eq!(stats.processed, 10);
    assert_eq!(stats.untokened, 2);
    // No token left, and the receiver keeps no record of the events it processed.
    assert!(
        store.scan(b"tokens").is_empty(),
        "tokens left: {:?}",
        store.scan(b"tokens")
    );
    store.sweep_expired();
    assert!(
        store.scan(b"kafka:receiver").is_empty(),
        "receiver records kept: {:?}",
        store.scan(b"kafka:receiver")
    );
}
