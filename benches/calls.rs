//! What exactly-once HTTP calls cost a Kafka handler, side by side in one run, on librdkafka's
//! mock cluster (in process, loopback TCP) and a payments server on 127.0.0.1:
//!
//! - (a) **plain**: the handler POSTs the payment to an ordinary endpoint and replies (the
//!   payment happens at least once);
//! - (b) **invoke_http**: the handler PUTs it to an `ExactlyOnce` endpoint; the follow-up POSTs
//!   it and replies (exactly once; the DELETE comes after the reply).
//!
//! Both on the adapter with an in-memory store. Per row: p50/p99 of sequential round trips
//! (one request at a time, through `Requester`), and messages/s with `WINDOW` requests in
//! flight. Rows alternate over rounds; the median round is reported, with (b)/(a). Then where
//! (b)'s time goes: one HTTP exchange with the server, timed alone.
//!
//! `cargo bench --features kafka --bench calls` (`IDEMKV_BENCH_QUICK=1`: fewer requests, one
//! round). Writes `target/bench-calls.csv`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idemkv::Store;
use idemkv::http::{ExactlyOnce, Processed, StoredRequest};
use idemkv::kafka::{
    HandlerError, Incoming, KafkaProcessor, MockKafka, Outcome, Request, Requester,
};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The payments server: `/pay/{id}` (plain) and `/authorize/{id}` (exactly once); both just
/// count the payment.
async fn server() -> (String, Arc<AtomicU64>) {
    let paid = Arc::new(AtomicU64::new(0));
    let count = paid.clone();
    let eo = ExactlyOnce::new(
        Store::in_memory(),
        "authorize",
        move |_req: StoredRequest| {
            count.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, std::convert::Infallible>(Processed::new(StatusCode::OK, "paid")) }
        },
    );
    let count = paid.clone();
    let app = axum::Router::new()
        .route(
            "/pay/{id}",
            axum::routing::post(move || {
                count.fetch_add(1, Ordering::Relaxed);
                async { "paid" }
            }),
        )
        .route_service("/authorize/{id}", eo);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, paid)
}

fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(c)
}

async fn exchange(client: &HttpClient, method: http::Method, url: &str) -> StatusCode {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from_static(b"12.50")))
        .expect("request");
    let res = client.request(req).await.expect("exchange");
    let status = res.status();
    let _ = http_body_util::BodyExt::collect(res.into_body()).await;
    status
}

async fn round_trips(requester: &Requester, topic: &str, n: usize) -> (f64, f64) {
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("{topic}-rt-{i}-{}", std::process::id());
        let t = Instant::now();
        requester
            .request(
                topic,
                Request::new("12.50").idempotency_key(key),
                Duration::from_secs(30),
            )
            .await
            .expect("reply");
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    (ms[n / 2], ms[(n * 99 / 100).min(n - 1)])
}

async fn throughput(requester: &Arc<Requester>, topic: &str, n: usize, window: usize) -> f64 {
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(window));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("permit");
        let (requester, topic) = (requester.clone(), topic.to_owned());
        tasks.push(tokio::spawn(async move {
            let key = format!(
                "{topic}-tp-{i}-{}-{}",
                std::process::id(),
                t.elapsed().as_nanos()
            );
            requester
                .request(
                    &topic,
                    Request::new("12.50").idempotency_key(key),
                    Duration::from_secs(60),
                )
                .await
                .expect("reply");
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const WINDOW: usize = 32;

fn main() {
    let quick = std::env::var("IDEMKV_BENCH_QUICK").is_ok_and(|v| v != "0");
    let (trips, msgs, rounds) = if quick { (100, 400, 1) } else { (400, 2000, 3) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (base, paid) = server().await;
        let kafka = MockKafka::start(1).expect("mock");
        for (t, p) in [("plain", 4), ("exactly", 4), ("exactly.follow-up", 4), ("replies", 1)] {
            kafka.create_topic(t, p).expect("topic");
        }
        let consumer = |group: &str| {
            let mut c = kafka.client_config();
            c.set("group.id", group).set("auto.offset.reset", "earliest");
            c
        };
        // (a): a plain POST in the handler.
        let http = client();
        let pay = format!("{base}/pay/");
        let plain = KafkaProcessor::builder(Store::in_memory(), consumer("bench-plain"))
            .topics(["plain"])
            .build()
            .expect("processor");
        let plain_handle = plain.handle();
        let plain_task = tokio::spawn(plain.run(move |msg: Incoming| {
            let (http, url) = (http.clone(), format!("{pay}{}", String::from_utf8_lossy(msg.idempotency_key())));
            async move {
                let status = exchange(&http, http::Method::POST, &url).await;
                Ok::<_, HandlerError>(Outcome::reply(status.as_str().to_owned()))
            }
        }));
        // (b): invoke_http.
        let template: Arc<str> = format!("{base}/authorize/{{uniqueId}}").into();
        let exactly = KafkaProcessor::builder(Store::in_memory(), consumer("bench-exactly"))
            .topics(["exactly"])
            .follow_up_topic("exactly.follow-up")
            .build()
            .expect("processor");
        let exactly_handle = exactly.handle();
        let exactly_task = tokio::spawn(exactly.run(move |msg: Incoming| {
            let template = template.clone();
            async move {
                if let Some(done) = msg.follow_up() {
                    return Ok(Outcome::reply(done.response().status.as_str().to_owned()));
                }
                let body = msg.payload().unwrap_or_default().to_vec();
                let call = msg.invoke_http(&template, body, "pay").await?;
                Ok(Outcome::done().follow_up(call))
            }
        }));
        let requester = Arc::new(Requester::new(&kafka.client_config(), "replies").await.expect("requester"));
        // Warm up: group joins, connections.
        let _ = round_trips(&requester, "plain", 20).await;
        let _ = round_trips(&requester, "exactly", 20).await;

        let (mut a_lat, mut b_lat, mut a_tp, mut b_tp) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            a_lat.push(round_trips(&requester, "plain", trips).await);
            b_lat.push(round_trips(&requester, "exactly", trips).await);
            a_tp.push(throughput(&requester, "plain", msgs, WINDOW).await);
            b_tp.push(throughput(&requester, "exactly", msgs, WINDOW).await);
        }
        // One HTTP exchange alone, for the breakdown.
        let http = client();
        let mut one = Vec::new();
        for i in 0..trips {
            let t = Instant::now();
            exchange(&http, http::Method::POST, &format!("{base}/pay/x{i}")).await;
            one.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let http_ms = median(one);
        plain_handle.shutdown();
        exactly_handle.shutdown();
        let _ = plain_task.await;
        let _ = exactly_task.await;

        let pick = |v: &[(f64, f64)]| {
            let mut by_p50 = v.to_vec();
            by_p50.sort_by(|x, y| x.0.total_cmp(&y.0));
            by_p50[by_p50.len() / 2]
        };
        let (a, b) = (pick(&a_lat), pick(&b_lat));
        let (atp, btp) = (median(a_tp), median(b_tp));
        println!("\n{trips} sequential requests and {msgs} with {WINDOW} in flight, median of {rounds} round(s)");
        println!("{:<34} {:>9} {:>9} {:>10}", "row", "p50 ms", "p99 ms", "msgs/s");
        println!("{:<34} {:>9.2} {:>9.2} {:>10.0}", "(a) plain POST, at least once", a.0, a.1, atp);
        println!("{:<34} {:>9.2} {:>9.2} {:>10.0}", "(b) invoke_http, exactly once", b.0, b.1, btp);
        println!(
            "(b)/(a): p50 {:.2}x, p99 {:.2}x, throughput {:.2} (target: p50 at most 2.5x)",
            b.0 / a.0,
            b.1 / a.1,
            btp / atp
        );
        println!(
            "one HTTP exchange alone: {http_ms:.3} ms; (a) = one Kafka round trip + 1 exchange, \
             (b) = the round trip + PUT + the follow-up's produce/consume hop + POST"
        );
        println!("payments made: {}", paid.load(Ordering::Relaxed));
        let csv = format!(
            "row,p50_ms,p99_ms,msgs_per_s\nplain,{:.3},{:.3},{atp:.0}\ninvoke_http,{:.3},{:.3},{btp:.0}\nratio,{:.3},{:.3},{:.3}\nhttp_exchange_ms,{http_ms:.3},,\n",
            a.0, a.1, b.0, b.1, b.0 / a.0, b.1 / a.1, btp / atp
        );
        let _ = std::fs::write("target/bench-calls.csv", csv);
    });
}
