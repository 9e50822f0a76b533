//! An order service over Kafka on the embedded store: each order request is processed once,
//! however often it is delivered, and its reply is matched to the request by headers.
//!
//! `cargo run --release --features kafka --example kafka_orders -- --mock`
//!
//! Flags (`--help` lists them): `--brokers HOST:PORT` (a real cluster) or `--mock`
//! (librdkafka's in-process mock cluster on 127.0.0.1; its address is printed); `--requests`,
//! `--group`, `--data`, `--durability immediate|batched|none`, `--dead-letter`,
//! `--commit-interval-ms`, `--fetch-wait-ms` and `--session-timeout-ms` (librdkafka's
//! settings; short values suit the mock cluster); `--demo N` sends N orders, each twice,
//! through the requester helper, checks that both replies name the same order, prints a
//! summary and exits.
//!
//! `--instance-id ID` makes this process a static member of its group (`group.instance.id`):
//! restarted after a crash, it gets its partitions back at once instead of after the dead
//! process's session. The default, `auto`, is `kafka_orders-<host name>-<digest of the data
//! directory's path>`: one member per data directory and host, the same across restarts.
//! `none` turns static membership off. Several processes on one host sharing Redis need
//! their own `--instance-id` each (or their own `--data`).
//!
//! `--redis redis://127.0.0.1:6379` (built with `--features kafka,redis`) keeps the state in
//! Redis instead of the data directory, so several processes can form one consumer group:
//! a partition moved from one to another keeps its exactly-once record.
//!
//! A request is `{"items":[{"sku":"id-17236","count":1}]}` with headers `reply-to: <topic>`
//! and, optionally, `idempotency-key`, `x-request-id`, `x-echo-set-header: Name: value`. The
//! reply is `{"id":<uuid>,"items":[…]}`; the order is stored atomically with the record of the
//! request, so the same idempotency key always yields the same order id, across restarts.

#[path = "support/common.rs"]
mod common;

use common::{DurabilityArg, shutdown_signal};
use std::time::Duration;

use idemkv::kafka::{
    HandlerError, Incoming, KafkaProcessor, MockKafka, Outcome, Request, Requester,
};
use idemkv::{Either, Fingerprint, OwnedKey, Store, Write};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone)]
struct Item {
    sku: String,
    count: u32,
}

#[derive(Deserialize)]
struct NewOrder {
    items: Vec<Item>,
}

#[derive(Serialize)]
struct Order<'a> {
    id: &'a str,
    items: &'a [Item],
}

/// An order service over Kafka on the embedded store.
#[derive(clap::Parser)]
#[command(name = "kafka_orders")]
struct Args {
    /// A real cluster's bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092", conflicts_with = "mock")]
    brokers: String,
    /// librdkafka's in-process mock cluster on 127.0.0.1 instead (its address is printed).
    #[arg(long)]
    mock: bool,
    /// The request topic.
    #[arg(long, default_value = "orders.requests")]
    requests: String,
    /// The consumer group.
    #[arg(long, default_value = "orders")]
    group: String,
    /// The store's data directory.
    #[arg(long, default_value = "./data/kafka_orders")]
    data: String,
    /// When a write is acknowledged: after its fsync, within 10 ms, or never synced.
    #[arg(long, value_enum, default_value = "immediate")]
    durability: DurabilityArg,
    /// The dead-letter topic.
    #[arg(long, default_value = "orders.dead")]
    dead_letter: String,
    /// librdkafka's `auto.commit.interval.ms`.
    #[arg(long, default_value_t = 5000)]
    commit_interval_ms: u64,
    /// librdkafka's `fetch.wait.max.ms`.
    #[arg(long)]
    fetch_wait_ms: Option<u64>,
    /// librdkafka's `session.timeout.ms` (the heartbeat is a tenth of it).
    #[arg(long)]
    session_timeout_ms: Option<u64>,
    /// Static group membership: this member's `group.instance.id`; `auto` derives it from
    /// the host name and the data directory, `none` turns it off.
    #[arg(long, default_value = "auto")]
    instance_id: String,
    /// Keep the state in Redis at this URL instead (built with `--features kafka,redis`).
    #[arg(long)]
    redis: Option<String>,
    /// With `--redis`: start even if the server may evict keys under memory pressure (see
    /// `RedisStoreBuilder::allow_eviction`; refused by default).
    #[arg(long)]
    redis_allow_eviction: bool,
    /// Send N orders, each twice, check both replies name the same order, and exit.
    #[arg(long, default_value_t = 0)]
    demo: usize,
}

/// Creates the order. Runs once per idempotency key: a redelivery is answered from the store.
async fn create_order(msg: Incoming) -> Result<Outcome, HandlerError> {
    let key = String::from_utf8_lossy(msg.idempotency_key()).into_owned();
    let order: NewOrder = serde_json::from_slice(msg.payload().unwrap_or_default())
        .map_err(|e| HandlerError::fail(format!("expected {{\"items\":[…]}}: {e}")))?;
    if order.items.is_empty() || order.items.iter().any(|i| i.count == 0) {
        return Err(HandlerError::fail(
            "an order needs items with a count of at least 1",
        ));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::to_vec(&Order {
        id: &id,
        items: &order.items,
    })
    .map_err(|e| HandlerError::fail(e.to_string()))?;
    println!("created order {id} (key {key})");
    Ok(Outcome::reply(body.clone())
        .header("content-type", "application/json")
        // The order itself, committed atomically with the record of this request.
        .write(Write::put_if_absent(OwnedKey::new("orders", &id), body)))
}

/// `kafka_orders-<host>-<digest of the data directory's absolute path>`: stable across
/// restarts of the process that owns that directory.
fn auto_instance_id(data: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let path = std::path::absolute(data).unwrap_or_else(|_| data.into());
    // A fixed, specified hash (XXH3-128, the request fingerprint's), so the id survives
    // restarts and rebuilds; 8 of its bytes are plenty to tell directories apart.
    let digest = Fingerprint::of(path.as_os_str().as_encoded_bytes());
    let hex: String = digest.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("kafka_orders-{host}-{hex}")
}

/// The Redis store with the `redis` feature; without it `--redis` is refused.
#[cfg(feature = "redis")]
type Remote = idemkv::redis::RedisStore;
#[cfg(not(feature = "redis"))]
type Remote = Store;

#[cfg(feature = "redis")]
async fn redis_store(
    url: &str,
    allow_eviction: bool,
) -> Result<Either<Store, Remote>, Box<dyn std::error::Error>> {
    let store = idemkv::redis::RedisStore::builder(url)
        .allow_eviction(allow_eviction)
        .connect()
        .await?;
    println!("state in Redis at {url}");
    Ok(Either::Right(store))
}

#[cfg(not(feature = "redis"))]
async fn redis_store(
    _: &str,
    _: bool,
) -> Result<Either<Store, Remote>, Box<dyn std::error::Error>> {
    Err(
        "--redis needs the redis feature: cargo run --features kafka,redis --example kafka_orders"
            .into(),
    )
}

async fn demo(
    config: &ClientConfig,
    requests: &str,
    n: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let requester = Requester::new(config, "orders.replies").await?;
    let mut same = 0;
    for i in 0..n {
        let key = format!("demo-{}-{i}", std::process::id());
        let body = format!(r#"{{"items":[{{"sku":"id-{}","count":1}}]}}"#, 17236 + i);
        let mut ids = Vec::new();
        for _ in 0..2 {
            let reply = requester
                .request(
                    requests,
                    Request::new(body.clone())
                        .key(key.clone())
                        .idempotency_key(key.clone())
                        .header("x-echo-set-header", "X-Demo: yes"),
                    Duration::from_secs(10),
                )
                .await?;
            let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
            println!(
                "reply to {}: {} replayed={} x-demo={:?}",
                reply.request_id().unwrap_or("?"),
                String::from_utf8_lossy(&reply.payload),
                reply.is_replayed(),
                reply.header("x-demo").map(String::from_utf8_lossy),
            );
            ids.push(v["id"].as_str().unwrap_or_default().to_owned());
        }
        if ids[0] == ids[1] && !ids[0].is_empty() {
            same += 1;
        }
    }
    println!("demo: {same} of {n} orders got the same id on both deliveries");
    if same != n {
        return Err("a duplicate request created a second order".into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    let (requests, group, data, dead) = (
        args.requests.clone(),
        args.group.clone(),
        args.data.clone(),
        args.dead_letter.clone(),
    );
    let durability = args.durability.durability();
    let commit_ms = args.commit_interval_ms;
    let demo_n = args.demo;

    let mock = if args.mock {
        let mock = MockKafka::start(1)?;
        for (topic, partitions) in [
            (&requests, 3),
            (&"orders.replies".to_owned(), 1),
            (&dead, 1),
        ] {
            mock.create_topic(topic, partitions)?;
        }
        println!("mock cluster: {}", mock.bootstrap_servers());
        println!("topics: {requests} (requests), orders.replies (replies), {dead} (dead letters)");
        Some(mock)
    } else {
        None
    };
    let brokers = match &mock {
        Some(m) => m.bootstrap_servers().to_owned(),
        None => args.brokers.clone(),
    };
    let mut client = match &mock {
        // Short fetch waits and sessions: see `MockKafka::client_config`.
        Some(m) => m.client_config(),
        None => ClientConfig::new(),
    };
    client.set("bootstrap.servers", &brokers);
    if let Some(wait) = args.fetch_wait_ms {
        client.set("fetch.wait.max.ms", wait.to_string());
    }
    if let Some(session) = args.session_timeout_ms {
        client.set("session.timeout.ms", session.to_string());
        client.set("heartbeat.interval.ms", (session / 10).max(10).to_string());
    }

    let store = match &args.redis {
        Some(url) => redis_store(url, args.redis_allow_eviction).await?,
        None => {
            let store = Store::builder().durability(durability).open(&data)?;
            if let Some(r) = store.recovery_report() {
                println!(
                    "opened {data}: {} records from the checkpoint, {} log records replayed",
                    r.checkpoint_records, r.records
                );
            }
            Either::Left(store)
        }
    };
    let mut consumer = client.clone();
    consumer
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("auto.commit.interval.ms", commit_ms.to_string());
    let mut builder = KafkaProcessor::builder(store, consumer)
        .topics([requests.as_str()])
        .dead_letter_topic(dead)
        .lease(Duration::from_secs(10));
    let member = match args.instance_id.as_str() {
        "none" => "dynamic".to_owned(),
        "auto" => auto_instance_id(&data),
        id => id.to_owned(),
    };
    if args.instance_id != "none" {
        builder = builder.static_membership(&member);
    }
    let processor = builder.build()?;
    let handle = processor.handle();
    let running = tokio::spawn(processor.run(create_order));
    println!("consuming {requests} as group {group} (member {member}); Ctrl-C stops");

    let outcome = if demo_n > 0 {
        demo(&client, &requests, demo_n).await
    } else {
        shutdown_signal().await;
        Ok(())
    };
    handle.shutdown();
    let stats = running.await??;
    println!(
        "stopped: {} processed, {} replayed, {} failed, {} dead-lettered, {} replies",
        stats.processed, stats.replayed, stats.failed, stats.dead_lettered, stats.replies
    );
    outcome
}
