//! End-to-end exactly-once under crashes: `http_orders` (the payments service) and `billing`
//! (a Kafka consumer that calls it through `invoke_http`) run as child processes against the
//! mock cluster, which lives in this test process. BillCustomer requests are sent, each several
//! times, while both processes are `SIGKILL`ed — billing right after it logs each phase of a
//! call (PUT, POST, the follow-up's result, DELETE) or at a random moment, http_orders at random
//! moments — and restarted. Then every order must have debited its account exactly once, all
//! replies to one order agree, each order has one billing event after deduplication by its
//! key, and neither process keeps any call or outbox state.
//!
//! `IDEMKV_BILLING_KILLS=200 cargo test --release --features kafka --test billing_crash` for a
//! soak (default 20 kills).
#![cfg(all(feature = "kafka", not(loom)))]
#![allow(clippy::unwrap_used)]

#[path = "support/child.rs"]
mod child;
#[path = "support/http_client.rs"]
mod http_client;
#[path = "support/kafka.rs"]
mod kafka_support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idemkv::Snapshot;
use idemkv::kafka::MockKafka;
use rdkafka::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// One of the two services, as a child process whose stdout lines are kept.
struct Proc {
    name: &'static str,
    exe: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    stderr: child::Stderr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn new(name: &'static str, exe: PathBuf, args: Vec<String>) -> Proc {
        let mut p = Proc {
            name,
            exe,
            args,
            child: None,
            stderr: child::Stderr::default(),
            lines: Arc::default(),
        };
        p.start();
        p
    }

    fn start(&mut self) {
        let mut child = Command::new(&self.exe)
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.stderr = child::Stderr::capture(&mut child, self.name);
        let out = child.stdout.take().unwrap();
        let sink = self.lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
    }

    fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits (up to `within`) for a line containing `needle` after line `from`.
    fn wait_for(&self, needle: &str, from: usize, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            let lines = self.lines.lock().unwrap();
            if lines[from.min(lines.len())..]
                .iter()
                .any(|l| l.contains(needle))
            {
                return true;
            }
            drop(lines);
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// `SIGKILL`; fails the test if the process had died on its own.
    fn kill(&mut self) {
        let mut c = self.child.take().unwrap();
        child::sigkill(&mut c, &self.stderr, self.name);
    }

    /// `SIGTERM`, and waits for a clean exit.
    fn stop(&mut self) {
        let mut c = self.child.take().unwrap();
        let pid = c.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = c.wait().unwrap();
        assert!(
            status.success(),
            "{} stopped with {status}; stderr:\n{}",
            self.name,
            self.stderr.text()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A small xorshift generator: the kill schedule is random but printed, so a failure repeats.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const CUSTOMERS: usize = 8;

fn order(i: usize) -> (String, String, &'static str) {
    // Every eighth order asks for more than any balance: it fails, once.
    let amount = if i % 8 == 7 { "500.00" } else { "10.00" };
    (format!("order-{i}"), format!("c{}", i % CUSTOMERS), amount)
}

async fn send(p: &FutureProducer, i: usize, copy: usize) {
    let (id, customer, amount) = order(i);
    let body = format!(r#"{{"order_id":"{id}","customer_id":"{customer}","amount":"{amount}"}}"#);
    let rid = format!("{id}/{copy}");
    let hs = OwnedHeaders::new()
        .insert(Header {
            key: "idempotency-key",
            value: Some(id.as_str()),
        })
        .insert(Header {
            key: "reply-to",
            value: Some("billing.replies"),
        })
        .insert(Header {
            key: "x-request-id",
            value: Some(rid.as_str()),
        })
        .insert(Header {
            key: "x-echo-set-header",
            value: Some("X-Copy: yes"),
        });
    let record = FutureRecord::to("billing.requests")
        .key(&id)
        .payload(&body)
        .headers(hs);
    p.send(record, Duration::from_secs(10)).await.unwrap();
}

/// Every message of `topic` so far: (headers, key, payload as JSON).
async fn read_all(
    mock: &MockKafka,
    topic: &str,
) -> Vec<(HashMap<String, String>, String, serde_json::Value)> {
    let consumer = kafka_support::reader(mock.client_config(), topic);
    let mut out = Vec::new();
    // A new consumer takes a moment to fetch; after the first message, 500 ms of silence ends.
    let mut wait = Duration::from_secs(10);
    while let Ok(Ok(m)) = tokio::time::timeout(wait, consumer.recv()).await {
        wait = Duration::from_millis(500);
        let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
        let headers = kafka_support::text_headers(&m);
        let json = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_default();
        out.push((headers, text(m.key()), json));
    }
    out
}

fn records_in(dir: &Path, scopes: &[&str]) -> Vec<String> {
    let copy = idemkv::tools::read_dir(dir).unwrap();
    let mut left = Vec::new();
    for scope in scopes {
        for (id, snap) in copy.store.scan(scope.as_bytes()) {
            let kind = match snap {
                Snapshot::Value(_) => "value",
                Snapshot::Pending { .. } => "pending",
                Snapshot::InFlight { .. } => "in flight",
                Snapshot::Completed(_) => "completed",
            };
            left.push(format!("{scope} {} ({kind})", String::from_utf8_lossy(&id)));
        }
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_is_exactly_once_through_kills_of_both_processes() {
    let kills: usize = std::env::var("IDEMKV_BILLING_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed = std::env::var("IDEMKV_BILLING_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("kill schedule seed {seed} (IDEMKV_BILLING_SEED={seed} repeats it)");
    let mut rng = Rng(seed);

    let mock = MockKafka::start(1).unwrap();
    for (t, n) in [
        ("billing.requests", 3),
        ("billing.follow-up", 3),
        ("billing.replies", 1),
        ("billing.events", 1),
    ] {
        mock.create_topic(t, n).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let (orders_dir, billing_dir) = (tmp.path().join("http_orders"), tmp.path().join("billing"));
    let port = free_port();
    let payments = format!("127.0.0.1:{port}");
    let mut orders = Proc::new(
        "http_orders",
        http_client::example("http_orders", ""),
        ["--listen", &payments, "--durability", "immediate", "--data"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([orders_dir.display().to_string()])
            .collect(),
    );
    assert!(
        orders.wait_for("listening on", 0, Duration::from_secs(30)),
        "http_orders did not start"
    );
    let billing_args: Vec<String> = [
        "--brokers",
        mock.bootstrap_servers(),
        "--payments-url",
        &format!("http://{payments}"),
        "--durability",
        "immediate",
        "--commit-interval-ms",
        "200",
        "--session-timeout-ms",
        "1000",
        "--data",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([billing_dir.display().to_string()])
    .collect();
    let mut billing = Proc::new(
        "billing",
        http_client::example("billing", "kafka"),
        billing_args,
    );
    assert!(
        billing.wait_for("consuming", 0, Duration::from_secs(30)),
        "billing did not start"
    );

    // Load: new orders keep coming during the kills, each sent twice at once and once later.
    let producer: FutureProducer = mock.client_config().create().unwrap();
    let total = (kills * 3).max(24);
    let feeder = {
        let producer = producer.clone();
        tokio::spawn(async move {
            for i in 0..total {
                send(&producer, i, 0).await;
                send(&producer, i, 1).await;
                if i >= 3 {
                    send(&producer, i - 3, 2).await;
                }
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };

    let phases = [
        "PUT: request stored",
        "POST: the call ran",
        "reply and event recorded",
        "DELETE: the call is forgotten",
    ];
    let mut killed = HashMap::<&str, usize>::new();
    for k in 0..kills {
        let what = match k % 6 {
            p @ 0..=3 => phases[p],
            4 => "billing at random",
            _ => "http_orders at random",
        };
        let (proc, needle) = match what {
            "http_orders at random" => (&mut orders, None),
            "billing at random" => (&mut billing, None),
            phase => (&mut billing, Some(phase)),
        };
        let from = proc.len();
        let hit = match needle {
            Some(n) => {
                tokio::task::block_in_place(|| proc.wait_for(n, from, Duration::from_secs(10)))
            }
            None => {
                tokio::time::sleep(Duration::from_millis(50 + rng.next() % 400)).await;
                true
            }
        };
        tokio::task::block_in_place(|| proc.kill());
        *killed
            .entry(if hit {
                what
            } else {
                "billing, phase not reached: at random"
            })
            .or_default() += 1;
        tokio::time::sleep(Duration::from_millis(rng.next() % 100)).await;
        proc.start();
    }
    eprintln!("kills: {killed:?}");
    feeder.await.unwrap();
    // Every order once more, after the last kill: each gets a reply from a stable system.
    for i in 0..total {
        send(&producer, i, 3).await;
    }

    // Wait for every order's last copy to be answered.
    let until = Instant::now() + Duration::from_secs(120);
    let replies = loop {
        let replies = read_all(&mock, "billing.replies").await;
        let last: HashSet<String> = replies
            .iter()
            .filter_map(|r| {
                r.0.get("x-request-id")
                    .filter(|id| id.ends_with("/3"))
                    .cloned()
            })
            .collect();
        if last.len() == total {
            break replies;
        }
        assert!(
            Instant::now() < until,
            "only {} of {total} final copies answered",
            last.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Let the last follow-ups finish their DELETEs, then stop both cleanly.
    tokio::task::block_in_place(|| {
        let mut quiet = billing.len();
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_secs(2));
            let now = billing.len();
            if now == quiet {
                break;
            }
            assert!(
                Instant::now() < until,
                "billing never went quiet; its last lines:\n{}",
                billing.lines.lock().unwrap()[now.saturating_sub(30)..].join("\n")
            );
            quiet = now;
        }
    });
    let balances: HashMap<String, String> = (0..CUSTOMERS)
        .map(|c| {
            let customer = format!("c{c}");
            let (status, _, body) =
                http_client::http(&payments, "GET", &format!("/accounts/{customer}"), &[], "")
                    .unwrap();
            assert_eq!(status, 200);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            (customer, v["balance"].as_str().unwrap().to_owned())
        })
        .collect();
    tokio::task::block_in_place(|| {
        billing.stop();
        orders.stop();
    });
    let events = read_all(&mock, "billing.events").await;

    // Replies: every order answered; all replies to one order agree on status and payment id.
    let mut outcome: HashMap<String, (String, String)> = HashMap::new();
    for (headers, _, v) in &replies {
        let order = v["order_id"].as_str().unwrap_or_default().to_owned();
        let got = (
            v["status"].as_str().unwrap_or_default().to_owned(),
            v["payment_id"].as_str().unwrap_or_default().to_owned(),
        );
        assert_eq!(
            headers.get("x-copy").map(String::as_str),
            Some("yes"),
            "echo header missing: {headers:?}"
        );
        let first = outcome.entry(order.clone()).or_insert_with(|| got.clone());
        assert_eq!(*first, got, "{order}: replies disagree");
    }
    assert_eq!(outcome.len(), total, "orders answered");
    for i in 0..total {
        let (id, _, amount) = order(i);
        let want = if amount == "500.00" {
            "failed"
        } else {
            "succeeded"
        };
        assert_eq!(outcome[&id].0, want, "{id}");
        assert!(!outcome[&id].1.is_empty(), "{id}: no payment id");
    }
    // Balances: each succeeded order debited its customer once.
    for c in 0..CUSTOMERS {
        let succeeded = (0..total)
            .filter(|&i| i % CUSTOMERS == c && order(i).2 == "10.00")
            .count();
        let want = format!("{}.00", 100 - 10 * succeeded as i64);
        assert_eq!(
            balances[&format!("c{c}")],
            want,
            "customer c{c}: {succeeded} payments"
        );
    }
    // Events: once per order after deduplication by the idempotency key, with the payment id.
    let mut by_order: HashMap<String, HashSet<String>> = HashMap::new();
    for (headers, key, v) in &events {
        by_order
            .entry(key.clone())
            .or_default()
            .insert(headers["idempotency-key"].clone());
        assert_eq!(
            v["payment_id"].as_str().unwrap_or_default(),
            outcome[key].1,
            "{key}: event's payment id"
        );
    }
    assert_eq!(by_order.len(), total, "orders with an event");
    assert!(
        by_order.values().all(|ids| ids.len() == 1),
        "an order has two distinct events: {by_order:?}"
    );
    // Nothing left behind on either side.
    let left = records_in(
        &orders_dir,
        &["payments/authorize", "payments/authorize#outbox"],
    );
    assert!(
        left.is_empty(),
        "the payments service still holds: {left:?}"
    );
    let left = records_in(
        &billing_dir,
        &["kafka:billing#outbox", "kafka:billing#calls"],
    );
    assert!(left.is_empty(), "billing still holds: {left:?}");
}
