//! The requesting side of request-reply: send a request, await the reply with its
//! `x-request-id`.
//!
//! Invariant: a reply is handed to the request whose `x-request-id` it carries, and to no
//! other.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::oneshot;

use super::{ERROR, IDEMPOTENCY_KEY, KafkaError, REPLAYED, REPLY_TO, REQUEST_ID};

/// A request for [`Requester::request`].
#[derive(Clone, Debug, Default)]
pub struct Request {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    /// A request with `payload`.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Request {
            payload: payload.into(),
            ..Request::default()
        }
    }

    /// The message key (it picks the partition; the reply is keyed the same).
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the `idempotency-key` header: retries with the same key get the same reply.
    pub fn idempotency_key(self, key: impl Into<Vec<u8>>) -> Self {
        self.header(IDEMPOTENCY_KEY, key)
    }

    /// Adds a header, e.g. `x-echo-set-header: X-Trace: t1`.
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }
}

/// A reply, matched to its request by `x-request-id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The payload.
    pub payload: Vec<u8>,
    /// All headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Reply {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether the reply was re-sent from the store (the handler did not run again).
    pub fn is_replayed(&self) -> bool {
        self.header(REPLAYED) == Some(b"true")
    }

    /// The error of a recorded failure, a refused request or a dead-lettered one.
    pub fn error(&self) -> Option<&str> {
        self.header(ERROR).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The correlation id.
    pub fn request_id(&self) -> Option<&str> {
        self.header(REQUEST_ID)
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>>;

/// Sends requests and awaits their replies on a reply topic of its own.
///
/// The reply consumer is *assigned* every partition of the reply topic at its end offsets when
/// the requester is created (no consumer group, so no rebalance wait and no committed offsets):
/// every reply produced after `new` returns is seen. Replies nobody waits for (late, or for
/// another requester sharing the topic) are dropped.
pub struct Requester {
    producer: FutureProducer,
    reply_topic: String,
    waiters: Waiters,
    prefix: String,
    next: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester")
            .field("reply_topic", &self.reply_topic)
            .finish_non_exhaustive()
    }
}

impl Drop for Requester {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Requester {
    /// Connects with `config` (at least `bootstrap.servers`) and starts listening on
    /// `reply_topic`, which must exist. Needs a Tokio runtime.
    pub async fn new(config: &ClientConfig, reply_topic: &str) -> Result<Self, KafkaError> {
        let producer: FutureProducer = config.create()?;
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::process::id(),
        );
        let prefix = format!("{seed:016x}");
        // librdkafka wants a group id even for `assign`; this one never joins or commits.
        let mut consumer_config = config.clone();
        consumer_config
            .set("group.id", format!("idemkv-requester-{prefix}"))
            .set("enable.auto.commit", "false");
        let topic = reply_topic.to_owned();
        let consumer = tokio::task::spawn_blocking(move || -> Result<_, KafkaError> {
            let consumer: StreamConsumer = consumer_config.create()?;
            let timeout = Duration::from_secs(10);
            let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                return Err(KafkaError::runtime(format!(
                    "reply topic {topic:?} does not exist"
                )));
            }
            let mut tpl = TopicPartitionList::new();
            for p in partitions {
                let (_, high) = consumer.fetch_watermarks(&topic, p, timeout)?;
                tpl.add_partition_offset(&topic, p, Offset::Offset(high))?;
            }
            consumer.assign(&tpl)?;
            Ok(consumer)
        })
        .await
        .map_err(|_| KafkaError::Closed)??;
        let waiters: Waiters = Arc::default();
        let routes = waiters.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else {
                    continue;
                };
                let headers = super::from_headers(m.headers());
                let reply = Reply {
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers,
                };
                let Some(id) = reply.request_id() else {
                    continue;
                };
                let waiter = routes.lock().remove(id);
                if let Some(tx) = waiter {
                    let _ = tx.send(reply);
                }
            }
        });
        Ok(Requester {
            producer,
            reply_topic: reply_topic.to_owned(),
            waiters,
            prefix,
            next: AtomicU64::new(0),
            task,
        })
    }

    /// Sends `request` to `topic` with a fresh `x-request-id` and `reply-to` set to this
    /// requester's topic, and waits at most `timeout` for the reply.
    pub async fn request(
        &self,
        topic: &str,
        request: Request,
        timeout: Duration,
    ) -> Result<Reply, KafkaError> {
        let id = format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().insert(id.clone(), tx);
        let result = self.send_and_wait(topic, &request, &id, rx, timeout).await;
        self.waiters.lock().remove(&id);
        result
    }

    async fn send_and_wait(
        &self,
        topic: &str,
        request: &Request,
        id: &str,
        rx: oneshot::Receiver<Reply>,
        timeout: Duration,
    ) -> Result<Reply, KafkaError> {
        let given = request
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()));
        let ours: [(&str, &[u8]); 2] = [
            (REPLY_TO, self.reply_topic.as_bytes()),
            (REQUEST_ID, id.as_bytes()),
        ];
        let headers = super::to_headers(given.chain(ours));
        let mut record = FutureRecord::to(topic)
            .payload(&request.payload)
            .headers(headers);
        if let Some(k) = &request.key {
            record = record.key(k);
        }
        self.producer
            .send(record, timeout)
            .await
            .map_err(|(e, _)| KafkaError::Delivery {
                topic: topic.to_owned(),
                source: e,
            })?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(KafkaError::Closed),
            Err(_) => Err(KafkaError::Timeout(timeout)),
        }
    }
}
