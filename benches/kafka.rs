//! The Kafka adapter's cost against librdkafka's mock cluster (in process, over loopback TCP),
//! side by side in one run:
//!
//! - messages/s consuming N pre-produced messages (4 partitions, an `idempotency-key` header
//!   each): a plain rdkafka consume loop (poll, read the payload, store the offset — the usual
//!   at-least-once loop) vs the adapter with a no-op handler on each store: in memory, and
//!   durable with `None`, `Batched` and `Immediate`. Rows interleaved over rounds; the median
//!   round is reported, with its ratio to the plain loop.
//! - request-reply round trip, one request at a time: a plain rdkafka echo service (consume,
//!   produce the reply with the correlation id, store the offset) vs the adapter (`Batched`).
//!
//! Each row also gives the CPU time the whole process spent per message over the same window
//! (all threads: the consumer's, the runtime's, librdkafka's and the mock broker's), which
//! varies far less between runs on a shared machine than the rate does.
//!
//! `cargo bench --features kafka --bench kafka` (`IDEMKV_BENCH_QUICK=1`: 20k messages, one
//! round; `IDEMKV_BENCH_ROWS=0,3` runs only those rows, `IDEMKV_BENCH_RR=0` skips the round
//! trips). Writes `target/bench-kafka.csv`, and `target/bench-kafka-threads.csv` with each
//! row's CPU split by thread group (the bench thread, where the plain loop runs; the polling
//! thread; the runtime's workers; librdkafka's threads; the store's log and maintenance).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use idemkv::kafka::{Incoming, KafkaProcessor, MockKafka, Outcome, Request, Requester};
use idemkv::{Durability, Store};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message};

#[path = "support/cpu.rs"]
mod cpu;
use cpu::cpu_seconds;
#[path = "support/threads.rs"]
mod threads;
use threads::GROUPS;

const PARTITIONS: i32 = 4;

/// A row's figures: messages per second, and CPU microseconds per message, in all and by
/// thread group.
#[derive(Clone, Copy)]
struct Rate {
    per_s: f64,
    cpu_us: f64,
    by_thread: [f64; GROUPS.len()],
}

/// Where a row's window starts: the time, the process's CPU time, and each thread's.
type Start = (Instant, f64, threads::Snapshot);

fn started() -> Start {
    (Instant::now(), cpu_seconds(), threads::snapshot())
}

fn produce(kafka: &MockKafka, topic: &str, n: usize) {
    kafka.create_topic(topic, PARTITIONS).expect("topic");
    let mut config = kafka.client_config();
    config
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000");
    let producer: BaseProducer = config.create().expect("producer");
    let body = br#"{"items":[{"sku":"id-17236","count":1}]}"#;
    for i in 0..n {
        let key = format!("k{i}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(&key),
        });
        let mut record = BaseRecord::to(topic)
            .key(&key)
            .payload(body)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

fn consumer_config(kafka: &MockKafka, group: &str) -> ClientConfig {
    let mut c = kafka.client_config();
    c.set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.offset.store", "false");
    c
}

/// The plain at-least-once loop: messages/s from the first message to the n-th.
fn plain(kafka: &MockKafka, topic: &str, n: usize) -> Rate {
    let consumer: BaseConsumer = consumer_config(kafka, &format!("plain-{topic}"))
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen = 0usize;
    let mut bytes = 0usize;
    let mut start = None;
    while seen < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            start.get_or_insert_with(started);
            bytes += m.payload().map_or(0, <[u8]>::len) + m.headers().map_or(0, |h| h.count());
            let _ = consumer.store_offset(m.topic(), m.partition(), m.offset());
            seen += 1;
        }
    }
    std::hint::black_box(bytes);
    rate(start.as_ref(), n)
}

fn rate(start: Option<&Start>, n: usize) -> Rate {
    let Some((t, c, before)) = start else {
        return Rate {
            per_s: 0.0,
            cpu_us: 0.0,
            by_thread: [0.0; GROUPS.len()],
        };
    };
    let (secs, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
    let by_thread = threads::spent(before, &threads::snapshot()).map(|s| s * 1e6 / n as f64);
    Rate {
        per_s: n as f64 / secs,
        cpu_us: cpu * 1e6 / n as f64,
        by_thread,
    }
}

/// The adapter with a no-op handler: messages/s from the first handler call to the n-th
/// recorded result.
fn adapter(
    rt: &tokio::runtime::Runtime,
    kafka: &MockKafka,
    topic: &str,
    n: usize,
    store: Store,
) -> Rate {
    rt.block_on(async {
        let processor =
            KafkaProcessor::builder(store, consumer_config(kafka, &format!("adapter-{topic}")))
                .topics([topic])
                .build()
                .expect("processor");
        let handle = processor.handle();
        let first: Arc<parking_lot::Mutex<Option<Start>>> = Arc::default();
        let mark = first.clone();
        let task = tokio::spawn(processor.run(move |msg: Incoming| {
            let mark = mark.clone();
            async move {
                mark.lock().get_or_insert_with(started);
                std::hint::black_box(msg.payload());
                Ok(Outcome::done())
            }
        }));
        while handle.stats().processed < n as u64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let rate = rate(first.lock().as_ref(), n);
        handle.shutdown();
        task.await.expect("join").expect("run");
        rate
    })
}

/// A plain rdkafka echo service for the round-trip baseline, until `stop`.
fn plain_echo(
    kafka: &MockKafka,
    topic: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let consumer: BaseConsumer = consumer_config(kafka, "plain-echo")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let producer: BaseProducer = kafka.client_config().create().expect("producer");
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            producer.poll(Duration::ZERO);
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(10)) else {
                continue;
            };
            let header = |name: &str| {
                m.headers()
                    .and_then(|hs| hs.iter().find(|h| h.key == name))
                    .and_then(|h| h.value)
                    .map(<[u8]>::to_vec)
            };
            let (Some(reply_to), Some(id)) = (header("reply-to"), header("x-request-id")) else {
                continue;
            };
            let reply_to = String::from_utf8_lossy(&reply_to).into_owned();
            let headers = OwnedHeaders::new().insert(Header {
                key: "x-request-id",
                value: Some(&id),
            });
            let payload = m.payload().unwrap_or_default().to_vec();
            let record = BaseRecord::<(), _>::to(&reply_to)
                .payload(&payload)
                .headers(headers);
            let _ = producer.send(record);
            producer.poll(Duration::ZERO);
            let _ = consumer.store_offset(m.topic(), m.partition(), m.offset());
        }
        let _ = producer.flush(Duration::from_secs(5));
    })
}

async fn round_trips(requester: &Requester, topic: &str, n: usize) -> (f64, f64) {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let reply = requester
            .request(
                topic,
                Request::new(format!("m{i}")).idempotency_key(format!("{topic}-{i}")),
                Duration::from_secs(10),
            )
            .await
            .expect("reply");
        std::hint::black_box(reply);
        lat.push(t.elapsed());
    }
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    (pct(0.5), pct(0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var("IDEMKV_BENCH_QUICK").is_ok_and(|v| v != "0");
    let (n, rounds, trips) = if quick {
        (20_000, 1, 200)
    } else {
        (100_000, 3, 2_000)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let kafka = MockKafka::start(1).expect("mock cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: [(&str, Option<Durability>); 5] = [
        ("plain rdkafka loop", None),
        ("adapter, in memory", None),
        ("adapter, None", Some(Durability::None)),
        (
            "adapter, Batched",
            Some(Durability::Batched {
                max_delay: Duration::from_millis(2),
            }),
        ),
        ("adapter, Immediate", Some(Durability::Immediate)),
    ];
    let mut results: Vec<Vec<Rate>> = vec![Vec::new(); rows.len()];
    // `IDEMKV_BENCH_ROWS=0,3`: only those rows (for profiling); `IDEMKV_BENCH_RR=0`: no
    // round trips.
    let only: Option<Vec<usize>> = std::env::var("IDEMKV_BENCH_ROWS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    for round in 0..rounds {
        for (i, (name, durability)) in rows.iter().enumerate() {
            if only.as_ref().is_some_and(|o| !o.contains(&i)) {
                results[i].push(Rate {
                    per_s: f64::NAN,
                    cpu_us: f64::NAN,
                    by_thread: [f64::NAN; GROUPS.len()],
                });
                continue;
            }
            let topic = format!("bench-{round}-{i}");
            produce(&kafka, &topic, n);
            let rate = match (i, durability) {
                (0, _) => plain(&kafka, &topic, n),
                (_, None) => adapter(&rt, &kafka, &topic, n, Store::in_memory()),
                (_, Some(d)) => {
                    let store = Store::builder()
                        .durability(*d)
                        .open(dir.path().join(&topic))
                        .expect("store");
                    adapter(&rt, &kafka, &topic, n, store)
                }
            };
            eprintln!(
                "round {round}: {name}: {:.0} msg/s, {:.2} CPU µs/msg",
                rate.per_s, rate.cpu_us
            );
            results[i].push(rate);
        }
    }
    let per_s = |i: usize| median(results[i].iter().map(|r| r.per_s).collect());
    let cpu_us = |i: usize| median(results[i].iter().map(|r| r.cpu_us).collect());
    let base = per_s(0);
    let mut csv = String::from("row,messages_per_s,ratio_to_plain,cpu_us_per_message\n");
    println!("\n{n} messages, {PARTITIONS} partitions, median of {rounds} round(s)");
    println!(
        "{:<22} {:>12} {:>8} {:>12}",
        "row", "msg/s", "ratio", "CPU µs/msg"
    );
    for (i, (name, _)) in rows.iter().enumerate() {
        let (m, c) = (per_s(i), cpu_us(i));
        println!("{name:<22} {m:>12.0} {:>8.2} {c:>12.2}", m / base);
        csv.push_str(&format!("{name},{m:.0},{:.3},{c:.3}\n", m / base));
    }
    // Where each row's CPU went, by thread group (median over rounds, µs a message). The
    // groups do not add up to the total: the mock broker's threads and any thread that ended
    // inside the window are in the total only.
    let by = |i: usize, g: usize| median(results[i].iter().map(|r| r.by_thread[g]).collect());
    println!("\nCPU µs a message, by thread (the mock broker's are left out)");
    print!("{:<22}", "row");
    let mut threads_csv = String::from("row");
    for g in GROUPS {
        print!(" {g:>16}");
        threads_csv.push_str(&format!(",{} us per message", g));
    }
    println!();
    threads_csv.push('\n');
    for (i, (name, _)) in rows.iter().enumerate() {
        print!("{name:<22}");
        threads_csv.push_str(name);
        for g in 0..GROUPS.len() {
            print!(" {:>16.2}", by(i, g));
            threads_csv.push_str(&format!(",{:.3}", by(i, g)));
        }
        println!();
        threads_csv.push('\n');
    }
    let _ = std::fs::write("target/bench-kafka-threads.csv", threads_csv);

    if std::env::var("IDEMKV_BENCH_RR").is_ok_and(|v| v == "0") {
        let _ = std::fs::write("target/bench-kafka.csv", csv);
        return;
    }
    // Request-reply round trips, one at a time.
    kafka.create_topic("rr-plain", 1).expect("topic");
    kafka.create_topic("rr-adapter", 1).expect("topic");
    kafka.create_topic("rr-replies", 1).expect("topic");
    let stop = Arc::new(AtomicBool::new(false));
    let echo = plain_echo(&kafka, "rr-plain", stop.clone());
    let store = Store::builder()
        .durability(Durability::Batched {
            max_delay: Duration::from_millis(2),
        })
        .open(dir.path().join("rr"))
        .expect("store");
    let (plain_rt, adapter_rt) = rt.block_on(async {
        let processor = KafkaProcessor::builder(store, consumer_config(&kafka, "rr-adapter"))
            .topics(["rr-adapter"])
            .build()
            .expect("processor");
        let handle = processor.handle();
        let task = tokio::spawn(processor.run(|msg: Incoming| async move {
            Ok(Outcome::reply(msg.payload().unwrap_or_default().to_vec()))
        }));
        let requester = Requester::new(&kafka.client_config(), "rr-replies")
            .await
            .expect("requester");
        // Warm up both (group joins, connections).
        let _ = round_trips(&requester, "rr-plain", 20).await;
        let _ = round_trips(&requester, "rr-adapter", 20).await;
        let plain_rt = round_trips(&requester, "rr-plain", trips).await;
        let adapter_rt = round_trips(&requester, "rr-adapter", trips).await;
        handle.shutdown();
        task.await.expect("join").expect("run");
        (plain_rt, adapter_rt)
    });
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    println!("\nrequest-reply round trip, {trips} sequential requests (ms)");
    println!("{:<22} {:>8} {:>8}", "row", "p50", "p99");
    println!(
        "{:<22} {:>8.2} {:>8.2}",
        "plain rdkafka echo", plain_rt.0, plain_rt.1
    );
    println!(
        "{:<22} {:>8.2} {:>8.2}",
        "adapter, Batched", adapter_rt.0, adapter_rt.1
    );
    println!("p50 ratio adapter/plain: {:.2}", adapter_rt.0 / plain_rt.0);
    csv.push_str(&format!(
        "rr plain p50 ms,{:.3},,\nrr plain p99 ms,{:.3},,\n",
        plain_rt.0, plain_rt.1
    ));
    csv.push_str(&format!(
        "rr adapter p50 ms,{:.3},,\nrr adapter p99 ms,{:.3},,\n",
        adapter_rt.0, adapter_rt.1
    ));
    let _ = std::fs::write("target/bench-kafka.csv", csv);
}
