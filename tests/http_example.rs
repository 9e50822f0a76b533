//! The `http_orders` example as a real process over real TCP on 127.0.0.1: replays are
//! byte-identical, concurrent duplicates create one order, and after a `SIGKILL` under load and
//! a restart, every response a client received is replayed identically, no order exists twice
//! and no balance is debited twice.
#![cfg(all(feature = "http", not(loom)))]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The example binary, built now so it is never stale (`cargo test` with a filter does not
/// rebuild examples; this is a no-op when it is up to date).
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--example", "http_orders"]);
    if release {
        cargo.arg("--release");
    }
    assert!(cargo.status().expect("cargo build").success());
    dir.join("examples").join("http_orders")
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(data: &Path, work_ms: u64) -> Server {
        let mut child = Command::new(example())
            .args(["--listen", "127.0.0.1:0", "--work-ms", &work_ms.to_string()])
            .arg("--data")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the example");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the example exited before listening")
                .expect("line");
            if let Some(a) = line.strip_prefix("listening on http://") {
                break a.to_owned();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 exchange: (status, lower-cased headers, body), or `None` if the connection
/// failed (the server was killed).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, HashMap<String, String>, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((status, headers, raw[split + 4..].to_vec()))
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
    let server = Server::start(data.path(), 300);
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
    std::mem::take(&mut *received.lock().expect("lock"))
}

#[test]
fn sigkill_under_load_then_restart_keeps_every_answer() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(data.path(), 0);
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
        server = Server::start(data.path(), 0);
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
    // Run every payment now (those done replay): each is debited exactly once.
    for i in 0..payments {
        let (s, _, _) = http(
            addr,
            "POST",
            &format!("/payments/authorize/pay-{i}"),
            &[],
            "",
        )
        .expect("POST");
        assert_eq!(s, 200);
    }
    let (_, _, body) = http(addr, "GET", "/accounts/c1", &[], "").expect("account");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        v["balance"], "40.00",
        "60 payments of 1.00 from 100.00, each exactly once"
    );
}
