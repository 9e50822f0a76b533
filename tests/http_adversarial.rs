//! The `http_orders` example as a hostile client meets it: a real process over real TCP on
//! 127.0.0.1. Every request that reaches the application is answered with a clear 4xx and
//! `application/problem+json` — never a 5xx, a hang or a crash — and stored state stays right
//! (no order created by a refused request, no balance debited twice, earlier keys still
//! replay). Requests hyper refuses before any application code (bytes that are not HTTP, more
//! than 100 header lines) get hyper's own bare 400/431, and the server keeps serving.
#![cfg(all(feature = "http", not(loom)))]

use std::io::{Read, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

#[path = "support/child.rs"]
mod child;
#[path = "support/http_client.rs"]
mod support;
use support::{Server, http};

const ORDER: &str = r#"{"items":[{"sku":"id-17236","count":1}]}"#;

fn start(data: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--data", data.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    Server::start("", &args)
}

/// A response as raw parts: status, every header line (lower-cased names, in order), body.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    /// A clear 4xx with a problem body of type `kind`.
    fn problem(&self, status: u16, kind: &str) {
        assert_eq!(self.status, status, "{kind}: {}", self.body);
        assert_eq!(
            self.get("content-type"),
            Some("application/problem+json"),
            "{kind}"
        );
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body));
        assert_eq!(
            v["type"],
            format!("urn:idemkv:problem:{kind}"),
            "{}",
            self.body
        );
        assert_eq!(v["status"], status);
    }
}

/// Writes `request` as is and reads the whole answer (the request asks to close). `None` if
/// the server closed without answering.
fn exchange(addr: &str, request: &[u8]) -> Option<Raw> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // The server may answer and close before reading all of a hostile request.
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("no answer within 20 s: {e}"),
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> Option<Raw> {
    let (status, headers, mut body) = support::parse_response(raw)?;
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v == "chunked")
    {
        body = dechunk(&body);
    }
    Some(Raw {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}

/// One request, built from parts, with `Connection: close` and a correct `Content-Length`.
fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (n, v) in headers {
        r.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

/// A `POST /orders` of a JSON body in the given chunks (`Transfer-Encoding: chunked`): the
/// server reads one body frame a chunk.
fn post_chunked(addr: &str, key: &str, chunks: &[&[u8]]) -> Raw {
    let mut r = format!(
        "POST /orders HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nIdempotency-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for c in chunks {
        r.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        r.extend_from_slice(c);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"0\r\n\r\n");
    exchange(addr, &r).expect("an answer")
}

fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Raw {
    exchange(addr, &request(method, path, headers, body.as_bytes())).expect("an answer")
}

fn post_order(addr: &str, headers: &[(&str, &str)]) -> Raw {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(addr, "POST", "/orders", &h, ORDER)
}

fn order_count(addr: &str) -> usize {
    let (s, _, body) = http(addr, "GET", "/orders", &[], "").expect("GET /orders");
    assert_eq!(s, 200);
    serde_json::from_slice::<Vec<serde_json::Value>>(&body)
        .expect("json")
        .len()
}

#[test]
fn hostile_keys_are_400_and_create_nothing() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = start(data.path(), &[]);
    let a = server.addr.clone();
    let long = "k".repeat(256);
    let huge = "k".repeat(16 * 1024);
    let mut cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("idempotency-key", "k1"), ("idempotency-key", "k2")],
        vec![("idempotency-key", "")],
        vec![("idempotency-key", "\"\"")],
        vec![("idempotency-key", "has space")],
        vec![("idempotency-key", &long)],
        vec![("idempotency-key", &huge)],
    ];
    for h in cases.drain(..) {
        post_order(&a, &h).problem(400, "invalid-key");
    }
    // Non-ASCII bytes in the key (hyper passes obs-text through to the layer).
    let mut req = request(
        "POST",
        "/orders",
        &[("content-type", "application/json")],
        ORDER.as_bytes(),
    );
    let at = req.windows(4).position(|w| w == b"\r\n\r\n").expect("head");
    req.splice(
        at + 2..at + 2,
        b"Idempotency-Key: cl\xc3\xa9-\xff\r\n".iter().copied(),
    );
    exchange(&a, &req)
        .expect("answer")
        .problem(400, "invalid-key");
    assert_eq!(order_count(&a), 0, "a refused key created an order");
    // A good key still works, once.
    let first = post_order(&a, &[("idempotency-key", "good-1")]);
    let again = post_order(&a, &[("idempotency-key", "good-1")]);
    assert_eq!((first.status, again.status), (201, 201));
    assert_eq!(first.body, again.body);
    assert_eq!(order_count(&a), 1);
    server.kill();
}

#[test]
fn oversized_endless_and_malformed_bodies() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = start(data.path(), &[]);
    let a = server.addr.clone();
    let big = "x".repeat(2 << 20);
    for key in [Some("big-1"), None] {
        let mut h = vec![("content-type", "application/json")];
        h.extend(key.map(|k| ("idempotency-key", k)));
        send(&a, "POST", "/orders", &h, &big).problem(413, "body-too-large");
    }

    // An endless chunked body: answered 413 once past the limit; the writer gives up at 8 MiB.
    let mut s = TcpStream::connect(&a).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"POST /orders HTTP/1.1\r\nHost: t\r\nIdempotency-Key: endless-1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .expect("head");
    let mut writer = s.try_clone().expect("clone");
    let feeder = std::thread::spawn(move || {
        let chunk = format!("10000\r\n{}\r\n", "y".repeat(0x10000));
        for _ in 0..128 {
            if writer.write_all(chunk.as_bytes()).is_err() {
                return;
            }
        }
    });
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse(&raw)
        .expect("an answer")
        .problem(413, "body-too-large");
    feeder.join().expect("feeder");

    // Malformed JSON: 400, kept as the key's outcome; the same key with a good body is 422.
    for bad in [
        "{",
        "not json",
        "{\"items\":\"x\"}",
        "{\"items\":[{\"sku\":1,\"count\":-1}]}",
        "\u{0}\u{1}",
    ] {
        send(
            &a,
            "POST",
            "/orders",
            &[("content-type", "application/json")],
            bad,
        )
        .problem(400, "bad-request");
    }
    let h = [
        ("content-type", "application/json"),
        ("idempotency-key", "bad-json"),
    ];
    send(&a, "POST", "/orders", &h, "{").problem(400, "bad-request");
    let replay = send(&a, "POST", "/orders", &h, "{");
    replay.problem(400, "bad-request");
    assert_eq!(replay.get("idempotent-replayed"), Some("true"));
    send(&a, "POST", "/orders", &h, ORDER).problem(422, "key-reused");
    assert_eq!(order_count(&a), 0);
    server.kill();
}

#[test]
fn a_body_sent_in_chunks_is_the_same_request_as_one_sent_whole() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = start(data.path(), &[]);
    let a = server.addr.clone();
    let order = ORDER.as_bytes();
    let bytes: Vec<&[u8]> = order.chunks(1).collect();
    let uneven: [&[u8]; 3] = [&order[..3], &order[3..20], &order[20..]];

    // Sent whole, then repeated in one-byte chunks and in uneven ones: replays of one order.
    let first = post_order(&a, &[("idempotency-key", "chunks-1")]);
    assert_eq!(first.status, 201, "{}", first.body);
    for chunks in [&bytes[..], &uneven[..]] {
        let again = post_chunked(&a, "chunks-1", chunks);
        assert_eq!(again.status, 201, "{}", again.body);
        assert_eq!(again.get("idempotent-replayed"), Some("true"));
        assert_eq!(again.body, first.body);
    }
    // Sent in chunks first, then whole: the same.
    let chunked = post_chunked(&a, "chunks-2", &uneven);
    assert_eq!(chunked.status, 201, "{}", chunked.body);
    assert_eq!(chunked.get("idempotent-replayed"), None);
    let whole = post_order(&a, &[("idempotency-key", "chunks-2")]);
    assert_eq!(whole.get("idempotent-replayed"), Some("true"));
    assert_eq!(whole.body, chunked.body);
    // One byte changed in one chunk is another request under a used key.
    let changed = ORDER.replace("\"count\":1", "\"count\":2");
    let changed = changed.as_bytes();
    post_chunked(&a, "chunks-1", &[&changed[..10], &changed[10..]]).problem(422, "key-reused");
    assert_eq!(order_count(&a), 2);
    server.kill();
}

#[test]
fn garbage_prefer_values_are_ignored() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = start(data.path(), &[]);
    let a = server.addr.clone();
    let long = format!("wait={}", "9".repeat(3000));
    for (i, prefer) in [
        "wait=abc",
        "wait=-1",
        "wait=99999999999999999999999999",
        "wait",
        "wait=",
        ",,,;;;",
        "wait=1e9, respond-async",
        "return=minimal; wait=1",
        &long,
    ]
    .iter()
    .enumerate()
    {
        let key = format!("prefer-{i}");
        let r = post_order(&a, &[("idempotency-key", &key), ("prefer", prefer)]);
        assert_eq!(r.status, 201, "{prefer}: {}", r.body);
    }
    assert_eq!(order_count(&a), 9);
    server.kill();
}

#[test]
fn echo_header_abuse_is_refused_and_never_set() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = start(data.path(), &[]);
    let a = server.addr.clone();
    for abuse in [
        "Alt-Svc: h2=\"evil.example:443\"; ma=2592000",
        "Refresh: 0; url=https://evil.example/",
        "Cache-Control: public, max-age=31536000",
        "Expires: Thu, 01 Dec 2099 16:00:00 GMT",
        "Vary: *",
        "X-Frame-Options: ALLOWALL",
        "X-Content-Type-Options: none",
        "Content-Disposition: attachment; filename=evil.exe",
        "Link: <https://evil.example/x.js>; rel=preload; as=script",
        "Clear-Site-Data: \"*\"",
        "Cross-Origin-Resource-Policy: cross-origin",
        "Report-To: {\"group\":\"g\",\"endpoints\":[{\"url\":\"https://evil.example\"}]}",
        "Set-Cookie: session=stolen",
        "Location: https://evil.example/",
        "Content-Length: 0",
        "X-Accel-Redirect: /internal/",
        "Strict-Transport-Security: max-age=0",
    ] {
        let r = post_order(
            &a,
            &[("idempotency-key", "echo-1"), ("x-echo-set-header", abuse)],
        );
        r.problem(400, "invalid-echo-header");
        let name = abuse.split(':').next().expect("name").to_ascii_lowercase();
        if name != "content-length" {
            assert!(r.get(&name).is_none(), "{abuse} was set");
        }
    }
    assert_eq!(order_count(&a), 0, "a refused echo request ran the handler");
    // Custom names are echoed.
    let ok = post_order(
        &a,
        &[
            ("idempotency-key", "echo-2"),
            ("x-request-id", "r-1"),
            ("x-echo-set-header", "Inventory-Sku: id-17236"),
        ],
    );
    assert_eq!(ok.status, 201);
    assert_eq!(ok.get("inventory-sku"), Some("id-17236"));
    assert_eq!(ok.get("x-request-id"), Some("r-1"));

    // 90 echo headers (within hyper's 100 lines): the layer's own 431, problem+json.
    let many: Vec<String> = (0..90).map(|i| format!("X-E{i}: v")).collect();
    let mut h: Vec<(&str, &str)> = vec![("idempotency-key", "echo-3")];
    h.extend(many.iter().map(|e| ("x-echo-set-header", e.as_str())));
    post_order(&a, &h).problem(431, "echo-headers-too-large");
    // Thousands: hyper refuses the head itself (431, no body) before any layer runs.
    let thousands: Vec<String> = (0..5000).map(|i| format!("X-E{i}: v")).collect();
    let mut h: Vec<(&str, &str)> = vec![("idempotency-key", "echo-4")];
    h.extend(thousands.iter().map(|e| ("x-echo-set-header", e.as_str())));
    let r = post_order(&a, &h);
    assert_eq!(r.status, 431, "{}", r.body);
    assert_eq!(order_count(&a), 1);
    // Still serving.
    assert_eq!(post_order(&a, &[("idempotency-key", "echo-5")]).status, 201);
    server.kill();
}

#[test]
fn cookie_clients_never_see_each_others_orders_or_cookies() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = start(data.path(), &[]);
    let a = server.addr.clone();
    let alice = post_order(
        &a,
        &[("idempotency-key", "shared"), ("cookie", "sid=alice")],
    );
    let bob = post_order(&a, &[("idempotency-key", "shared"), ("cookie", "sid=bob")]);
    assert_eq!((alice.status, bob.status), (201, 201));
    assert_ne!(alice.body, bob.body, "bob received alice's order");
    assert!(bob.get("idempotent-replayed").is_none());
    // Each got its own cookie on the first response.
    let id = |r: &Raw| {
        serde_json::from_str::<serde_json::Value>(&r.body).expect("json")["id"]
            .as_str()
            .expect("id")
            .to_owned()
    };
    assert_eq!(alice.all("set-cookie").len(), 1);
    assert!(alice.all("set-cookie")[0].starts_with(&format!("last_order={}", id(&alice))));
    // Alice's retry replays her order, without any cookie.
    let again = post_order(
        &a,
        &[("idempotency-key", "shared"), ("cookie", "sid=alice")],
    );
    assert_eq!(again.body, alice.body);
    assert_eq!(again.get("idempotent-replayed"), Some("true"));
    assert!(
        again.all("set-cookie").is_empty(),
        "a stored Set-Cookie was replayed"
    );
    assert_eq!(order_count(&a), 2);
    server.kill();
}

#[test]
fn garbage_and_half_sent_requests_do_not_stop_other_clients() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = start(data.path(), &[]);
    let a = server.addr.clone();
    // Half-sent requests, held open; and empty lines, which HTTP/1.1 says to skip while
    // waiting for a request.
    let mut blank = TcpStream::connect(&a).expect("connect");
    blank.write_all(b"\r\n\r\n\r\n").expect("blank");
    let half: Vec<TcpStream> = (0..8)
        .map(|i| {
            let mut s = TcpStream::connect(&a).expect("connect");
            let part = format!("POST /orders HTTP/1.1\r\nHost: t\r\nIdempotency-Key: half-{i}\r\nContent-Length: 100\r\n\r\n{{\"items\"");
            s.write_all(part.as_bytes()).expect("half");
            s
        })
        .collect();
    // Garbage: whatever hyper answers (400), it never takes the server down.
    for junk in [
        &b"\x00\x01\x02\x03\xff\xfe garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /orders HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /orders HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ] {
        if let Some(r) = exchange(&a, junk) {
            assert!((400..500).contains(&r.status), "{}", r.status);
        }
    }
    // Meanwhile other clients are served.
    for i in 0..20 {
        let key = format!("served-{i}");
        assert_eq!(post_order(&a, &[("idempotency-key", &key)]).status, 201);
    }
    // Unknown routes and methods answer problem+json too.
    send(&a, "GET", "/nowhere", &[], "").problem(404, "not-found");
    send(&a, "DELETE", "/orders", &[], "").problem(405, "request-refused");
    drop((half, blank));
    assert_eq!(order_count(&a), 20);
    server.kill();
}

#[test]
fn the_exactly_once_protocol_misused() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = start(data.path(), &[]);
    let a = server.addr.clone();
    let pay = |id: &str, method: &str, body: &str| {
        send(
            &a,
            method,
            &format!("/payments/authorize/{id}"),
            &[("content-type", "application/json")],
            body,
        )
    };
    let balance = || {
        let (_, _, b) = http(&a, "GET", "/accounts/c1", &[], "").expect("balance");
        serde_json::from_slice::<serde_json::Value>(&b).expect("json")["balance"]
            .as_str()
            .expect("balance")
            .to_owned()
    };
    // PUT after POST: 409; the stored response stays.
    assert_eq!(
        pay("p1", "PUT", r#"{"customer_id":"c1","amount":"12.50"}"#).status,
        202
    );
    let done = pay("p1", "POST", "");
    assert_eq!(done.status, 200, "{}", done.body);
    pay("p1", "PUT", r#"{"customer_id":"c1","amount":"99.00"}"#).problem(409, "already-processed");
    let replay = pay("p1", "POST", "");
    assert_eq!((replay.status, &replay.body), (200, &done.body));
    assert_eq!(replay.get("idempotent-replayed"), Some("true"));
    assert_eq!(balance(), "87.50");
    // POST of an id never PUT: 404, nothing runs.
    pay("never-put", "POST", "").problem(404, "unknown-id");
    // Huge ids.
    let huge = "i".repeat(8 * 1024);
    pay(&huge, "PUT", "{}").problem(400, "invalid-key");
    pay(&huge, "POST", "").problem(400, "invalid-key");
    // Non-JSON, negative, absurd and malformed amounts: processed once, refused, kept.
    for (i, body) in [
        "not json at all",
        r#"{"customer_id":"c1","amount":"-5.00"}"#,
        r#"{"customer_id":"c1","amount":"0"}"#,
        r#"{"customer_id":"c1","amount":"99999999999999999999999.99"}"#,
        r#"{"customer_id":"c1","amount":"1e3"}"#,
        r#"{"customer_id":"c1","amount":"0.001"}"#,
        r#"{"customer_id":"c1","amount":12.5}"#,
        r#"{"customer_id":"c1","amount":"1000.00"}"#,
    ]
    .iter()
    .enumerate()
    {
        let id = format!("bad-{i}");
        assert_eq!(pay(&id, "PUT", body).status, 202, "{body}");
        let r = pay(&id, "POST", "");
        let kind = if i == 7 {
            "insufficient-funds"
        } else {
            "bad-payment"
        };
        r.problem(400, kind);
        let again = pay(&id, "POST", "");
        again.problem(400, kind);
        assert_eq!(again.get("idempotent-replayed"), Some("true"));
    }
    assert_eq!(balance(), "87.50", "a refused payment moved money");
    // A body over the limit, and a method the protocol does not have.
    let big = "x".repeat(2 << 20);
    pay("p2", "PUT", &big).problem(413, "body-too-large");
    pay("p2", "PATCH", "{}").problem(405, "method-not-allowed");
    server.kill();
}

#[test]
fn a_full_store_answers_503_retry_after_and_keeps_what_it_holds() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = start(data.path(), &["--max-records", "20"]);
    let a = server.addr.clone();
    let mut created = Vec::new();
    let mut refused = 0;
    for i in 0..20 {
        let key = format!("fill-{i}");
        let r = post_order(&a, &[("idempotency-key", &key)]);
        match r.status {
            201 => created.push((key, r.body)),
            503 => {
                r.problem(503, "store-full");
                assert_eq!(r.get("retry-after"), Some("30"));
                refused += 1;
            }
            other => panic!("{other}: {}", r.body),
        }
    }
    assert!(
        !created.is_empty() && refused > 0,
        "{} created, {refused} refused",
        created.len()
    );
    // Every order that was answered 201 exists once and still replays byte for byte.
    assert_eq!(order_count(&a), created.len());
    for (key, body) in &created {
        let r = post_order(&a, &[("idempotency-key", key)]);
        assert_eq!((r.status, &r.body), (201, body));
        assert_eq!(r.get("idempotent-replayed"), Some("true"));
    }
    server.kill();
}
