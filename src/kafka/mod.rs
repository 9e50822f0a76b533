//! Exactly-once message processing and request-reply over Kafka (feature `kafka`).
//!
//! Invariant: an offset is stored for commit only after its message's result is recorded in the
//! store (or it was refused as bad input).
//!
//! Kafka delivers at least once. [`KafkaProcessor`] makes the *effect* of each message happen
//! once: for every message it derives an idempotency key, runs your async handler under a lease
//! of the store (renewed while it runs), records the result — atomically with any versioned
//! writes the handler asks for — and only then stores the offset for commit. A redelivered
//! message does not run again: its recorded reply is re-sent if the request asked for one.
//!
//! Request-reply follows the Return Address pattern: a request names its `reply-to` topic,
//! the reply carries the request's `x-request-id`, and each `x-echo-set-header: Name: value`
//! header of the request becomes `Name: value` on the reply (the same rules as the HTTP layer,
//! [`crate::echo`]). [`Requester`] sends a request and awaits its reply.
//!
//! ```no_run
//! use idemkv::kafka::{HandlerError, Incoming, KafkaProcessor, Outcome};
//! use idemkv::Store;
//! use rdkafka::ClientConfig;
//!
//! # async fn run() -> Result<(), idemkv::kafka::KafkaError> {
//! let store = Store::builder().open("./data/orders").expect("open the store");
//! let mut config = ClientConfig::new();
//! config.set("bootstrap.servers", "127.0.0.1:9092").set("group.id", "orders");
//! let processor = KafkaProcessor::builder(store, config)
//!     .topics(["orders.requests"])
//!     .dead_letter_topic("orders.dead")
//!     .build()?;
//! let handle = processor.handle(); // handle.shutdown() stops it gracefully
//! processor
//!     .run(|msg: Incoming| async move {
//!         let order = msg.payload().ok_or_else(|| HandlerError::fail("empty request"))?;
//!         // ... create the order (once per idempotency key) ...
//!         Ok::<_, HandlerError>(Outcome::reply(order.to_vec()))
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Offsets are committed after the store has recorded the result (see DESIGN.md, "Kafka"),
//! so every crash point either re-runs nothing or re-runs work whose result was never recorded,
//! under a lease no one else holds. Kafka transactions are not used for correctness.

mod call;
mod mock;
mod processor;
mod requester;
mod stored;

use std::time::Duration;

use rdkafka::message::{Header, Headers, OwnedHeaders};

pub use call::{FollowUp, HttpResponse, PendingCall};
pub use mock::MockKafka;
pub use processor::{
    ClientHooks, Handler, KafkaProcessor, ProcessorBuilder, ProcessorHandle, ProcessorStats,
};
pub use requester::{Reply, Request, Requester};

/// Header of a request naming the idempotency key (the default first key source).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Header of a request naming the topic its reply goes to.
pub const REPLY_TO: &str = "reply-to";
/// The correlation id: copied from a request onto its reply.
pub const REQUEST_ID: &str = "x-request-id";
/// Header of a request asking for a header on its reply (`Name: value`).
pub const ECHO_SET_HEADER: &str = "x-echo-set-header";
/// Set (`true`) on a reply re-sent from the store rather than produced by running the handler.
pub const REPLAYED: &str = "idempotent-replayed";
/// On a reply or a dead-lettered message: what went wrong.
pub const ERROR: &str = "x-error";
/// On a dead-lettered message: how many attempts were made.
pub const ATTEMPTS: &str = "x-attempts";
/// On a dead-lettered message: `topic/partition/offset` of the original.
pub const ORIGIN: &str = "x-origin";

/// Kafka headers from `(name, value)` pairs, in order.
fn to_headers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> OwnedHeaders {
    pairs
        .into_iter()
        .fold(OwnedHeaders::new(), |hs, (key, value)| {
            hs.insert(Header {
                key,
                value: Some(value),
            })
        })
}

/// A message's headers as `(name, value)` pairs (a null value reads as empty).
fn from_headers(headers: Option<&rdkafka::message::BorrowedHeaders>) -> Vec<(String, Vec<u8>)> {
    headers
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

impl KafkaError {
    pub(crate) fn runtime(what: impl Into<String>) -> Self {
        KafkaError::Runtime {
            what: what.into(),
            source: None,
        }
    }
}

/// Errors of the Kafka adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// The Kafka client failed (configuration, connection, metadata, commit).
    #[error("kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// The idempotency store failed; nothing was acknowledged past the failure.
    #[error("idempotency store: {0}")]
    Store(#[from] crate::Error),
    /// The adapter was configured inconsistently (found when it is built or started).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The adapter failed while running, for a reason that is neither the client's nor the
    /// store's: a thread that could not start, the mock cluster gone, a reply topic missing, a
    /// store record that kept changing under a held lease.
    #[error("{what}")]
    Runtime {
        /// What failed.
        what: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The store holds a record under a message's key that this adapter did not write.
    #[error("the record stored for key {key:?} is not a Kafka result: {reason}")]
    CorruptRecord {
        /// The idempotency key (lossy UTF-8).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A message (a dead letter or a request) could not be delivered.
    #[error("could not deliver to topic {topic:?}: {source}")]
    Delivery {
        /// The destination topic.
        topic: String,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// No reply arrived in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The requester's reply consumer has stopped.
    #[error("the requester is closed")]
    Closed,
}

/// Where a message's idempotency key comes from; the first source that yields a non-empty
/// value wins.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// A header's value (by default [`IDEMPOTENCY_KEY`]).
    Header(String),
    /// The message key.
    MessageKey,
    /// `topic/partition/offset`: deduplicates redeliveries of one record, not producer
    /// duplicates (those have new offsets). Always yields a key.
    Position,
}

impl KeySource {
    /// The default order: the `idempotency-key` header, then the message key, then the
    /// position.
    pub fn defaults() -> Vec<KeySource> {
        vec![
            KeySource::Header(IDEMPOTENCY_KEY.to_owned()),
            KeySource::MessageKey,
            KeySource::Position,
        ]
    }
}

/// What a handler returns on success: the reply (sent when the request names a `reply-to`
/// topic), the versioned writes to commit atomically with the record of this message, and the
/// messages it sends (the outbox, see [`Outcome::send`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) writes: Vec<crate::Write>,
    pub(crate) outgoing: Vec<crate::outbox::Outgoing>,
    pub(crate) follow_ups: Vec<PendingCall>,
}

impl Outcome {
    /// Done, with an empty reply.
    pub fn done() -> Self {
        Outcome::default()
    }

    /// Done, replying with `payload`.
    pub fn reply(payload: impl Into<Vec<u8>>) -> Self {
        Outcome {
            payload: payload.into(),
            ..Outcome::default()
        }
    }

    /// Adds a header to the reply. Names are stored lower-case; a name longer than 255 bytes
    /// or a value over 1 MiB is dropped (headers that size are not what headers are for).
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        let value = value.into();
        if !name.is_empty() && name.len() <= 255 && value.len() <= 1 << 20 {
            self.headers.push((name.to_ascii_lowercase(), value));
        }
        self
    }

    /// Commits `write` atomically with the record of this message (see
    /// [`crate::Store::blocking_complete_with`]). If any write's condition fails, nothing is recorded
    /// and the attempt counts as a retryable failure.
    pub fn write(mut self, write: crate::Write) -> Self {
        self.writes.push(write);
        self
    }

    /// Sends `msg` through the outbox: it is recorded in the same batch as this message's
    /// result and produced only after that commits, with an `idempotency-key` header of
    /// `{this message's idempotency key}/{index}` (`index` counts this outcome's messages
    /// from 0), the same on every delivery, so an idemkv consumer downstream runs it once.
    /// A crash after the result commits and before the messages are out leaves them recorded;
    /// the message is then redelivered (its offset is stored only after its outbox is
    /// empty) and the redelivery produces what is left. A topic name Kafka would refuse makes
    /// the message's result a recorded failure, and nothing is sent.
    ///
    /// ```
    /// use idemkv::kafka::Outcome;
    /// use idemkv::outbox::Outgoing;
    /// let outcome = Outcome::reply("ok")
    ///     .send(Outgoing::to("billing.events").key("order-17").payload("BillingSucceeded"));
    /// # drop(outcome);
    /// ```
    pub fn send(mut self, msg: crate::outbox::Outgoing) -> Self {
        self.outgoing.push(msg);
        self
    }

    /// Completes a call begun with [`Incoming::invoke_http`] once this outcome commits. The
    /// request's reply is then the follow-up's: this outcome's own reply is not sent (a
    /// redelivery of the request replays the follow-up's reply once it exists).
    pub fn follow_up(mut self, call: PendingCall) -> Self {
        self.follow_ups.push(call);
        self
    }

    /// The reply payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}

/// A handler's failure, and what to do about it.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandlerError {
    /// Transient: the lease is released, the offset is not committed, and the message is
    /// tried again after a backoff (in place, so the partition's order is kept). After the
    /// configured number of attempts it is dead-lettered.
    Retry(Box<dyn std::error::Error + Send + Sync>),
    /// Final: recorded like a result (a redelivery replays it) and replied with the error in
    /// the [`ERROR`] header.
    Fail(String),
}

impl HandlerError {
    /// A transient failure: try again later.
    pub fn retry(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError::Retry(error.into())
    }

    /// A final failure: record it and reply with it.
    pub fn fail(message: impl Into<String>) -> Self {
        HandlerError::Fail(message.into())
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerError::Retry(e) => write!(f, "retryable: {e}"),
            HandlerError::Fail(m) => write!(f, "failed: {m}"),
        }
    }
}

impl std::error::Error for HandlerError {}

/// One consumed message, as the handler sees it. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct Incoming {
    msg: std::sync::Arc<processor::Message>,
    attempt: u32,
    /// Where `invoke_http` records and makes its calls (`None` without a follow-up topic).
    calls: Option<std::sync::Arc<processor::CallSite>>,
    /// Set on a follow-up message: the call it completes and the service's answer.
    follow_up: Option<call::FollowUp>,
}

impl Incoming {
    /// The topic it was consumed from.
    pub fn topic(&self) -> &str {
        &self.msg.topic
    }
    /// Its partition.
    pub fn partition(&self) -> i32 {
        self.msg.partition
    }
    /// Its offset.
    pub fn offset(&self) -> i64 {
        self.msg.offset
    }
    /// The message key.
    pub fn key(&self) -> Option<&[u8]> {
        self.msg.key()
    }
    /// The payload.
    pub fn payload(&self) -> Option<&[u8]> {
        self.msg.payload()
    }
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.msg.header(name)
    }
    /// All headers, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.msg.headers()
    }
    /// The idempotency key's id (its scope is the processor's).
    pub fn idempotency_key(&self) -> &[u8] {
        self.msg.id()
    }
    /// Which attempt this is, from 1; attempts of earlier processes that died count.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// On a follow-up message, the call it completes and the service's response (see
    /// [`invoke_http`](Self::invoke_http)); `None` on other messages.
    pub fn follow_up(&self) -> Option<&FollowUp> {
        self.follow_up.as_ref()
    }

    /// Calls an exactly-once HTTP endpoint (an [`ExactlyOnce`](crate::http::ExactlyOnce) one,
    /// or any that speaks its protocol) exactly once, whatever crashes: phase 1 now, the rest
    /// after this message's outcome commits (the module docs of `call` in the source describe
    /// the four phases).
    ///
    /// `{uniqueId}` in `url_template` is replaced by an id unique to this attempt; the URL is
    /// recorded in the store, then the body is stored on the service (`PUT`). Return the call
    /// in the outcome ([`Outcome::follow_up`]): once the outcome commits, a follow-up message
    /// carrying the URL goes to the processor's follow-up topic, and handling it POSTs the URL
    /// and runs your handler again with [`follow_up`](Self::follow_up) set to `tag` and the
    /// response. The request's reply then comes from the follow-up's outcome (it carries the
    /// request's `reply-to`, `x-request-id` and echo headers). A 4xx refusal of the PUT is a
    /// final failure of this message; a 5xx, a refused connection or a timeout is retried with
    /// the processor's backoff while the lease is held.
    ///
    /// ```no_run
    /// # async fn f(msg: idemkv::kafka::Incoming) -> Result<idemkv::kafka::Outcome, idemkv::kafka::HandlerError> {
    /// use idemkv::kafka::Outcome;
    /// if let Some(done) = msg.follow_up() {
    ///     let ok = done.response().status.is_success();
    ///     return Ok(Outcome::reply(if ok { "succeeded" } else { "failed" }));
    /// }
    /// let body = msg.payload().unwrap_or_default().to_vec();
    /// let call = msg
    ///     .invoke_http("http://127.0.0.1:8080/payments/authorize/{uniqueId}", body, "authorize")
    ///     .await?;
    /// Ok(Outcome::done().follow_up(call))
    /// # }
    /// ```
    pub async fn invoke_http(
        &self,
        url_template: &str,
        body: impl Into<bytes::Bytes>,
        tag: &str,
    ) -> Result<PendingCall, HandlerError> {
        let Some(site) = &self.calls else {
            return Err(HandlerError::fail(
                "invoke_http needs a follow-up topic (ProcessorBuilder::follow_up_topic)",
            ));
        };
        let index = site
            .next_index
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let url = call::url_for(url_template, &site.scope, self.msg.id(), site.token, index)
            .map_err(HandlerError::fail)?;
        if tag.is_empty() || tag.len() > 255 || tag.contains(['\r', '\n']) {
            return Err(HandlerError::fail(format!(
                "unusable follow-up tag {tag:?}"
            )));
        }
        // Recorded before the PUT: a crash after it leaves the URL known, to be deleted.
        (site.record)(url.clone())
            .await
            .map_err(HandlerError::retry)?;
        site.caller
            .put(&url, body.into())
            .await
            .map_err(|r| HandlerError::fail(format!("PUT {url} refused with {}", r.status)))?;
        tracing::info!(target: "idemkv::kafka", url = %url, tag, "PUT: request stored for an exactly-once call");
        Ok(PendingCall {
            url,
            tag: tag.to_owned(),
        })
    }
}

/// A Kafka producer as an outbox [`Publisher`](crate::outbox::Publisher): each message with its
/// headers, and `idempotency-key` set to the message's stable id (over any header of that
/// name). The Kafka processor publishes its handlers' messages through one; give one to
/// [`ExactlyOnce::publisher`](crate::http::ExactlyOnce::publisher) for an HTTP endpoint's.
#[derive(Clone)]
pub struct ProducerPublisher {
    producer: rdkafka::producer::FutureProducer,
    timeout: Duration,
}

impl std::fmt::Debug for ProducerPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerPublisher")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ProducerPublisher {
    /// Publishes through `producer` (give it `enable.idempotence=true`, so librdkafka's own
    /// retries add no copies either).
    pub fn new(producer: rdkafka::producer::FutureProducer) -> Self {
        ProducerPublisher {
            producer,
            timeout: Duration::from_secs(30),
        }
    }

    /// How long a message may wait for room in the producer's queue (default 30 s); delivery
    /// itself is bounded by the producer's `message.timeout.ms`.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
}

impl crate::outbox::Publisher for ProducerPublisher {
    async fn publish(
        &self,
        msg: &crate::outbox::Outgoing,
        id: &[u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let headers = msg
            .headers()
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case(IDEMPOTENCY_KEY))
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .chain([(IDEMPOTENCY_KEY, id)]);
        let mut record = rdkafka::producer::FutureRecord::to(msg.topic())
            .payload(msg.body())
            .headers(to_headers(headers));
        if let Some(k) = msg.message_key() {
            record = record.key(k);
        }
        match self.producer.send(record, self.timeout).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(Box::new(e)),
        }
    }
}
