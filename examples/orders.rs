//! A retry storm against an order service on the embedded store.
//!
//! Clients send "create order" requests with an idempotency key and, like real clients behind
//! flaky networks, retry them: sometimes after the first attempt finished, sometimes while it
//! is still running, sometimes with a different body under the same key (a client bug). The
//! service runs each request through idemkv:
//!
//! - first attempt: runs the handler (creates the order) and stores the response;
//! - retry after completion: replays the stored response;
//! - retry while running: waits for the original (bounded) and replays it;
//! - same key, other body: refused as a mismatch.
//!
//! At the end it checks that every key created exactly one order and that every client saw the
//! same order id for its key, and prints the store's counters.
//!
//! `cargo run --release --example orders -- [--clients N] [--requests N] [--work-ms N]`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idemkv::{Begin, Error, Fingerprint, Key, Store};

const LEASE: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(5);

/// What the service answers.
#[derive(Debug)]
enum Reply {
    Created(String),
    Replayed(String),
    Mismatch,
    Busy,
}

struct Service {
    store: Store,
    next_order: AtomicU64,
    work: Duration,
    /// The orders table: the side effect that must happen once per key.
    orders: Mutex<Vec<(String, String)>>,
}

impl Service {
    fn create_order(&self, client: &str, key: &str, body: &str) -> Result<Reply, Error> {
        let scope = format!("{client}/POST /orders");
        let key = Key::new(&scope, key);
        let fp = Fingerprint::of(body.as_bytes());
        match self.store.blocking_begin_wait(key, fp, LEASE, MAX_WAIT)? {
            Begin::Acquired(lease) => {
                std::thread::sleep(self.work);
                let id = format!("ord-{:06}", self.next_order.fetch_add(1, Ordering::SeqCst));
                if let Ok(mut orders) = self.orders.lock() {
                    orders.push((id.clone(), body.to_owned()));
                }
                self.store.blocking_complete(&lease, id.as_bytes(), None)?;
                Ok(Reply::Created(id))
            }
            Begin::Completed(done) => Ok(Reply::Replayed(
                String::from_utf8_lossy(&done.response).into_owned(),
            )),
            Begin::Mismatch => Ok(Reply::Mismatch),
            Begin::InProgress { .. } => Ok(Reply::Busy),
        }
    }
}

/// A retry storm against an order service on the embedded store.
#[derive(clap::Parser)]
#[command(name = "orders")]
struct Args {
    /// Client threads (two share each client's keys).
    #[arg(long, default_value_t = 8)]
    clients: u64,
    /// Requests per client thread.
    #[arg(long, default_value_t = 2_000)]
    requests: u64,
    /// Time each order takes to create.
    #[arg(long, default_value_t = 1)]
    work_ms: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    let (clients, requests) = (args.clients, args.requests);
    let work = Duration::from_millis(args.work_ms);
    let service = Arc::new(Service {
        store: Store::in_memory(),
        next_order: AtomicU64::new(1),
        work,
        orders: Mutex::new(Vec::new()),
    });
    println!("{clients} clients x {requests} requests, each retried; handler takes {work:?}");
    let started = Instant::now();
    let seen: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let counts: Arc<Mutex<HashMap<&'static str, u64>>> = Arc::default();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (service, seen, counts) =
                (Arc::clone(&service), Arc::clone(&seen), Arc::clone(&counts));
            std::thread::spawn(move || -> Result<(), Error> {
                // Two threads per client share keys, so retries race with the original.
                let client = format!("client-{}", c / 2);
                for r in 0..requests {
                    let key = format!("{client}-order-{}", r % (requests / 2).max(1));
                    let body = if r % 97 == 0 && c % 2 == 1 {
                        r#"{"items":[{"sku":"id-1","count":2}]}"# // a buggy client reuses a key
                    } else {
                        r#"{"items":[{"sku":"id-17236","count":1}]}"#
                    };
                    let reply = service.create_order(&client, &key, body)?;
                    let kind = match &reply {
                        Reply::Created(_) => "created",
                        Reply::Replayed(_) => "replayed",
                        Reply::Mismatch => "mismatch (422)",
                        Reply::Busy => "busy (409)",
                    };
                    *counts.lock().expect("counts").entry(kind).or_default() += 1;
                    if let Reply::Created(id) | Reply::Replayed(id) = reply {
                        let mut seen = seen.lock().expect("seen");
                        let first = seen.entry(key.clone()).or_insert_with(|| id.clone());
                        assert_eq!(*first, id, "two different orders for {key}");
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "client thread panicked")??;
    }
    let elapsed = started.elapsed();
    let orders = service.orders.lock().map_err(|_| "poisoned")?.len();
    let keys = seen.lock().map_err(|_| "poisoned")?.len();
    println!("done in {elapsed:.2?}");
    let mut counts: Vec<_> = counts
        .lock()
        .map_err(|_| "poisoned")?
        .clone()
        .into_iter()
        .collect();
    counts.sort();
    for (kind, n) in counts {
        println!("  {kind:<15} {n}");
    }
    println!("distinct keys {keys}, orders created {orders}");
    println!("store: {:?}", service.store.stats());
    if orders != keys {
        return Err(format!("{orders} orders for {keys} keys: a request ran twice").into());
    }
    println!("ok: every key created exactly one order");
    Ok(())
}
