//! `kafka_orders` as real processes on a real, separate Kafka-protocol broker (tansu, installed
//! by `tests/support/tansu.rs`), with requests streaming in the whole time:
//!
//! 1. A static member (`--instance-id`) is SIGKILLed mid-stream and restarted at once: it gets
//!    its partitions back without waiting out the dead process's session, and processing
//!    resumes within the issue's 10 s (the figure is printed). Every request is answered, and
//!    each idempotency key has one order, however often it was delivered.
//! 2. Three members on one Redis form a consumer group (dynamic membership); one is
//!    SIGKILLed for good: its partitions move to the two survivors once its session ends,
//!    every request is answered, and no key gets a second order. (With static membership a
//!    member that never returns keeps its partitions: on tansu 0.6 they were still not
//!    reassigned 60 s later, so a group that scales down uses dynamic ids.)
//!
//! Required under `CI=true` (the support module fails the run without the broker).
#![cfg(all(feature = "kafka", not(loom)))]
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

#[path = "support/child.rs"]
mod child;
#[path = "support/kafka_orders.rs"]
mod kafka_orders;
use kafka_orders::Orders;
#[path = "support/tansu.rs"]
mod tansu;
use tansu::Tansu;

const SESSION_MS: &str = "6000";

/// A group member: `kafka_orders` on `brokers`, in `group`, with the member id `instance`
/// (`none`: dynamic membership) and the store flags `store`.
fn member(name: &str, instance: &str, brokers: &str, group: &str, store: &[&str]) -> Orders {
    let mut args = vec![
        "--brokers",
        brokers,
        "--requests",
        "requests",
        "--group",
        group,
        "--dead-letter",
        "dead",
        "--instance-id",
        instance,
        "--commit-interval-ms",
        "500",
        "--fetch-wait-ms",
        "10",
        "--session-timeout-ms",
        SESSION_MS,
    ];
    args.extend_from_slice(store);
    Orders::start(name, &args)
}

/// A clean stop (SIGTERM), waited for: it must exit successfully.
fn stop(mut m: Orders) {
    m.terminate();
    let status = m.child.wait().unwrap();
    assert!(
        status.success(),
        "{} stopped with {status}:\n{}",
        m.name,
        m.stderr.text()
    );
}

fn create_topics(brokers: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin: AdminClient<_> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        let topics = [
            NewTopic::new("requests", 3, TopicReplication::Fixed(1)),
            NewTopic::new("replies", 1, TopicReplication::Fixed(1)),
            NewTopic::new("dead", 1, TopicReplication::Fixed(1)),
        ];
        for r in admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .unwrap()
        {
            r.unwrap();
        }
    });
}

/// Per request key: when its first reply came, and the order ids its replies named.
type Replies = HashMap<String, (Instant, HashSet<String>)>;

/// The test side: sends one request every `every` while `sending` is set (key `<run>-<n>`),
/// and reads every reply. Replies per key: the order ids they name, and when the first came.
struct Traffic {
    sent: Arc<AtomicUsize>,
    sending: Arc<AtomicBool>,
    replies: Arc<Mutex<Replies>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(brokers: &str, run: &str, every: Duration) -> Traffic {
        let t = Traffic {
            sent: Arc::default(),
            sending: Arc::new(AtomicBool::new(true)),
            replies: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        };
        let (brokers_, run, sent, sending, stop) = (
            brokers.to_owned(),
            run.to_owned(),
            t.sent.clone(),
            t.sending.clone(),
            t.stop.clone(),
        );
        let producer = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let p: FutureProducer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers_)
                    .set("linger.ms", "0")
                    .create()
                    .unwrap();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    if sending.load(Ordering::Relaxed) {
                        let key = format!("{run}-{n}");
                        let body = format!(r#"{{"items":[{{"sku":"{key}","count":1}}]}}"#);
                        let headers = OwnedHeaders::new()
                            .insert(Header {
                                key: "reply-to",
                                value: Some("replies"),
                            })
                            .insert(Header {
                                key: "idempotency-key",
                                value: Some(&key),
                            })
                            .insert(Header {
                                key: "x-request-id",
                                value: Some(&key),
                            });
                        p.send(
                            FutureRecord::to("requests")
                                .key(&key)
                                .payload(&body)
                                .headers(headers),
                            Duration::from_secs(5),
                        )
                        .await
                        .unwrap();
                        n += 1;
                        sent.store(n, Ordering::Relaxed);
                    }
                    tokio::time::sleep(every).await;
                }
            });
        });
        let (brokers_, replies, stop) = (brokers.to_owned(), t.replies.clone(), t.stop.clone());
        let reader = std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers_)
                .set("group.id", "test-reader")
                .set("fetch.wait.max.ms", "10")
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset("replies", 0, Offset::Beginning)
                .unwrap();
            c.assign(&tpl).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let Some(Ok(m)) = c.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let header = |name: &str| {
                    m.headers().and_then(|h| {
                        h.iter()
                            .find(|x| x.key.eq_ignore_ascii_case(name))
                            .and_then(|x| x.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                };
                let Some(key) = header("x-request-id") else {
                    continue;
                };
                let id =
                    serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default())
                        .ok()
                        .and_then(|v| v["id"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| {
                            format!("<no order: {:?}>", m.payload().map(String::from_utf8_lossy))
                        });
                replies
                    .lock()
                    .unwrap()
                    .entry(key)
                    .or_insert_with(|| (Instant::now(), HashSet::new()))
                    .1
                    .insert(id);
            }
        });
        Traffic {
            threads: vec![producer, reader],
            ..t
        }
    }

    fn answered(&self) -> usize {
        self.replies.lock().unwrap().len()
    }

    /// Waits until `n` distinct requests have replies.
    fn wait_answered(&self, n: usize, within: Duration, members: &[&Orders]) {
        let until = Instant::now() + within;
        while self.answered() < n {
            assert!(
                Instant::now() < until,
                "{} of {n} requests answered within {within:?}; members' stderr:\n{}",
                self.answered(),
                members
                    .iter()
                    .map(|m| m.stderr.text())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops sending; every sent request must then get its reply.
    fn drain(&self, members: &[&Orders]) -> usize {
        self.sending.store(false, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
        let sent = self.sent.load(Ordering::Relaxed);
        self.wait_answered(sent, Duration::from_secs(60), members);
        sent
    }

    /// One order id per key, over every reply it got.
    fn check_one_order_per_key(&self) {
        let replies = self.replies.lock().unwrap();
        let split: Vec<_> = replies
            .iter()
            .filter(|(_, (_, ids))| ids.len() != 1)
            .collect();
        assert!(
            split.is_empty(),
            "keys answered with different orders: {split:?}"
        );
    }

    fn stop(self) -> Replies {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.replies).unwrap().into_inner().unwrap()
    }
}

/// The two tests run one after the other: each starts a broker and several processes, and
/// the resume figure should not depend on the other's load.
static SERIAL: Mutex<()> = Mutex::new(());

fn run_id() -> String {
    format!(
        "r{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    )
}

#[test]
fn a_killed_static_member_resumes_at_once_and_nothing_runs_twice() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(broker) = Tansu::start() else { return };
    let brokers = broker.bootstrap();
    create_topics(&brokers);
    let data = tempfile::tempdir().unwrap();
    let store = ["--data".to_owned(), data.path().display().to_string()];
    let store: Vec<&str> = store.iter().map(String::as_str).collect();
    let run = run_id();
    let mut first = member("orders-0", "orders-0", &brokers, "orders", &store);
    let traffic = Traffic::start(&brokers, &run, Duration::from_millis(20));
    traffic.wait_answered(40, Duration::from_secs(60), &[&first]);

    first.kill();
    let killed = Instant::now();
    let second = member("orders-0", "orders-0", &brokers, "orders", &store);
    let restarted = Instant::now();
    // Resumed: a request sent after the kill is answered.
    let after_kill = traffic.sent.load(Ordering::Relaxed);
    let until = Instant::now() + Duration::from_secs(60);
    let resumed = loop {
        let replies = traffic.replies.lock().unwrap();
        let first_new = (after_kill..after_kill + 1000)
            .filter_map(|n| replies.get(&format!("{run}-{n}")).map(|(at, _)| *at))
            .min();
        if let Some(at) = first_new {
            break at;
        }
        drop(replies);
        assert!(
            Instant::now() < until,
            "processing never resumed:\n{}",
            second.stderr.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let resume = resumed.saturating_duration_since(restarted);
    eprintln!(
        "resumed {resume:?} after the restart ({:?} after the kill), session.timeout.ms={SESSION_MS}",
        resumed.saturating_duration_since(killed)
    );
    assert!(
        resume < Duration::from_secs(10),
        "a restarted static member must resume within 10 s; it took {resume:?}"
    );

    let sent = traffic.drain(&[&second]);
    traffic.check_one_order_per_key();
    let runs = first.created().len() + second.created().len();
    stop(second);
    let replies = traffic.stop();
    assert_eq!(replies.len(), sent);
    // The store holds one order per key: a redelivered request was replayed, never re-run
    // to a second order (a handler run cut short by the kill left nothing behind).
    let store = idemkv::Store::builder().open(data.path()).unwrap();
    let orders: HashMap<String, usize> =
        store
            .scan(b"orders")
            .into_iter()
            .fold(HashMap::new(), |mut m, (_, snap)| {
                if let idemkv::Snapshot::Value(v) = snap {
                    let v: serde_json::Value = serde_json::from_slice(&v.value).unwrap();
                    *m.entry(v["items"][0]["sku"].as_str().unwrap().to_owned())
                        .or_default() += 1;
                }
                m
            });
    assert_eq!(orders.len(), sent, "one order per request");
    assert!(
        orders.values().all(|n| *n == 1),
        "a key with two orders: {orders:?}"
    );
    eprintln!(
        "{sent} requests, {runs} handler runs, {} orders",
        orders.len()
    );
}

#[cfg(feature = "redis")]
#[path = "support/redis.rs"]
mod redis_support;

#[cfg(feature = "redis")]
#[test]
fn three_members_on_redis_lose_one_and_the_survivors_take_its_partitions() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(url) = redis_support::url() else {
        return;
    };
    let Some(broker) = Tansu::start() else { return };
    let brokers = broker.bootstrap();
    create_topics(&brokers);
    let run = run_id();
    let group = format!("orders-{run}");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut members: Vec<Orders> = (0..3)
        .map(|i| {
            let data = dirs[i].path().display().to_string();
            member(
                &format!("member-{i}"),
                "none",
                &brokers,
                &group,
                &["--redis", &url, "--data", &data],
            )
        })
        .collect();
    let traffic = Traffic::start(&brokers, &run, Duration::from_millis(20));
    traffic.wait_answered(
        60,
        Duration::from_secs(90),
        &members.iter().collect::<Vec<_>>(),
    );
    // Every member has had work (the group spread the three partitions).
    let busy = members.iter().filter(|m| !m.created().is_empty()).count();
    eprintln!("{busy} of 3 members processed requests before the kill");

    let mut dead = members.remove(0);
    dead.kill();
    let killed_runs = dead.created();
    // Keep sending through the rebalance, then drain: every request answered.
    std::thread::sleep(Duration::from_secs(2));
    let sent = traffic.drain(&members.iter().collect::<Vec<_>>());
    traffic.check_one_order_per_key();
    let survivors: Vec<String> = members.iter().flat_map(Orders::created).collect();
    for m in members {
        stop(m);
    }
    let replies = traffic.stop();
    assert_eq!(replies.len(), sent);
    // No key got a second order: a key the dead member had run was not run again elsewhere
    // to a new order (its replies above all name one order), and Redis holds one per key.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let orders = rt.block_on(async {
        let store = idemkv::redis::RedisStore::builder(&url)
            .connect()
            .await
            .unwrap();
        store.scan(b"orders").await.unwrap()
    });
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for (_, snap) in orders {
        if let idemkv::Snapshot::Value(v) = snap {
            let v: serde_json::Value = serde_json::from_slice(&v.value).unwrap();
            let sku = v["items"][0]["sku"].as_str().unwrap_or_default().to_owned();
            if sku.starts_with(&format!("{run}-")) {
                *per_key.entry(sku).or_default() += 1;
            }
        }
    }
    assert_eq!(per_key.len(), sent, "one order per request");
    assert!(per_key.values().all(|n| *n == 1), "a key with two orders");
    eprintln!(
        "{sent} requests; the killed member ran {}, the survivors {}",
        killed_runs.len(),
        survivors.len()
    );
}
