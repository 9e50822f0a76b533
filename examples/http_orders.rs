//! An order and payment service on the embedded store: the README's main job.
//!
//! `cargo run --release --example http_orders -- [--listen 127.0.0.1:8080] [--data ./data/http_orders]
//!  [--durability immediate|batched|none] [--work-ms 0] [--lease-ms 10000]
//!  [--max-records 1000000] [--max-bytes 268435456]`
//!
//! The embedded store has a budget (`--max-records`, `--max-bytes`): past it, new keys are
//! answered 503 `store-full` with `Retry-After`, and nothing stored is evicted. Every error
//! answer is `application/problem+json`.
//!
//! `--redis redis://127.0.0.1:6379` (built with `--features redis`) keeps all state in Redis
//! instead, so several replicas can serve the same clients; `--redis-cluster
//! redis://10.0.0.1:7000,redis://10.0.0.2:7000` on a Redis Cluster (seed nodes), with
//! `--redis-wait-replicas 1` to have every change on a replica before it is acknowledged. A
//! server that may evict keys is refused unless `--redis-allow-eviction`. On
//! a cluster an order's id carries its Idempotency-Key's hash tag (`<uuid>{<key>}`), so the
//! order is written in the same slot, and batch, as the key's completion.
//!
//! - `POST /orders` `{"items":[{"sku":"id-17236","count":1}]}` → 201 `{"id":<uuid>,"items":[…]}`
//!   and a `last_order` cookie (sent to this client only: never stored or replayed),
//!   behind the Idempotency-Key and echo layers; the order is written atomically with the
//!   idempotent completion, so a retry after a crash never creates it twice.
//! - `GET /orders` (every order, so duplicates would show), `GET /orders/{id}`.
//! - `/payments/authorize/{id}`: the exactly-once protocol (PUT the payload
//!   `{"customer_id":"c1","amount":"12.50"}`, POST to run it once, GET, DELETE). Every customer
//!   starts with 100.00; a payment debits it or answers 400 for insufficient funds.
//! - `GET /accounts/{customer_id}` → `{"customer_id":…,"balance":"87.50"}`.
//!
//! - `GET /metrics` (built with `--features metrics`): Prometheus text — the store's counters
//!   and gauges, fsync, group-commit and checkpoint histograms, and the idempotency layer's
//!   added latency.
//!
//! All state lives in the store, so it survives restarts. One log line per request; Ctrl-C
//! (or SIGTERM) stops it cleanly.

#[path = "support/common.rs"]
mod common;

use common::{DurabilityArg, shutdown_signal};
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use idemkv::http::{
    CompleteWith, EchoLayer, ExactlyOnce, ExactlyOnceHandler, IdempotencyInfo, IdempotencyLayer,
    Processed, StoredRequest,
};
use idemkv::{Either, Error, IdempotencyStore, OwnedKey, Snapshot, Store, Write};
use serde::{Deserialize, Serialize};

#[derive(Clone)]
struct App {
    store: Backend,
    work: Duration,
    /// On a Redis Cluster: order ids carry their Idempotency-Key's hash tag.
    colocate: bool,
}

/// `id` in the slot of the record `anchor` (see `idemkv::redis::colocated_id`).
#[cfg(feature = "redis")]
fn colocated(id: &str, anchor: &str) -> Option<String> {
    idemkv::redis::colocated_id(id, anchor)
}
#[cfg(not(feature = "redis"))]
fn colocated(_: &str, _: &str) -> Option<String> {
    None
}

/// The Redis store with the `redis` feature; without it `--redis` is refused and the right
/// side is never built.
#[cfg(feature = "redis")]
type Remote = idemkv::redis::RedisStore;
#[cfg(not(feature = "redis"))]
type Remote = Store;

/// The embedded store or Redis: one line of `main` picks, everything else is the same.
type Backend = Either<Store, Remote>;

/// Every record of `scope` (for `GET /orders`): a listing, outside the `IdempotencyStore` trait.
async fn scan(store: &Backend, scope: &[u8]) -> Result<Vec<(Vec<u8>, Snapshot)>, Error> {
    match store {
        Either::Left(s) => Ok(s.scan(scope)),
        #[cfg(feature = "redis")]
        Either::Right(r) => r.scan(scope).await,
        #[cfg(not(feature = "redis"))]
        Either::Right(s) => Ok(s.scan(scope)),
    }
}

#[derive(Serialize, Deserialize, Clone)]
struct Item {
    sku: String,
    count: u32,
}

#[derive(Deserialize)]
struct NewOrder {
    items: Vec<Item>,
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// An RFC 9457 problem body.
fn problem_body(status: StatusCode, kind: &str, detail: &str) -> String {
    serde_json::json!({
        "type": format!("urn:idemkv:problem:{kind}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    })
    .to_string()
}

fn problem(status: StatusCode, kind: &str, detail: &str) -> Response {
    let mut r = (status, problem_body(status, kind, detail)).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, PROBLEM_JSON);
    r
}

fn bad_request(detail: &str) -> Response {
    problem(StatusCode::BAD_REQUEST, "bad-request", detail)
}

/// A store error outside the layers: its text goes to the log, not to the client.
fn store_failed(e: &Error) -> Response {
    eprintln!("store error: {e}");
    match e {
        Error::EmptyKey | Error::KeyTooLong { .. } => problem(
            StatusCode::BAD_REQUEST,
            "invalid-id",
            "the id is empty or too long",
        ),
        _ => {
            let mut r = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "the store is unavailable; retry later",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// Errors answered by axum itself (no route, wrong method, a bad path) get a problem body too.
async fn problems_everywhere(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let s = res.status();
    let is_problem = res.headers().get(header::CONTENT_TYPE) == Some(&PROBLEM_JSON);
    if !(s.is_client_error() || s.is_server_error()) || is_problem {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let detail = match axum::body::to_bytes(body, 4096).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
        _ => s.canonical_reason().unwrap_or("error").to_owned(),
    };
    parts.headers.insert(header::CONTENT_TYPE, PROBLEM_JSON);
    parts.headers.remove(header::CONTENT_LENGTH);
    let kind = if s == StatusCode::NOT_FOUND {
        "not-found"
    } else {
        "request-refused"
    };
    Response::from_parts(
        parts,
        axum::body::Body::from(problem_body(s, kind, &detail)),
    )
}

/// `info` is there when the request carried an Idempotency-Key (the layer ran).
async fn create_order(
    State(app): State<App>,
    info: Option<IdempotencyInfo>,
    req: Request,
) -> Response {
    let Ok(body) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
        let why = "request bodies are limited to 1 MiB (or this one could not be read)";
        return problem(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", why);
    };
    let order: NewOrder = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => {
            return bad_request(&format!(
                "expected {{\"items\":[{{\"sku\":…,\"count\":…}}]}}: {e}"
            ));
        }
    };
    if order.items.is_empty() {
        return bad_request("an order needs at least one item");
    }
    tokio::time::sleep(app.work).await;
    let uuid = uuid::Uuid::new_v4().to_string();
    let id = match &info {
        Some(info) if app.colocate => colocated(&uuid, &info.key).unwrap_or(uuid),
        _ => uuid,
    };
    let created = serde_json::json!({"id": id, "items": order.items})
        .to_string()
        .into_bytes();
    let write = Write::put_if_absent(OwnedKey::new("orders", &id), created.clone());
    let mut res = json(StatusCode::CREATED, created);
    // For the web front end: the client's last order. Per client, so the idempotency layer
    // sends it to this client only and never stores or replays it.
    if let Ok(cookie) = HeaderValue::from_str(&format!(
        "last_order={id}; Path=/; HttpOnly; SameSite=Strict"
    )) {
        res.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    if info.is_some() {
        // Committed together with "this Idempotency-Key is done".
        return (CompleteWith(vec![write]), res).into_response();
    }
    if let Err(e) = app.store.cas(&write).await {
        return store_failed(&e);
    }
    res
}

async fn list_orders(State(app): State<App>) -> Response {
    let orders = match scan(&app.store, b"orders").await {
        Ok(all) => all,
        Err(e) => return store_failed(&e),
    };
    let orders: Vec<serde_json::Value> = orders
        .into_iter()
        .filter_map(|(_, s)| match s {
            Snapshot::Value(v) => serde_json::from_slice(&v.value).ok(),
            _ => None,
        })
        .collect();
    json(
        StatusCode::OK,
        serde_json::to_vec(&orders).unwrap_or_default(),
    )
}

async fn one_order(State(app): State<App>, Path(id): Path<String>) -> Response {
    match app.store.get(OwnedKey::new("orders", &id).as_key()).await {
        Ok(Some(Snapshot::Value(v))) => json(StatusCode::OK, v.value),
        Ok(_) => problem(StatusCode::NOT_FOUND, "not-found", "no such order"),
        Err(e) => store_failed(&e),
    }
}

const START_CENTS: i64 = 10_000; // 100.00

fn cents_to_string(c: i64) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

/// "12.50" → 1250; positive amounts with at most two decimals only.
fn parse_cents(s: &str) -> Option<i64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, "0"));
    if frac.len() > 2
        || whole.is_empty()
        || !whole
            .bytes()
            .chain(frac.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let frac: i64 = format!("{frac:0<2}").parse().ok()?;
    let c = whole
        .parse::<i64>()
        .ok()?
        .checked_mul(100)?
        .checked_add(frac)?;
    (c > 0).then_some(c)
}

async fn balance_of(store: &Backend, customer: &str) -> (i64, Option<u64>) {
    match store
        .get(OwnedKey::new("accounts", customer).as_key())
        .await
    {
        Ok(Some(Snapshot::Value(v))) => (
            String::from_utf8_lossy(&v.value)
                .parse()
                .unwrap_or(START_CENTS),
            Some(v.version),
        ),
        _ => (START_CENTS, None),
    }
}

async fn account(State(app): State<App>, Path(customer): Path<String>) -> Response {
    let (cents, _) = balance_of(&app.store, &customer).await;
    let body = serde_json::json!({"customer_id": customer, "balance": cents_to_string(cents)});
    json(StatusCode::OK, body.to_string().into_bytes())
}

#[derive(Deserialize)]
struct Payment {
    customer_id: String,
    amount: String,
}

/// The user code of the exactly-once endpoint: a debit committed with "processed".
struct Payments {
    store: Backend,
}

impl ExactlyOnceHandler for Payments {
    async fn process(&self, req: StoredRequest) -> Result<Processed, idemkv::http::BoxError> {
        Ok(self.authorize(&req.id, &req.payload).await)
    }
}

impl Payments {
    async fn authorize(&self, id: &str, payload: &[u8]) -> Processed {
        let refuse = |kind: &str, detail: &str| {
            let status = StatusCode::BAD_REQUEST;
            Processed::new(status, problem_body(status, kind, detail))
                .header(header::CONTENT_TYPE, PROBLEM_JSON)
        };
        let Some((p, cents)) = serde_json::from_slice::<Payment>(payload)
            .ok()
            .and_then(|p| parse_cents(&p.amount).map(|c| (p, c)))
        else {
            return refuse(
                "bad-payment",
                "expected {\"customer_id\":…,\"amount\":\"12.50\"}, a positive amount with at most two decimals",
            );
        };
        let (balance, version) = balance_of(&self.store, &p.customer_id).await;
        if cents > balance {
            return refuse("insufficient-funds", "insufficient funds");
        }
        let left = balance - cents;
        let account = OwnedKey::new("accounts", &p.customer_id);
        let write = match version {
            Some(v) => Write::set_if_version(account, v, left.to_string()),
            None => Write::put_if_absent(account, left.to_string()),
        };
        let body = serde_json::json!({
            "id": id, "customer_id": p.customer_id,
            "amount": cents_to_string(cents), "balance": cents_to_string(left),
        });
        Processed::new(StatusCode::OK, body.to_string())
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )
            .write(write)
    }
}

/// `GET /metrics`: the store's figures, refreshed at each scrape, in Prometheus text.
#[cfg(feature = "metrics")]
fn metrics_route(store: &Backend) -> axum::routing::MethodRouter<App> {
    let handle = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("metrics: {e}");
            return get(|| async {
                problem(StatusCode::SERVICE_UNAVAILABLE, "no-metrics", "no recorder")
            });
        }
    };
    let store = store.clone();
    get(move || {
        let (handle, store) = (handle.clone(), store.clone());
        async move {
            match &store {
                Either::Left(s) => idemkv::metrics::record_store(s),
                #[cfg(feature = "redis")]
                Either::Right(r) => idemkv::metrics::record_stats(&r.stats()),
                #[cfg(not(feature = "redis"))]
                Either::Right(s) => idemkv::metrics::record_store(s),
            }
            let mut r = handle.render().into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
    })
}

/// Logs through `tracing` to stdout (`RUST_LOG` filters; default `info`): idemkv's own events
/// and spans, and one line per request from the trace layer.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(false)
        .with_target(false)
        .init();
}

/// An order and payment service on the embedded store (or on Redis with `--redis`).
#[derive(clap::Parser)]
#[command(name = "http_orders")]
struct Args {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The store's data directory.
    #[arg(long, default_value = "./data/http_orders")]
    data: String,
    /// When a write is acknowledged: after its fsync, within 10 ms, or never synced.
    #[arg(long, value_enum, default_value = "immediate")]
    durability: DurabilityArg,
    /// Time each order takes to create (to see 409s and waits).
    #[arg(long, default_value_t = 0)]
    work_ms: u64,
    /// The idempotency lease.
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u64,
    /// Keep all state in Redis at this URL instead (built with `--features redis`).
    #[arg(long, conflicts_with = "redis_cluster")]
    redis: Option<String>,
    /// Keep all state on a Redis Cluster, found through these seed URLs (comma-separated).
    #[arg(long, value_delimiter = ',')]
    redis_cluster: Option<Vec<String>>,
    /// With Redis: acknowledge a change only once this many replicas have it (`WAIT`).
    #[arg(long, default_value_t = 0)]
    redis_wait_replicas: u32,
    /// With Redis: start even if the server may evict keys under memory pressure (see
    /// `RedisStoreBuilder::allow_eviction`; refused by default).
    #[arg(long)]
    redis_allow_eviction: bool,
    /// The store's record budget: past it, new keys get 503 store-full.
    #[arg(long, default_value_t = 1_000_000)]
    max_records: u64,
    /// The store's byte budget.
    #[arg(long, default_value_t = 256 << 20)]
    max_bytes: u64,
}

#[cfg(feature = "redis")]
async fn redis_backend(args: &Args) -> Result<Option<Backend>, Box<dyn std::error::Error>> {
    use idemkv::redis::RedisStore;
    let builder = match (&args.redis, &args.redis_cluster) {
        (Some(url), _) => {
            println!("state in Redis at {url}");
            RedisStore::builder(url)
        }
        (None, Some(nodes)) => {
            println!("state on the Redis Cluster at {}", nodes.join(","));
            RedisStore::cluster(nodes)
        }
        (None, None) => return Ok(None),
    };
    let store = builder
        .wait_for_replicas(args.redis_wait_replicas, Duration::from_millis(500))
        .allow_eviction(args.redis_allow_eviction)
        .connect()
        .await?;
    Ok(Some(Either::Right(store)))
}

#[cfg(not(feature = "redis"))]
async fn redis_backend(args: &Args) -> Result<Option<Backend>, Box<dyn std::error::Error>> {
    if args.redis.is_none() && args.redis_cluster.is_none() {
        return Ok(None);
    }
    Err("--redis and --redis-cluster need the redis feature: cargo run --features redis --example http_orders".into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    init_logging();
    let (listen, data) = (args.listen, args.data.clone());
    let durability = args.durability.durability();
    let work = Duration::from_millis(args.work_ms);
    let lease = Duration::from_millis(args.lease_ms);
    let store = if let Some(remote) = redis_backend(&args).await? {
        remote
    } else {
        let store = Store::builder()
            .durability(durability)
            .max_records(args.max_records)
            .max_bytes(args.max_bytes)
            .open(&data)?;
        if let Some(r) = store.recovery_report() {
            println!(
                "opened {data}: {} records from the checkpoint, {} log records replayed",
                r.checkpoint_records, r.records
            );
        }
        Either::Left(store)
    };
    let app = App {
        store: store.clone(),
        work,
        colocate: args.redis_cluster.is_some(),
    };
    let router = Router::new();
    #[cfg(feature = "metrics")]
    let router = router.route("/metrics", metrics_route(&store));
    let router = router
        .route("/orders", post(create_order).get(list_orders))
        .route("/orders/{id}", get(one_order))
        .route("/accounts/{customer_id}", get(account))
        .route_service(
            "/payments/authorize/{id}",
            ExactlyOnce::new(
                store.clone(),
                "payments/authorize",
                Payments {
                    store: store.clone(),
                },
            ),
        )
        .layer(IdempotencyLayer::new(store.clone()).lease(lease))
        .layer(EchoLayer::new())
        .layer(middleware::from_fn(problems_everywhere))
        // One line per request: `request{method=POST path=/orders}: response status=201
        // replayed=false latency_us=…`.
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path())
                })
                .on_request(())
                .on_response(|res: &Response, latency: Duration, _: &tracing::Span| {
                    let replayed = res.headers().contains_key("idempotent-replayed");
                    tracing::info!(
                        status = res.status().as_u16(),
                        replayed,
                        latency_us = latency.as_micros() as u64,
                        "response"
                    );
                }),
        )
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}
