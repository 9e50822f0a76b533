//! What the store holds after N messages, side by side in one run, on the mock cluster:
//!
//! - **records**: the default mode, a completed record per message kept for the result TTL (so a
//!   redelivery replays it);
//! - **tokens**: token-based deduplication (`require_tokens`): the sender creates a token per
//!   message in the shared store before producing it (here: the bench, as a sender would), the
//!   receiver deletes it with its result and keeps no result.
//!
//! Reported per mode: the most records the store held while the messages streamed (produced
//! in chunks, tokens created with each chunk: at most a chunk in flight), the records at the
//! end and after one more sweep, and messages/s. N = 1,000,000 (`IDEMKV_BENCH_QUICK=1`: 100,000).
//!
//! `cargo bench --features kafka --bench tokens`. Writes `target/bench-tokens.csv`.

use std::time::{Duration, Instant};

use idemkv::kafka::{Incoming, KafkaProcessor, MockKafka, Outcome};
use idemkv::{OwnedKey, Store, Write};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// Messages `from..to`, each with its token first in token mode.
fn produce(producer: &BaseProducer, topic: &str, from: usize, to: usize, tokens: Option<&Store>) {
    for i in from..to {
        let key = format!("m{i}");
        if let Some(store) = tokens {
            // The sender's side of the protocol: the token first, then the message.
            let w = Write::put_if_absent(OwnedKey::new("tokens", &key), Vec::new());
            let _ = store.blocking_cas(&w).expect("token");
        }
        let headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(&key),
        });
        let mut record = BaseRecord::to(topic)
            .key(&key)
            .payload("x")
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
    producer.flush(Duration::from_secs(120)).expect("flush");
}

/// Produced in chunks while the processor runs (the mock cluster keeps a bounded log per
/// partition, and a stream is what this measures anyway).
const CHUNK: usize = 50_000;

struct Held {
    /// The most records seen in the store while the messages streamed.
    peak: u64,
    live: u64,
    after_sweep: u64,
    per_s: f64,
}

fn run(kafka: &MockKafka, n: usize, tokens: bool) -> Held {
    // The sweeper every 100 ms, as a long-running store would have one.
    let store = Store::builder()
        .sweep_interval(Some(Duration::from_millis(100)))
        .max_records(4_000_000)
        .max_bytes(4 << 30)
        .build()
        .expect("store");
    let topic = if tokens {
        "with-tokens"
    } else {
        "with-records"
    };
    kafka.create_topic(topic, 4).expect("topic");
    let mut config = kafka.client_config();
    config
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000");
    let producer: BaseProducer = config.create().expect("producer");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (per_s, peak) = rt.block_on(async {
        let mut c = kafka.client_config();
        c.set("group.id", topic)
            .set("auto.offset.reset", "earliest");
        let mut b = KafkaProcessor::builder(store.clone(), c).topics([topic]);
        if tokens {
            b = b.require_tokens("tokens");
        }
        let processor = b.build().expect("processor");
        let handle = processor.handle();
        let t = Instant::now();
        let task = tokio::spawn(processor.run(|_msg: Incoming| async { Ok(Outcome::done()) }));
        let (mut produced, mut peak) = (0, 0);
        let (mut last, mut since) = (0, Instant::now());
        loop {
            let s = handle.stats();
            let done = s.processed + s.untokened;
            if done >= n as u64 {
                break;
            }
            // The next chunk once the processor is within one chunk of the producer.
            if produced < n && done + CHUNK as u64 >= produced as u64 {
                let to = (produced + CHUNK).min(n);
                let tokens = tokens.then_some(&store);
                tokio::task::block_in_place(|| produce(&producer, topic, produced, to, tokens));
                produced = to;
            }
            peak = peak.max(store.stats().records);
            if done != last {
                (last, since) = (done, Instant::now());
            }
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "{topic}: stuck at {done} of {n}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let per_s = n as f64 / t.elapsed().as_secs_f64();
        handle.shutdown();
        task.await.expect("join").expect("run");
        (per_s, peak)
    });
    let live = store.stats().records;
    store.sweep_expired();
    Held {
        peak,
        live,
        after_sweep: store.stats().records,
        per_s,
    }
}

fn main() {
    let quick = std::env::var("IDEMKV_BENCH_QUICK").is_ok_and(|v| v != "0");
    let n = if quick { 100_000 } else { 1_000_000 };
    let kafka = MockKafka::start(1).expect("mock");
    let records = run(&kafka, n, false);
    let tokens = run(&kafka, n, true);
    println!("\nrecords held after {n} messages (4 partitions, no-op handler, in-memory store)");
    println!(
        "(produced in chunks of {CHUNK} while processing, tokens created with each chunk; sweeper every 100 ms)"
    );
    println!(
        "{:<44} {:>10} {:>10} {:>12} {:>10}",
        "mode", "peak", "at end", "after sweep", "msgs/s"
    );
    for (name, h) in [
        ("records (default: a result per message, 24 h)", &records),
        ("tokens (require_tokens)", &tokens),
    ] {
        println!(
            "{name:<44} {:>10} {:>10} {:>12} {:>10.0}",
            h.peak, h.live, h.after_sweep, h.per_s
        );
    }
    let csv = format!(
        "mode,messages,peak,at_end,after_sweep,msgs_per_s\nrecords,{n},{},{},{},{:.0}\ntokens,{n},{},{},{},{:.0}\n",
        records.peak,
        records.live,
        records.after_sweep,
        records.per_s,
        tokens.peak,
        tokens.live,
        tokens.after_sweep,
        tokens.per_s
    );
    let _ = std::fs::write("target/bench-tokens.csv", csv);
}
