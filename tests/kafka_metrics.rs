//! The Kafka processor's metrics (features `kafka` and `metrics`) through a Prometheus
//! recorder: each assigned partition's lag from librdkafka's statistics, while a slow handler
//! leaves messages behind, and the processor's counters. Its own test binary: it installs the
//! process-wide recorder.
#![cfg(all(feature = "kafka", feature = "metrics", not(loom)))]

use std::time::{Duration, Instant};

use idemkv::Store;
use idemkv::kafka::{Incoming, KafkaProcessor, MockKafka, Outcome};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn gauge(text: &str, name: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_lag_and_processor_counters() {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("recorder");
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("requests", 1).expect("topic");
    let producer: FutureProducer = mock.client_config().create().expect("producer");
    for i in 0..40 {
        let key = format!("k{i}");
        let record = FutureRecord::to("requests").key(&key).payload("x");
        producer
            .send(record, Duration::from_secs(5))
            .await
            .expect("sent");
    }
    let mut consumer = mock.client_config();
    consumer
        .set("group.id", "lag")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "100");
    let processor = KafkaProcessor::builder(Store::in_memory(), consumer)
        .topics(["requests"])
        .build()
        .expect("processor");
    let handle = processor.handle();
    // 40 ms a message: the partition lags behind for over a second.
    let running = tokio::spawn(processor.run(|_m: Incoming| async {
        tokio::time::sleep(Duration::from_millis(40)).await;
        Ok(Outcome::reply("done"))
    }));
    let until = Instant::now() + Duration::from_secs(20);
    let mut seen_lag = false;
    while Instant::now() < until && !seen_lag {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = prometheus.render();
        seen_lag = gauge(&text, "idemkv_kafka_consumer_lag")
            .iter()
            .any(|&v| v > 0.0)
            && text.contains("partition=\"0\"")
            && text.contains("topic=\"requests\"");
    }
    assert!(
        seen_lag,
        "no positive lag gauge in:\n{}",
        prometheus.render()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while handle.stats().processed < 40 {
        assert!(Instant::now() < deadline, "{:?}", handle.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Everything recorded: the lag comes down to 0 at the next statistics.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gauge(&prometheus.render(), "idemkv_kafka_consumer_lag") != [0.0] {
        assert!(Instant::now() < deadline, "{}", prometheus.render());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    idemkv::metrics::record_processor(&handle.stats());
    let text = prometheus.render();
    assert_eq!(
        gauge(&text, "idemkv_kafka_processed_total"),
        [40.0],
        "{text}"
    );
    handle.shutdown();
    running.await.expect("task").expect("run");
}
