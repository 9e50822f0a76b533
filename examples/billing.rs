//! A billing service over Kafka: each BillCustomer request debits the customer exactly once
//! through an exactly-once HTTP endpoint (`http_orders`'s `/payments/authorize/{uniqueId}`),
//! replies once the payment's outcome is known, and publishes a billing event through the
//! outbox — exactly once end to end, whatever crashes in between.
//!
//! `cargo run --release --features kafka --example billing -- --mock --demo 5`
//!
//! Flags (`--help` lists them): `--brokers HOST:PORT` (a real cluster) or `--mock` (librdkafka's
//! in-process mock cluster on 127.0.0.1, and an in-process payments server; both addresses are
//! printed); `--payments-url URL` (default `http://127.0.0.1:8080`, where `http_orders`
//! listens); `--data DIR`, `--durability immediate|batched|none`, `--group NAME` (default
//! `billing`), `--follow-up-topic` (default `billing.follow-up`); `--demo N` sends N requests,
//! each twice, checks that both replies agree, prints a summary and exits.
//!
//! A request on `billing.requests` is `{"order_id": "...", "customer_id": "...", "amount":
//! "12.50"}` with headers `idempotency-key`, `x-request-id`, `reply-to` and optionally
//! `x-echo-set-header: Name: value`. The reply is `{"order_id": ..., "status": "succeeded" |
//! "failed", "payment_id": "<uniqueId>"}` with the request's `x-request-id` and echo headers,
//! and `idempotent-replayed: true` on a replay. `billing.events` gets `BillingSucceeded` or
//! `BillingFailed`, keyed by the order id, with a stable `idempotency-key`. One log line per
//! phase of each payment call (PUT, POST, GET when a POST's answer was lost, DELETE).

#[path = "support/common.rs"]
mod common;

use common::{DurabilityArg, shutdown_signal};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use idemkv::http::{ExactlyOnce, Processed, StoredRequest};
use idemkv::kafka::{
    HandlerError, Incoming, KafkaProcessor, MockKafka, Outcome, Request, Requester,
};
use idemkv::outbox::Outgoing;
use idemkv::{OwnedKey, Snapshot, Store, Write};
use rdkafka::ClientConfig;
use serde::Deserialize;

/// A billing service over Kafka on the embedded store.
#[derive(clap::Parser)]
#[command(name = "billing")]
struct Args {
    /// A real cluster's bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092", conflicts_with = "mock")]
    brokers: String,
    /// librdkafka's in-process mock cluster, and an in-process payments server.
    #[arg(long)]
    mock: bool,
    /// The payments service (`http_orders`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    payments_url: String,
    /// The store's data directory.
    #[arg(long, default_value = "./data/billing")]
    data: String,
    /// When a write is acknowledged: after its fsync, within 10 ms, or never synced.
    #[arg(long, value_enum, default_value = "immediate")]
    durability: DurabilityArg,
    /// The consumer group.
    #[arg(long, default_value = "billing")]
    group: String,
    /// Where the follow-ups of payment calls go (consumed by this service too).
    #[arg(long, default_value = "billing.follow-up")]
    follow_up_topic: String,
    /// librdkafka's `auto.commit.interval.ms`.
    #[arg(long, default_value_t = 1000)]
    commit_interval_ms: u64,
    /// librdkafka's `session.timeout.ms` (the heartbeat is a tenth of it).
    #[arg(long)]
    session_timeout_ms: Option<u64>,
    /// Send N requests, each twice, check both replies agree, and exit.
    #[arg(long, default_value_t = 0)]
    demo: usize,
}

#[derive(Deserialize)]
struct BillCustomer {
    order_id: String,
    customer_id: String,
    amount: String,
}

const REQUESTS: &str = "billing.requests";
const REPLIES: &str = "billing.replies";
const EVENTS: &str = "billing.events";

/// Both halves of one BillCustomer: the payment call, then, on its follow-up, the reply and
/// the event.
async fn bill(msg: Incoming, payments: Arc<str>) -> Result<Outcome, HandlerError> {
    let req: BillCustomer = serde_json::from_slice(msg.payload().unwrap_or_default())
        .map_err(|e| HandlerError::fail(format!("expected a BillCustomer: {e}")))?;
    let Some(done) = msg.follow_up() else {
        let body = serde_json::json!({"customer_id": req.customer_id, "amount": req.amount});
        let url = format!("{payments}/payments/authorize/{{uniqueId}}");
        let call = msg.invoke_http(&url, body.to_string(), "authorize").await?;
        return Ok(Outcome::done().follow_up(call));
    };
    let succeeded = done.response().status.is_success();
    let status = if succeeded { "succeeded" } else { "failed" };
    let reply = serde_json::json!({
        "order_id": req.order_id, "status": status, "payment_id": done.unique_id(),
    });
    let event = serde_json::json!({
        "type": if succeeded { "BillingSucceeded" } else { "BillingFailed" },
        "order_id": req.order_id, "customer_id": req.customer_id,
        "amount": req.amount, "payment_id": done.unique_id(),
    });
    tracing::info!(target: "billing", order = %req.order_id, status, payment = done.unique_id(), "reply and event recorded");
    Ok(Outcome::reply(reply.to_string())
        .header("content-type", "application/json")
        .send(
            Outgoing::to(EVENTS)
                .key(req.order_id.clone())
                .header("content-type", "application/json")
                .payload(event.to_string()),
        ))
}

/// Cents of "12.50"; `None` unless positive with at most two decimals.
fn cents(amount: &str) -> Option<i64> {
    let (whole, frac) = amount.split_once('.').unwrap_or((amount, "0"));
    let frac = format!("{frac:0<2}");
    if frac.len() != 2 || whole.is_empty() {
        return None;
    }
    let c = whole.parse::<i64>().ok()? * 100 + frac.parse::<i64>().ok()?;
    (c > 0).then_some(c)
}

/// `--mock`'s payments server: every customer starts with 100.00; a debit commits with
/// "processed" (the same contract as `http_orders`'s endpoint).
async fn payments_server(store: Store) -> std::io::Result<String> {
    let accounts = store.clone();
    let svc = ExactlyOnce::new(store, "payments/authorize", move |req: StoredRequest| {
        let accounts = accounts.clone();
        async move {
            let v: serde_json::Value = serde_json::from_slice(&req.payload).unwrap_or_default();
            let customer = v["customer_id"].as_str().unwrap_or_default().to_owned();
            let Some(amount) = v["amount"].as_str().and_then(cents) else {
                return Ok::<_, std::convert::Infallible>(Processed::new(
                    StatusCode::BAD_REQUEST,
                    "bad amount",
                ));
            };
            let account = OwnedKey::new("accounts", &customer);
            let (balance, version) = match accounts.blocking_get(account.as_key()) {
                Ok(Some(Snapshot::Value(v))) => (
                    String::from_utf8_lossy(&v.value).parse().unwrap_or(0),
                    Some(v.version),
                ),
                _ => (10_000i64, None),
            };
            if amount > balance {
                return Ok(Processed::new(
                    StatusCode::BAD_REQUEST,
                    "insufficient funds",
                ));
            }
            let left = (balance - amount).to_string();
            let write = match version {
                Some(v) => Write::set_if_version(account, v, left.clone()),
                None => Write::put_if_absent(account, left.clone()),
            };
            Ok(
                Processed::new(StatusCode::OK, format!("{{\"balance_cents\":{left}}}"))
                    .write(write),
            )
        }
    });
    let app = axum::Router::new().route_service("/payments/authorize/{id}", svc);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

async fn demo(config: &ClientConfig, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let requester = Requester::new(config, REPLIES).await?;
    let mut agreed = 0;
    for i in 0..n {
        let order = format!("order-{}-{i}", std::process::id());
        // The last customer asks for more than the balance: that payment fails, once.
        let amount = if i + 1 == n && n > 1 {
            "250.00"
        } else {
            "12.50"
        };
        let body = serde_json::json!({"order_id": order, "customer_id": format!("c{i}"), "amount": amount});
        let mut seen = Vec::new();
        for copy in 0..2 {
            let reply = requester
                .request(
                    REQUESTS,
                    Request::new(body.to_string())
                        .key(order.clone())
                        .idempotency_key(order.clone())
                        .header("x-echo-set-header", format!("X-Copy: {copy}")),
                    Duration::from_secs(20),
                )
                .await?;
            let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
            println!(
                "reply to {}: {} replayed={} x-copy={:?}",
                reply.request_id().unwrap_or("?"),
                String::from_utf8_lossy(&reply.payload),
                reply.is_replayed(),
                reply.header("x-copy").map(String::from_utf8_lossy),
            );
            seen.push((v["status"].clone(), v["payment_id"].clone()));
        }
        if seen[0] == seen[1] && seen[0].1.is_string() {
            agreed += 1;
        }
    }
    println!("demo: {agreed} of {n} requests got agreeing replies on both deliveries");
    if agreed != n {
        return Err("two deliveries of one request got different outcomes".into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "billing=info,idemkv::kafka=info".into()),
        )
        .with_writer(std::io::stdout)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_target(false)
        .init();
    let durability = args.durability.durability();
    let mock = if args.mock {
        let mock = MockKafka::start(1)?;
        for (topic, partitions) in [
            (REQUESTS, 3),
            (args.follow_up_topic.as_str(), 3),
            (REPLIES, 1),
            (EVENTS, 1),
        ] {
            mock.create_topic(topic, partitions)?;
        }
        println!("mock cluster: {}", mock.bootstrap_servers());
        Some(mock)
    } else {
        None
    };
    let payments: Arc<str> = if args.mock {
        let url = payments_server(Store::in_memory()).await?;
        println!("payments server: {url}");
        url.into()
    } else {
        args.payments_url.trim_end_matches('/').into()
    };
    let mut client = match &mock {
        Some(m) => m.client_config(),
        None => {
            let mut c = ClientConfig::new();
            c.set("bootstrap.servers", &args.brokers);
            c
        }
    };
    if let Some(session) = args.session_timeout_ms {
        client.set("session.timeout.ms", session.to_string());
        client.set("heartbeat.interval.ms", (session / 10).max(10).to_string());
    }

    let store = Store::builder().durability(durability).open(&args.data)?;
    if let Some(r) = store.recovery_report() {
        println!(
            "opened {}: {} records from the checkpoint, {} log records replayed",
            args.data, r.checkpoint_records, r.records
        );
    }
    let mut consumer = client.clone();
    consumer
        .set("group.id", &args.group)
        .set("auto.offset.reset", "earliest")
        .set(
            "auto.commit.interval.ms",
            args.commit_interval_ms.to_string(),
        );
    let processor = KafkaProcessor::builder(store, consumer)
        .topics([REQUESTS])
        .follow_up_topic(args.follow_up_topic.clone())
        .lease(Duration::from_secs(10))
        .retry_backoff(Duration::from_millis(50), Duration::from_secs(2))
        .build()?;
    let handle = processor.handle();
    let running = tokio::spawn(processor.run(move |msg: Incoming| bill(msg, payments.clone())));
    println!(
        "consuming {REQUESTS} and {} as group {}; Ctrl-C stops",
        args.follow_up_topic, args.group
    );
    let outcome = if args.demo > 0 {
        demo(&client, args.demo).await
    } else {
        shutdown_signal().await;
        Ok(())
    };
    handle.shutdown();
    let stats = running.await??;
    println!(
        "stopped: {} processed, {} replayed, {} failed, {} sent, {} replies",
        stats.processed, stats.replayed, stats.failed, stats.sent, stats.replies
    );
    outcome
}

#[cfg(test)]
mod tests {
    #[test]
    fn amounts_parse_to_cents() {
        assert_eq!(super::cents("12.50"), Some(1250));
        assert_eq!(super::cents("3"), Some(300));
        assert_eq!(super::cents("0.5"), Some(50));
        assert_eq!(super::cents("0.00"), None);
        assert_eq!(super::cents("1.234"), None);
        assert_eq!(super::cents("x"), None);
    }
}
