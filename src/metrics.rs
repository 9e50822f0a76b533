//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`): install any recorder
//! (`metrics-exporter-prometheus`, StatsD, …) and idemkv's figures appear in it.
//!
//! - **Histograms**, recorded where they happen: `idemkv_fsync_seconds` and
//!   `idemkv_group_commit_records` (one sample per log batch written and synced),
//!   `idemkv_checkpoint_seconds`, and `idemkv_http_overhead_seconds` (the time the
//!   idempotency layer adds to a request, the handler's own time excluded).
//! - **Counters and gauges** of a store are read from [`Store::stats`](crate::Store::stats)
//!   and published by `record_store` — call it before each scrape (or on a timer), so the
//!   request path pays nothing for them: `idemkv_acquired_total`, `idemkv_replayed_total`,
//!   `idemkv_in_progress_total`, `idemkv_mismatches_total`, `idemkv_takeovers_total`,
//!   `idemkv_expirations_total`, `idemkv_completions_total`, `idemkv_releases_total`,
//!   `idemkv_stale_leases_total`, `idemkv_checkpoints_total`; gauges `idemkv_records`,
//!   `idemkv_bytes`, `idemkv_in_flight` (records held by a lease), `idemkv_log_bytes`,
//!   `idemkv_log_segments`, `idemkv_poisoned` (0 or 1).
//! - The Kafka processor's counters: `record_processor` (features `metrics` and `kafka`), as
//!   `idemkv_kafka_<counter>_total`; and, from librdkafka's statistics (every
//!   `statistics.interval.ms`, 5 s unless the consumer configuration sets it), each assigned
//!   partition's lag as the gauge `idemkv_kafka_consumer_lag{topic, partition}`.
//!
//! Invariant: without the feature every hook here compiles to nothing.

#[cfg(feature = "metrics")]
use std::time::Duration;

/// Publishes `store`'s counters and gauges (see the module docs).
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn record_store(store: &crate::Store) {
    record_stats(&store.stats());
}

/// Publishes counters and gauges from a [`Stats`](crate::Stats) snapshot.
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn record_stats(s: &crate::Stats) {
    use metrics::{counter, gauge};
    counter!("idemkv_acquired_total").absolute(s.acquired);
    counter!("idemkv_replayed_total").absolute(s.replayed);
    counter!("idemkv_in_progress_total").absolute(s.in_progress);
    counter!("idemkv_mismatches_total").absolute(s.mismatches);
    counter!("idemkv_takeovers_total").absolute(s.takeovers);
    counter!("idemkv_expirations_total").absolute(s.expirations);
    counter!("idemkv_completions_total").absolute(s.completions);
    counter!("idemkv_releases_total").absolute(s.releases);
    counter!("idemkv_stale_leases_total").absolute(s.stale_leases);
    counter!("idemkv_checkpoints_total").absolute(s.checkpoints);
    gauge!("idemkv_records").set(s.records as f64);
    gauge!("idemkv_bytes").set(s.bytes as f64);
    gauge!("idemkv_in_flight").set(s.in_flight as f64);
    gauge!("idemkv_log_bytes").set(s.log_bytes as f64);
    gauge!("idemkv_log_segments").set(s.log_segments as f64);
    gauge!("idemkv_poisoned").set(if s.poisoned { 1.0 } else { 0.0 });
}

/// Publishes a Kafka processor's counters, from
/// [`ProcessorHandle::stats`](crate::kafka::ProcessorHandle::stats).
#[cfg(all(feature = "metrics", feature = "kafka"))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "metrics", feature = "kafka"))))]
pub fn record_processor(s: &crate::kafka::ProcessorStats) {
    use metrics::counter;
    counter!("idemkv_kafka_processed_total").absolute(s.processed);
    counter!("idemkv_kafka_replayed_total").absolute(s.replayed);
    counter!("idemkv_kafka_failed_total").absolute(s.failed);
    counter!("idemkv_kafka_retried_total").absolute(s.retried);
    counter!("idemkv_kafka_dead_lettered_total").absolute(s.dead_lettered);
    counter!("idemkv_kafka_rejected_total").absolute(s.rejected);
    counter!("idemkv_kafka_replies_total").absolute(s.replies);
    counter!("idemkv_kafka_reply_failures_total").absolute(s.reply_failures);
    counter!("idemkv_kafka_offsets_stored_total").absolute(s.offsets_stored);
    counter!("idemkv_kafka_sent_total").absolute(s.sent);
    counter!("idemkv_kafka_untokened_total").absolute(s.untokened);
}

/// One log batch written and synced.
#[cfg(feature = "metrics")]
pub(crate) fn log_batch(took: Duration, records: u32) {
    metrics::histogram!("idemkv_fsync_seconds").record(took.as_secs_f64());
    metrics::histogram!("idemkv_group_commit_records").record(f64::from(records));
}

/// One checkpoint written.
#[cfg(feature = "metrics")]
pub(crate) fn checkpoint(took: Duration) {
    metrics::histogram!("idemkv_checkpoint_seconds").record(took.as_secs_f64());
}

/// The time the idempotency layer added to one request.
#[cfg(all(feature = "metrics", feature = "http"))]
pub(crate) fn http_overhead(took: Duration) {
    metrics::histogram!("idemkv_http_overhead_seconds").record(took.as_secs_f64());
}
