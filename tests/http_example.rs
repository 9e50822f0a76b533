//! The `http_orders` example as a real process over real TCP on 127.0.0.1: replays are
//! byte-identical, concurrent duplicates create one order, and after a `SIGKILL` under load and
//! a restart, every response a client received is replayed identically, no order exists twice
//! and no balance is debited twice.
#![cfg(all(feature = "http", not(loom)))]

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

#[path = "support/child.rs"]
mod child;
#[path = "support/http_client.rs"]
mod support;
use support::{Server, http};

fn start(data: &Path, work_ms: u64) -> Server {
    let data = data.to_str().expect("utf-8 path");
    Server::start("", &["--work-ms", &work_ms.to_string(), "--data", data])
}

/// A response a client received: what was asked (path and key), status, body.
type Received = (String, u16, Vec<u8>);

const ORDER: &str = r#"{"items":[{"sku":"id-17236","count":1}]}"#;

fn order_ids(addr: &str) -> Vec<String> {
    let (s, _, body) = http(addr, "GET", "/orders", &[], "").expect("GET /orders");
    assert_eq!(s, 200);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&body).expect("json");
    list.iter()
        .map(|o| o["id"].as_str().expect("id").to_owned())
        .collect()
}

#[test]
fn replays_are_byte_identical_and_duplicates_create_one_order() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start(data.path(), 300);
    let a = &server.addr;
    // Concurrent duplicates: one runs; the others get 409, or wait and get the replay.
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let a = a.clone();
            std::thread::spawn(move || {
                let wait = if i % 2 == 0 { "wait=10" } else { "" };
                http(
                    &a,
                    "POST",
                    "/orders",
                    &[
                        ("idempotency-key", "dup-1"),
                        ("prefer", wait),
                        ("content-type", "application/json"),
                    ],
                    ORDER,
                )
                .expect("response")
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let created: Vec<_> = results.iter().filter(|r| r.0 == 201).collect();
    assert!(
        results.iter().all(|r| r.0 == 201 || r.0 == 409),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(
        created.iter().all(|r| r.2 == created[0].2),
        "every 201 carries the same order"
    );
    assert_eq!(order_ids(a).len(), 1, "one order for one key");
    // Byte-identical replay, and echo headers from the current request.
    // (The same request: the content type is part of the fingerprint.)
    let again = http(
        a,
        "POST",
        "/orders",
        &[
            ("idempotency-key", "dup-1"),
            ("x-request-id", "r-9"),
            ("content-type", "application/json"),
        ],
        ORDER,
    )
    .expect("replay");
    assert_eq!((again.0, &again.2), (201, &created[0].2));
    assert_eq!(again.1["idempotent-replayed"], "true");
    assert_eq!(again.1["x-request-id"], "r-9");
    // Scope: another client (other credentials) reusing the key gets its own order, never
    // the first client's response.
    let as_bob = http(
        a,
        "POST",
        "/orders",
        &[
            ("idempotency-key", "dup-1"),
            ("authorization", "Bearer bob"),
            ("content-type", "application/json"),
        ],
        ORDER,
    )
    .expect("bob");
    assert_eq!(as_bob.0, 201);
    assert_ne!(as_bob.2, created[0].2);
    assert!(!as_bob.1.contains_key("idempotent-replayed"));
    // Limits: a body over the fingerprint limit (1 MiB) is 413 before anything runs.
    let huge = format!(
        r#"{{"items":[{{"sku":"{}","count":1}}]}}"#,
        "x".repeat(1 << 20)
    );
    assert_eq!(
        http(a, "POST", "/orders", &[("idempotency-key", "big")], &huge)
            .expect("r")
            .0,
        413
    );
    // Mismatch and malformed keys.
    assert_eq!(
        http(
            a,
            "POST",
            "/orders",
            &[("idempotency-key", "dup-1")],
            r#"{"items":[{"sku":"x","count":2}]}"#
        )
        .expect("r")
        .0,
        422
    );
    assert_eq!(
        http(
            a,
            "POST",
            "/orders",
            &[("idempotency-key", "bad key")],
            ORDER
        )
        .expect("r")
        .0,
        400
    );
}

/// One burst of load against `addr` until the server dies: every 200/201 a client received.
fn load_until_killed(
    server: &mut Server,
    millis: u64,
    payments: usize,
    round: usize,
) -> Vec<Received> {
    let addr = server.addr.clone();
    let received: std::sync::Arc<std::sync::Mutex<Vec<Received>>> = Default::default();
    let clients: Vec<_> = (0..8)
        .map(|t| {
            let (addr, received) = (addr.clone(), std::sync::Arc::clone(&received));
            std::thread::spawn(move || {
                for i in 0..100_000 {
                    let (path, key) = if i % 2 == 0 {
                        ("/orders".to_owned(), format!("order-{round}-{t}-{}", i / 2))
                    } else {
                        (
                            format!("/payments/authorize/pay-{}", (i / 2 * 8 + t) % payments),
                            String::new(),
                        )
                    };
                    let headers: Vec<(&str, &str)> = if key.is_empty() {
                        vec![]
                    } else {
                        vec![("idempotency-key", key.as_str())]
                    };
                    let body = if key.is_empty() { "" } else { ORDER };
                    match http(&addr, "POST", &path, &headers, body) {
                        Some((s, _, b)) if s == 200 || s == 201 => {
                            received
                                .lock()
                                .expect("lock")
                                .push((format!("{path} {key}"), s, b));
                        }
                        Some(_) => {}
                        None => return, // killed
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(millis));
    server.kill();
    for c in clients {
        c.join().expect("client");
    }
    let received = std::mem::take(&mut *received.lock().expect("lock"));
    assert!(
        !received.is_empty(),
        "round {round}: the server acknowledged nothing before it was killed; its stderr:\n{}",
        server.stderr.text()
    );
    received
}

#[test]
fn sigkill_under_load_then_restart_keeps_every_answer() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = start(data.path(), 0);
    // Payments: 60 of 1.00 each from one customer (100.00 covers them all), stored up front.
    let payments = 60;
    for i in 0..payments {
        let body = r#"{"customer_id":"c1","amount":"1.00"}"#;
        let put = http(
            &server.addr,
            "PUT",
            &format!("/payments/authorize/pay-{i}"),
            &[],
            body,
        );
        assert_eq!(put.expect("PUT").0, 202);
    }
    // Several kills at random-ish moments under load; after each restart, everything any client
    // ever received is replayed identically.
    let mut received = Vec::new();
    for round in 0..5 {
        received.extend(load_until_killed(
            &mut server,
            150 + 70 * round as u64,
            payments,
            round,
        ));
        server = start(data.path(), 0);
        for (what, status, body) in &received {
            let (path, key) = what.split_once(' ').expect("what");
            let headers: Vec<(&str, &str)> = if key.is_empty() {
                vec![]
            } else {
                vec![("idempotency-key", key)]
            };
            let replay = http(
                &server.addr,
                "POST",
                path,
                &headers,
                if key.is_empty() { "" } else { ORDER },
            )
            .expect("replay");
            assert_eq!(
                (replay.0, &replay.2),
                (*status, body),
                "round {round}: {what}"
            );
            assert_eq!(
                replay.1.get("idempotent-replayed").map(String::as_str),
                Some("true"),
                "{what}"
            );
        }
    }
    assert!(
        received.len() > 50,
        "too little load before the kills: {}",
        received.len()
    );
    eprintln!(
        "5 kills under load, {} acknowledged answers replayed after each restart",
        received.len()
    );
    let addr = &server.addr;
    // No order exists twice; every order a client saw exists.
    let ids = order_ids(addr);
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    for (what, _, body) in received.iter().filter(|r| r.0.starts_with("/orders")) {
        let v: serde_json::Value = serde_json::from_slice(body).expect("json");
        assert!(
            unique.contains(&v["id"].as_str().expect("id").to_owned()),
            "{what}"
        );
    }
    // Run every payment now (those done replay): each is debited exactly once. A payment a
    // kill cut short is held by the dead process's lease (30 s): 409 with Retry-After until
    // it runs out, then it is taken over and runs, once.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(45);
    for i in 0..payments {
        loop {
            let (s, headers, _) = http(
                addr,
                "POST",
                &format!("/payments/authorize/pay-{i}"),
                &[],
                "",
            )
            .expect("POST");
            if s == 409 && std::time::Instant::now() < until {
                assert!(
                    headers.contains_key("retry-after"),
                    "409 without Retry-After"
                );
                std::thread::sleep(std::time::Duration::from_millis(500));
                continue;
            }
            assert_eq!(s, 200, "pay-{i}");
            break;
        }
    }
    let (_, _, body) = http(addr, "GET", "/accounts/c1", &[], "").expect("account");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        v["balance"], "40.00",
        "60 payments of 1.00 from 100.00, each exactly once"
    );
}
