//! The `kafka_orders` example as a real process against the mock cluster (which lives in this
//! test process) over TCP: a consumer `SIGKILL`ed after its handlers ran and their results
//! were recorded, but before any offset was committed, does not run the work again after a
//! restart — it re-sends the recorded replies, with each request's own correlation and echo
//! headers — and a graceful stop commits its offsets.
#![cfg(all(feature = "kafka", not(loom)))]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use idemkv::kafka::{ERROR, MockKafka, REPLAYED};
use rdkafka::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[path = "support/child.rs"]
mod child;
#[path = "support/kafka_orders.rs"]
mod kafka_orders;
#[path = "support/kafka.rs"]
mod kafka_support;
use kafka_orders::Orders;

fn start(brokers: &str, data: &Path) -> Orders {
    let data = data.to_str().unwrap();
    Orders::start(
        "kafka_orders",
        &[
            "--brokers",
            brokers,
            "--requests",
            "requests",
            "--group",
            "orders",
            "--dead-letter",
            "dead",
            "--durability",
            "immediate",
            // No offset is committed in the background while it runs: a kill loses them all.
            "--commit-interval-ms",
            "3600000",
            "--fetch-wait-ms",
            "10",
            "--session-timeout-ms",
            "1000",
            "--data",
            data,
        ],
    )
}

#[derive(Debug)]
struct Reply {
    headers: HashMap<String, String>,
    order_id: String,
}

/// Reads the reply topic from the start until `n` replies.
async fn replies(brokers: &str, n: usize) -> Vec<Reply> {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("fetch.wait.max.ms", "10");
    let consumer = kafka_support::reader(config, "replies");
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} replies", out.len()))
            .unwrap();
        let headers = kafka_support::text_headers(&m);
        let body: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())
            .unwrap_or(serde_json::Value::Null);
        out.push(Reply {
            headers,
            order_id: body["id"].as_str().unwrap_or_default().to_owned(),
        });
    }
    out
}

async fn request(p: &FutureProducer, key: &str, request_id: &str) {
    let trace = format!("X-Trace: {request_id}");
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "idempotency-key",
            value: Some(key),
        })
        .insert(Header {
            key: "reply-to",
            value: Some("replies"),
        })
        .insert(Header {
            key: "x-request-id",
            value: Some(request_id),
        })
        .insert(Header {
            key: "x-echo-set-header",
            value: Some(&trace),
        });
    let body = r#"{"items":[{"sku":"id-17236","count":1}]}"#;
    let record = FutureRecord::to("requests")
        .key(key)
        .payload(body)
        .headers(headers);
    p.send(record, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_the_commit_replays_instead_of_running_again() {
    let kafka = MockKafka::start(1).unwrap();
    for (topic, partitions) in [("requests", 3), ("replies", 1), ("dead", 1)] {
        kafka.create_topic(topic, partitions).unwrap();
    }
    let brokers = kafka.bootstrap_servers().to_owned();
    let producer: FutureProducer = kafka.client_config().create().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Run 1: 30 orders and 10 duplicates, all answered; then SIGKILL before any commit.
    let mut first = start(&brokers, dir.path());
    for i in 0..30 {
        request(&producer, &format!("k{i}"), &format!("r{i}")).await;
    }
    for i in 0..10 {
        request(&producer, &format!("k{i}"), &format!("r{i}-dup")).await;
    }
    let before = replies(&brokers, 40).await;
    let created_first = first.created();
    assert_eq!(created_first.len(), 30, "{created_first:?}");
    first.kill();

    // Run 2 on the same store: all 40 messages are redelivered; none runs again.
    let second = start(&brokers, dir.path());
    let all = replies(&brokers, 80).await;
    assert!(
        second.created().is_empty(),
        "ran again: {:?}",
        second.created()
    );

    let order_of: HashMap<String, String> = before
        .iter()
        .filter(|r| !r.headers.contains_key(REPLAYED))
        .map(|r| (r.headers["x-request-id"].clone(), r.order_id.clone()))
        .collect();
    assert_eq!(order_of.len(), 30, "one fresh reply per key");
    for r in &all {
        assert!(!r.headers.contains_key(ERROR), "{r:?}");
        let id = &r.headers["x-request-id"];
        assert_eq!(
            r.headers.get("x-trace"),
            Some(id),
            "echo header of its own request"
        );
        let key = id.trim_start_matches('r').trim_end_matches("-dup");
        assert_eq!(
            r.order_id,
            order_of[&format!("r{key}")],
            "same order for {id}"
        );
    }
    let replayed_after_restart = all[40..]
        .iter()
        .filter(|r| r.headers.get(REPLAYED).map(String::as_str) == Some("true"))
        .count();
    assert_eq!(replayed_after_restart, 40);

    // A graceful stop commits: the next run processes only what is new.
    second.terminate();
    let mut second = second;
    assert!(second.child.wait().unwrap().success());
    let mut third = start(&brokers, dir.path());
    request(&producer, "k-new", "r-new").await;
    let all = replies(&brokers, 81).await;
    assert_eq!(all[80].headers["x-request-id"], "r-new");
    assert_eq!(third.created(), vec!["k-new".to_owned()]);
    third.terminate();
    let stopped = third.wait_for_line("stopped:");
    assert!(
        stopped.starts_with("stopped: 1 processed, 0 replayed"),
        "{stopped}"
    );
}
