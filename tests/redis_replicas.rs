//! Two processes of the `http_orders` example sharing one Redis (`--redis URL`), over real
//! TCP: concurrent duplicates sent to both replicas create one order, and a replica killed
//! mid-request is taken over by the other after the lease deadline. The same on a real Redis
//! Cluster of the test's own (`--redis-cluster`, three masters with a replica each).
//!
//! Redis: `tests/support/redis.rs` (`IDEMKV_REDIS_URL`, or a `redis-server` of its own from
//! `PATH`); required under `CI=true`.
#![cfg(all(feature = "http", feature = "redis", not(loom)))]
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

#[path = "support/child.rs"]
mod child;
#[path = "support/http_client.rs"]
mod support;
use support::{Server, http};

const ORDER: &str = r#"{"items":[{"sku":"id-17236","count":1}]}"#;

#[path = "support/redis.rs"]
mod redis_support;

fn redis_url() -> Option<String> {
    redis_support::url()
}

/// A replica on `backend` (`--redis URL` or `--redis-cluster URLS …`).
fn replica(backend: &[String], work_ms: u64) -> Server {
    let work = work_ms.to_string();
    let mut args: Vec<&str> = backend.iter().map(String::as_str).collect();
    args.extend(["--work-ms", &work, "--lease-ms", "1000"]);
    Server::start("redis", &args)
}

fn post(addr: &str, key: &str) -> Option<(u16, bool, String)> {
    let (status, headers, body) = http(
        addr,
        "POST",
        "/orders",
        &[
            ("idempotency-key", key),
            ("prefer", "wait=15"),
            ("content-type", "application/json"),
        ],
        ORDER,
    )?;
    let id = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Some((status, headers.contains_key("idempotent-replayed"), id))
}

#[test]
fn duplicates_across_replicas_run_once_and_a_dead_replica_is_taken_over() {
    let Some(url) = redis_url() else { return };
    two_replicas(&["--redis".into(), url]);
}

#[test]
fn on_a_redis_cluster_too() {
    let Some(cluster) = redis_support::Cluster::start(3) else {
        return;
    };
    two_replicas(&[
        "--redis-cluster".into(),
        cluster.urls().join(","),
        "--redis-wait-replicas".into(),
        "1".into(),
    ]);
}

fn two_replicas(backend: &[String]) {
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let a = replica(backend, 200);
    let b = replica(backend, 200);

    // 1. Each key sent to both replicas at once, twice each.
    let mut handles = Vec::new();
    for k in 0..8 {
        for addr in [&a.addr, &b.addr, &a.addr, &b.addr] {
            let (addr, key) = (addr.clone(), format!("{run}-dup-{k}"));
            handles.push(std::thread::spawn(move || {
                (key.clone(), post(&addr, &key).unwrap())
            }));
        }
    }
    let mut ids = std::collections::HashMap::<String, HashSet<String>>::new();
    let mut fresh = 0;
    for h in handles {
        let (key, (status, replayed, id)) = h.join().unwrap();
        assert_eq!(status, 201, "{key}");
        fresh += usize::from(!replayed);
        ids.entry(key).or_default().insert(id);
    }
    assert_eq!(ids.len(), 8);
    assert!(
        ids.values().all(|s| s.len() == 1),
        "one order per key: {ids:?}"
    );
    assert_eq!(fresh, 8, "one fresh response per key, the rest replays");
    // The example's request log line (tower-http's TraceLayer through tracing).
    let fresh_line = "request{method=POST path=/orders}: response status=201 replayed=false";
    let created = a.count(fresh_line) + b.count(fresh_line);
    assert_eq!(
        created, 8,
        "the handler ran once per key over both replicas"
    );
    // Both replicas see the same orders.
    let (_, _, list) = http(&b.addr, "GET", "/orders", &[], "").unwrap();
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&list).unwrap();
    for set in ids.values() {
        let id = set.iter().next().unwrap();
        assert_eq!(
            listed.iter().filter(|o| o["id"] == id.as_str()).count(),
            1,
            "{id}"
        );
        // And each by its id (on a cluster `<uuid>{<key>}`: braces percent-encoded).
        let path = format!("/orders/{}", id.replace('{', "%7B").replace('}', "%7D"));
        let (status, _, one) = http(&a.addr, "GET", &path, &[], "").unwrap();
        assert_eq!(status, 200, "{path}");
        let one: serde_json::Value = serde_json::from_slice(&one).unwrap();
        assert_eq!(one["id"], id.as_str());
    }

    // 2. A replica dies holding a request: the other takes it over after the lease deadline.
    let mut slow = replica(backend, 5_000);
    let key = format!("{run}-takeover");
    let (addr, k) = (slow.addr.clone(), key.clone());
    let doomed = std::thread::spawn(move || post(&addr, &k));
    std::thread::sleep(Duration::from_millis(500));
    slow.kill();
    assert_eq!(
        doomed.join().unwrap(),
        None,
        "the client of the killed replica got no answer"
    );
    let (status, replayed, id) = post(&b.addr, &key).unwrap();
    assert_eq!(
        (status, replayed),
        (201, false),
        "run afresh by the survivor"
    );
    assert!(!id.is_empty());
    let (status, replayed, again) = post(&a.addr, &key).unwrap();
    assert_eq!((status, replayed, again), (201, true, id));
}
