//! The example's `GET /metrics` (built with `--features metrics`) as a scraper sees it: the
//! store's counters and gauges and the histograms, in Prometheus text. Its own test binary:
//! it builds the example with other features than the other example tests.
#![cfg(all(feature = "http", not(loom)))]

#[path = "support/child.rs"]
mod child;
#[path = "support/http_client.rs"]
mod support;
use support::{Server, http};
#[test]
fn metrics_are_served_in_prometheus_text() {
    let data = tempfile::tempdir().expect("tempdir");
    let d = data.path().to_str().expect("utf-8 path");
    let mut server = Server::start("metrics", &["--data", d]);
    let a = server.addr.clone();
    let order = r#"{"items":[{"sku":"id-17236","count":1}]}"#;
    let h = [
        ("idempotency-key", "m-1"),
        ("content-type", "application/json"),
    ];
    for _ in 0..2 {
        let (s, _, _) = http(&a, "POST", "/orders", &h, order).expect("POST");
        assert_eq!(s, 201);
    }
    let (s, headers, body) = http(&a, "GET", "/metrics", &[], "").expect("GET /metrics");
    assert_eq!(s, 200);
    assert!(headers["content-type"].starts_with("text/plain"));
    let body = String::from_utf8(body).expect("utf-8");
    let value = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in:\n{body}"))
    };
    assert_eq!(value("idemkv_acquired_total"), 1.0);
    assert_eq!(value("idemkv_replayed_total"), 1.0);
    assert_eq!(value("idemkv_completions_total"), 1.0);
    assert!(value("idemkv_records") >= 2.0, "the key and the order");
    assert!(body.contains("idemkv_fsync_seconds"), "{body}");
    assert!(body.contains("idemkv_http_overhead_seconds"), "{body}");
    server.kill();
}
