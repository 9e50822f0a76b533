//! librdkafka's in-process mock cluster, set up for fast tests and for the `--mock` example.
//!
//! Invariant: test and example support only; no production path uses it.

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

use super::KafkaError;

/// An in-process Kafka cluster (librdkafka's mock brokers) listening on 127.0.0.1, for tests,
/// examples and benchmarks. It lives as long as this value.
///
/// Unlike a bare `MockCluster`, consumer groups join at once (the broker's initial rebalance
/// delay is set to zero) and [`client_config`](MockKafka::client_config) sets short fetch
/// waits: the mock does not wake a waiting fetch when a message arrives.
///
/// ```
/// let kafka = idemkv::kafka::MockKafka::start(1)?;
/// kafka.create_topic("orders.requests", 2)?;
/// assert!(kafka.bootstrap_servers().starts_with("127.0.0.1:"));
/// # Ok::<(), idemkv::kafka::KafkaError>(())
/// ```
pub struct MockKafka {
    /// The client whose `test.mock.num.brokers` created (and owns) the cluster.
    owner: BaseProducer,
    bootstrap: String,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

impl MockKafka {
    /// Starts a cluster of `brokers` mock brokers on ephemeral loopback ports.
    pub fn start(brokers: u16) -> Result<Self, KafkaError> {
        if brokers == 0 {
            return Err(KafkaError::Config(
                "a mock cluster needs at least one broker".into(),
            ));
        }
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()?;
        let bootstrap = owner
            .client()
            .mock_cluster()
            .ok_or_else(|| KafkaError::Config("librdkafka did not start a mock cluster".into()))?
            .bootstrap_servers();
        set_zero_rebalance_delay(&owner);
        Ok(MockKafka { owner, bootstrap })
    }

    /// `host:port,…` of the brokers.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Creates `topic` with `partitions` partitions (topics the mock creates on first use get
    /// four).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        let cluster = self
            .owner
            .client()
            .mock_cluster()
            .ok_or_else(|| KafkaError::runtime("the mock cluster is gone"))?;
        cluster.create_topic(topic, partitions, 1)?;
        Ok(())
    }

    /// A client configuration for this cluster: the bootstrap servers, a 10 ms fetch wait,
    /// no linger, and a 1 s consumer session. The mock broker keeps a member that left its
    /// group until the member's session times out (with Kafka's default 45 s, the next member
    /// waits that long to join); librdkafka logs that producers ignore the consumer settings.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("fetch.wait.max.ms", "10")
            .set("linger.ms", "0")
            .set("session.timeout.ms", "1000")
            .set("heartbeat.interval.ms", "100");
        config
    }
}

/// The mock broker delays a group's first join by 3 s (like Kafka's
/// `group.initial.rebalance.delay.ms`); librdkafka has no property for it, only this call.
#[allow(unsafe_code)]
fn set_zero_rebalance_delay(owner: &BaseProducer) {
    let client = owner.client().native_ptr();
    // SAFETY: `client` is the live handle of `owner`, borrowed for this call. The returned
    // cluster pointer is owned by that handle (it is destroyed with it, not by us) and is
    // checked for null before use; the setter only enqueues a configuration op on the
    // cluster's own thread.
    unsafe {
        let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(client);
        if !cluster.is_null() {
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
        }
    }
}
