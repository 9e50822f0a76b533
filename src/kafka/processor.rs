//! The consumer side: one polling thread, one task per assigned partition.
//!
//! The polling thread owns the librdkafka consumer's event loop: it fetches messages, routes
//! each to its partition's task through a bounded queue, and runs the rebalance callbacks.
//! A partition's task processes its messages one at a time, in order; partitions run
//! concurrently. After a message is recorded (or replayed) its offset is *stored*; librdkafka
//! commits stored offsets every `auto.commit.interval.ms`, and we commit synchronously when
//! partitions are revoked and at shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, ClientContext, Message as _};
use tokio::sync::{Notify, mpsc, watch};

use super::stored::StoredReply;
use super::to_headers;
use super::{
    ATTEMPTS, ECHO_SET_HEADER, ERROR, HandlerError, Incoming, KafkaError, KeySource, ORIGIN,
    Outcome, REPLAYED, REPLY_TO, REQUEST_ID,
};
use crate::adapter::lease::{Held, Ran, run};
use crate::{Begin, CasOutcome, Error, Fingerprint, IdempotencyStore, Key, Lease, OwnedKey};
use crate::{Snapshot, Write};

/// Processes one message. Implemented for every `Fn(Incoming) -> impl Future<Output =
/// Result<Outcome, HandlerError>>`, so an async closure is a handler.
pub trait Handler: Send + Sync + 'static {
    /// Does the work of `msg` and says what to reply, or why it failed.
    fn handle(&self, msg: Incoming) -> impl Future<Output = Result<Outcome, HandlerError>> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, HandlerError>> + Send,
{
    fn handle(&self, msg: Incoming) -> impl Future<Output = Result<Outcome, HandlerError>> + Send {
        self(msg)
    }
}

/// A consumed message, copied out of librdkafka's buffer.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The idempotency key's id, derived by the configured key sources.
    pub id: Vec<u8>,
}

impl Message {
    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    fn from_kafka(m: &BorrowedMessage<'_>, topic: Arc<str>, sources: &[KeySource]) -> Message {
        let headers = super::from_headers(m.headers());
        let mut msg = Message {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            id: Vec::new(),
        };
        msg.id = derive_id(&msg, sources);
        msg
    }
}

/// Ids longer than this are replaced by their digest (below the store's default key limit).
const MAX_DERIVED_ID: usize = 128;

/// The first non-empty value among `sources`; ids longer than [`MAX_DERIVED_ID`] are replaced
/// by a digest (`xxh3:` and 32 hex digits), so a long message key never becomes an error.
fn derive_id(msg: &Message, sources: &[KeySource]) -> Vec<u8> {
    let found = sources.iter().find_map(|s| match s {
        KeySource::Header(name) => msg
            .header(name)
            .filter(|v| !v.is_empty())
            .map(<[u8]>::to_vec),
        KeySource::MessageKey => msg.key.clone().filter(|k| !k.is_empty()),
        KeySource::Position => {
            Some(format!("{}/{}/{}", msg.topic, msg.partition, msg.offset).into_bytes())
        }
    });
    let id = found
        .unwrap_or_else(|| format!("{}/{}/{}", msg.topic, msg.partition, msg.offset).into_bytes());
    if id.len() > MAX_DERIVED_ID {
        format!("xxh3:{:032x}", xxhash_rust::xxh3::xxh3_128(&id)).into_bytes()
    } else {
        id
    }
}

/// What the processor has done since it started. Counters only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessorStats {
    /// Messages whose handler ran and whose result was recorded.
    pub processed: u64,
    /// Redeliveries answered from the store without running the handler.
    pub replayed: u64,
    /// Handler runs that asked to be retried.
    pub retried: u64,
    /// Final failures recorded (from the handler, or attempts exhausted with no dead-letter
    /// topic).
    pub failed: u64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Messages refused before running: malformed echo headers, or an idempotency key reused
    /// with a different payload.
    pub rejected: u64,
    /// Replies delivered.
    pub replies: u64,
    /// Replies that could not be delivered (the result stays recorded: a retried request
    /// replays it).
    pub reply_failures: u64,
    /// Offsets stored for commit.
    pub offsets_stored: u64,
}

#[derive(Default)]
struct Counters {
    processed: AtomicU64,
    replayed: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    rejected: AtomicU64,
    replies: AtomicU64,
    reply_failures: AtomicU64,
    offsets_stored: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A one-way "stop" flag that async code can wait for.
#[derive(Default)]
struct StopFlag {
    stopped: AtomicBool,
    notify: Notify,
}

impl StopFlag {
    fn trigger(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
    fn is_set(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

struct Config {
    topics: Vec<String>,
    key_sources: Vec<KeySource>,
    lease: Duration,
    wait_for_holder: Duration,
    result_ttl: Option<Duration>,
    max_attempts: u32,
    retry_backoff: Duration,
    max_backoff: Duration,
    dead_letter: Option<String>,
    queue: usize,
    revoke_timeout: Duration,
    shutdown_timeout: Duration,
    reply_timeout: Duration,
}

/// Configures a [`KafkaProcessor`]; from [`KafkaProcessor::builder`].
pub struct ProcessorBuilder<St> {
    store: St,
    consumer: ClientConfig,
    producer: Option<ClientConfig>,
    scope: Option<String>,
    cfg: Config,
}

impl<St> std::fmt::Debug for ProcessorBuilder<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorBuilder")
            .field("topics", &self.cfg.topics)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl<St: IdempotencyStore + Clone> ProcessorBuilder<St> {
    /// Topics to subscribe to (at least one).
    pub fn topics<I, T>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.cfg.topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// The store scope of this processor's keys. Default: `kafka:` and the `group.id`, so two
    /// consumer groups reading one topic each process every message.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Where idempotency keys come from (default [`KeySource::defaults`]).
    pub fn key_sources(mut self, sources: Vec<KeySource>) -> Self {
        self.cfg.key_sources = sources;
        self
    }

    /// The lease taken while a handler runs; renewed every third of it (default 30 s). A
    /// crashed consumer's message is taken over this long after its last renewal.
    pub fn lease(mut self, d: Duration) -> Self {
        self.cfg.lease = d;
        self
    }

    /// How long one wait for another holder of the same key lasts before checking again for
    /// shutdown (default 5 s; the partition waits as long as the holder lives).
    pub fn wait_for_holder(mut self, d: Duration) -> Self {
        self.cfg.wait_for_holder = d;
        self
    }

    /// How long results are kept (default: the store's default TTL).
    pub fn result_ttl(mut self, d: Duration) -> Self {
        self.cfg.result_ttl = Some(d);
        self
    }

    /// Attempts before a message that keeps asking to be retried is dead-lettered (default 5,
    /// counted across restarts).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.cfg.max_attempts = n;
        self
    }

    /// First backoff between attempts; it doubles up to `max` (default 100 ms and 5 s).
    pub fn retry_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.cfg.retry_backoff = first;
        self.cfg.max_backoff = max;
        self
    }

    /// Dead-letter topic for messages whose attempts are exhausted. Without one they are
    /// recorded as final failures instead.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.cfg.dead_letter = Some(topic.into());
        self
    }

    /// Messages the polling thread holds back while partition tasks are behind (default
    /// 1024); past it, fetching waits. Each task also queues up to 8 batches of up to 64.
    pub fn queue_per_partition(mut self, n: usize) -> Self {
        self.cfg.queue = n;
        self
    }

    /// How long in-flight work may take to finish when its partition is revoked (default
    /// 10 s); after that the handler is cancelled and its lease released.
    pub fn revoke_timeout(mut self, d: Duration) -> Self {
        self.cfg.revoke_timeout = d;
        self
    }

    /// The same, for a graceful shutdown (default 30 s).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.cfg.shutdown_timeout = d;
        self
    }

    /// Producer configuration for replies and dead letters. Default: the consumer's
    /// `bootstrap.servers` (and security settings) with `enable.idempotence=true`.
    pub fn producer_config(mut self, config: ClientConfig) -> Self {
        self.producer = Some(config);
        self
    }

    /// Creates the clients and subscribes. Overrides two consumer properties:
    /// `enable.auto.offset.store=false` (offsets are stored only after a result is recorded)
    /// and `enable.auto.commit=true` (stored offsets are committed in the background).
    pub fn build(self) -> Result<KafkaProcessor<St>, KafkaError> {
        let ProcessorBuilder {
            store,
            mut consumer,
            producer,
            scope,
            cfg,
        } = self;
        if cfg.topics.is_empty() {
            return Err(KafkaError::Config("no topics to consume".into()));
        }
        let group = consumer
            .get("group.id")
            .map(str::to_owned)
            .ok_or_else(|| KafkaError::Config("the consumer config needs a group.id".into()))?;
        let scope = scope.unwrap_or_else(|| format!("kafka:{group}"));
        let attempts_scope = format!("{scope}#attempts");
        if attempts_scope.len() > crate::MAX_SCOPE_LEN {
            return Err(KafkaError::Config(format!(
                "scope {scope:?} is too long (at most {} bytes)",
                crate::MAX_SCOPE_LEN - "#attempts".len()
            )));
        }
        if cfg.lease < Duration::from_millis(30) {
            return Err(KafkaError::Config(
                "the lease must be at least 30 ms".into(),
            ));
        }
        if cfg.max_attempts == 0 || cfg.queue == 0 || cfg.key_sources.is_empty() {
            return Err(KafkaError::Config(
                "max_attempts, queue_per_partition and key_sources must not be zero or empty"
                    .into(),
            ));
        }
        let producer_config = producer.unwrap_or_else(|| {
            let mut p = ClientConfig::new();
            // `config_map` hides secrets' values, so it only lists the keys to copy.
            for k in consumer.config_map().keys() {
                let copied = *k == "bootstrap.servers"
                    || ["security.", "sasl.", "ssl."]
                        .iter()
                        .any(|pre| k.starts_with(pre));
                if let (true, Some(v)) = (copied, consumer.get(k)) {
                    p.set(*k, v);
                }
            }
            p.set("enable.idempotence", "true").set("linger.ms", "1");
            p
        });
        let producer: FutureProducer = producer_config.create()?;
        consumer
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true");
        let partitions = Arc::new(Partitions::default());
        let context = Ctx {
            partitions: partitions.clone(),
            revoke_timeout: cfg.revoke_timeout,
        };
        let consumer: BaseConsumer<Ctx> = consumer.create_with_context(context)?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(KafkaProcessor {
            shared: Arc::new(Shared {
                store,
                producer,
                scope,
                attempts_scope,
                cfg,
                stats: Counters::default(),
                stop: StopFlag::default(),
                fatal: Mutex::new(None),
            }),
            consumer: Arc::new(consumer),
        })
    }
}

/// Consumes topics and processes each message's effect once; see the [module docs](super).
pub struct KafkaProcessor<St> {
    shared: Arc<Shared<St>>,
    consumer: Arc<BaseConsumer<Ctx>>,
}

impl<St> std::fmt::Debug for KafkaProcessor<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProcessor")
            .field("scope", &self.shared.scope)
            .field("topics", &self.shared.cfg.topics)
            .finish_non_exhaustive()
    }
}

/// Stops a running [`KafkaProcessor`] and reads its counters. Cheap to clone.
pub struct ProcessorHandle<St> {
    shared: Arc<Shared<St>>,
}

impl<St> Clone for ProcessorHandle<St> {
    fn clone(&self) -> Self {
        ProcessorHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<St> std::fmt::Debug for ProcessorHandle<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorHandle")
            .field("stopping", &self.shared.stop.is_set())
            .finish()
    }
}

impl<St> ProcessorHandle<St> {
    /// Graceful shutdown: stop fetching, let in-flight handlers finish (or cancel them at the
    /// shutdown timeout and release their leases), commit, close. [`KafkaProcessor::run`]
    /// returns when it is done.
    pub fn shutdown(&self) {
        self.shared.stop.trigger();
    }

    /// The counters so far.
    pub fn stats(&self) -> ProcessorStats {
        self.shared.stats()
    }
}

impl KafkaProcessor<()> {
    /// Starts configuring a processor over `store`. `consumer` must name `bootstrap.servers`
    /// and `group.id`.
    pub fn builder<St: IdempotencyStore + Clone>(
        store: St,
        consumer: ClientConfig,
    ) -> ProcessorBuilder<St> {
        ProcessorBuilder {
            store,
            consumer,
            producer: None,
            scope: None,
            cfg: Config {
                topics: Vec::new(),
                key_sources: KeySource::defaults(),
                lease: Duration::from_secs(30),
                wait_for_holder: Duration::from_secs(5),
                result_ttl: None,
                max_attempts: 5,
                retry_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                dead_letter: None,
                queue: 1024,
                revoke_timeout: Duration::from_secs(10),
                shutdown_timeout: Duration::from_secs(30),
                reply_timeout: Duration::from_secs(30),
            },
        }
    }
}

impl<St: IdempotencyStore + Clone> KafkaProcessor<St> {
    /// A handle to stop the processor and read its counters.
    pub fn handle(&self) -> ProcessorHandle<St> {
        ProcessorHandle {
            shared: self.shared.clone(),
        }
    }

    /// Processes messages with `handler` until [`ProcessorHandle::shutdown`] or a fatal error
    /// (the store failing, a dead letter that cannot be delivered). Either way it stops
    /// gracefully first; a fatal error is then returned. Needs a Tokio runtime.
    pub async fn run<H: Handler>(self, handler: H) -> Result<ProcessorStats, KafkaError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let shared = self.shared.clone();
        let consumer = self.consumer;
        let handler = Arc::new(handler);
        let poller = std::thread::Builder::new()
            .name("idemkv-kafka-poll".into())
            .spawn(move || {
                poll_loop(&shared, &consumer, &handler, &runtime);
                drop(consumer);
                let _ = shared.producer.flush(Duration::from_secs(10));
                let _ = done_tx.send(());
            })
            .map_err(|e| KafkaError::Runtime {
                what: "could not start the polling thread".into(),
                source: Some(Box::new(e)),
            })?;
        self.shared.stop.wait().await;
        let _ = done_rx.await;
        let _ = tokio::task::spawn_blocking(move || poller.join()).await;
        match self.shared.fatal.lock().take() {
            Some(e) => Err(e),
            None => Ok(self.shared.stats()),
        }
    }
}

struct Shared<St> {
    store: St,
    producer: FutureProducer,
    scope: String,
    attempts_scope: String,
    cfg: Config,
    stats: Counters,
    stop: StopFlag,
    fatal: Mutex<Option<KafkaError>>,
}

/// A partition task's instructions: `None` while running; `Some(deadline)` once it must finish
/// its in-flight message by `deadline` and take no more.
type Drain = watch::Receiver<Option<Instant>>;

/// How processing of one message ended.
enum Disposition {
    /// Recorded or replayed (or refused): store its offset.
    Done,
    /// Stopped before it was done (revoked, shutdown): leave the offset for redelivery.
    Abandoned,
}

impl<St> Shared<St> {
    fn stats(&self) -> ProcessorStats {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProcessorStats {
            processed: get(&s.processed),
            replayed: get(&s.replayed),
            retried: get(&s.retried),
            failed: get(&s.failed),
            dead_lettered: get(&s.dead_lettered),
            rejected: get(&s.rejected),
            replies: get(&s.replies),
            reply_failures: get(&s.reply_failures),
            offsets_stored: get(&s.offsets_stored),
        }
    }

    fn fail(&self, e: KafkaError) {
        let mut fatal = self.fatal.lock();
        if fatal.is_none() {
            *fatal = Some(e);
        }
        drop(fatal);
        self.stop.trigger();
    }
}

/// Waits until the partition is told to drain.
async fn drain_requested(drain: &mut Drain) {
    loop {
        if drain.borrow_and_update().is_some() {
            return;
        }
        if drain.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Waits until the drain deadline has passed.
async fn drain_deadline(drain: &mut Drain) {
    loop {
        let deadline = *drain.borrow_and_update();
        if let Some(deadline) = deadline {
            tokio::time::sleep_until(deadline.into()).await;
            return;
        }
        if drain.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The echo headers a request asks for, or why they are refused.
fn echo_headers(msg: &Message) -> Result<Vec<(String, Vec<u8>)>, String> {
    msg.headers
        .iter()
        .filter(|(n, _)| {
            n.eq_ignore_ascii_case(ECHO_SET_HEADER) || n.eq_ignore_ascii_case("x-reply-set-header")
        })
        .map(|(_, raw)| {
            crate::echo::parse(raw)
                .map(|(name, value)| (name, value.into_bytes()))
                .map_err(|e| format!("{ECHO_SET_HEADER}: {e}"))
        })
        .collect()
}

/// Kafka's rule for topic names: 1–249 of `[a-zA-Z0-9._-]`.
fn valid_topic(t: &str) -> bool {
    (1..=249).contains(&t.len())
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl<St: IdempotencyStore + Clone> Shared<St> {
    /// Takes one message from fetch to "offset may be stored".
    async fn process<H: Handler>(
        &self,
        handler: &H,
        msg: Arc<Message>,
        drain: &mut Drain,
    ) -> Result<Disposition, KafkaError> {
        let echo = match echo_headers(&msg) {
            Ok(echo) => echo,
            Err(why) => {
                bump(&self.stats.rejected);
                self.reply(&msg, &[], &StoredReply::failure(why), false)
                    .await;
                return Ok(Disposition::Done);
            }
        };
        let key = Key::new(&self.scope, &msg.id);
        let fingerprint = Fingerprint::of(msg.payload.as_deref().unwrap_or_default());
        let mut attempts = Attempts::default();
        // The first look does not wait: most keys are new, and a plain `begin` is cheaper.
        let mut first = true;
        loop {
            let begin = if std::mem::take(&mut first) {
                self.store.begin(key, fingerprint, self.cfg.lease).await
            } else {
                tokio::select! {
                    biased;
                    r = self.store.begin_wait(key, fingerprint, self.cfg.lease, self.cfg.wait_for_holder) => r,
                    () = drain_requested(drain) => return Ok(Disposition::Abandoned),
                }
            };
            let begin = match begin {
                Ok(begin) => begin,
                // The message's key is one the store refuses: bad input, not a broken store.
                Err(e @ (Error::EmptyKey | Error::KeyTooLong { .. })) => {
                    bump(&self.stats.rejected);
                    let why = format!("unusable idempotency key: {e}");
                    self.reply(&msg, &echo, &StoredReply::failure(why), false)
                        .await;
                    return Ok(Disposition::Done);
                }
                Err(e) => return Err(e.into()),
            };
            let lease = match begin {
                Begin::Acquired(lease) => lease,
                Begin::Completed(done) => {
                    let record = StoredReply::decode(&done.response).map_err(|e| {
                        KafkaError::CorruptRecord {
                            key: String::from_utf8_lossy(&msg.id).into_owned(),
                            reason: e.0,
                        }
                    })?;
                    bump(&self.stats.replayed);
                    self.reply(&msg, &echo, &record, true).await;
                    return Ok(Disposition::Done);
                }
                // The holder is alive (it renews): keep waiting, checking for a drain.
                Begin::InProgress { .. } => continue,
                Begin::Mismatch => {
                    bump(&self.stats.rejected);
                    let why = "the idempotency key was already used for a different payload";
                    self.reply(&msg, &echo, &StoredReply::failure(why.into()), false)
                        .await;
                    return Ok(Disposition::Done);
                }
            };
            match self
                .attempt(handler, &msg, &echo, lease, &mut attempts, drain)
                .await?
            {
                Step::Finished(d) => return Ok(d),
                Step::Again => {}
                Step::Backoff => {
                    let wait = backoff(
                        self.cfg.retry_backoff,
                        self.cfg.max_backoff,
                        attempts.failed,
                    );
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = drain_requested(drain) => return Ok(Disposition::Abandoned),
                    }
                }
            }
        }
    }

    /// One attempt under `lease`.
    async fn attempt<H: Handler>(
        &self,
        handler: &H,
        msg: &Arc<Message>,
        echo: &[(String, Vec<u8>)],
        mut lease: Lease,
        attempts: &mut Attempts,
        drain: &mut Drain,
    ) -> Result<Step, KafkaError> {
        let attempts_key = OwnedKey::new(&self.attempts_scope, &msg.id);
        // The counter is only read when something went wrong before: a takeover, or a failed
        // attempt in this process. (A counter left by a process that died during a backoff is
        // found when the next attempt fails, and expires with its TTL.)
        if lease.is_takeover() || attempts.failed > 0 {
            self.load_attempts(&attempts_key, attempts).await?;
        }
        if lease.is_takeover() {
            // The previous holder died holding the lease: that was an attempt too (a message
            // that crashes its consumer must not crash it forever).
            self.count_failure(&attempts_key, attempts).await?;
        }
        if attempts.failed >= self.cfg.max_attempts {
            let why = attempts
                .last_error
                .clone()
                .unwrap_or_else(|| "the consumer stopped while processing it".into());
            return self
                .give_up(msg, echo, lease, &attempts_key, attempts, why)
                .await
                .map(Step::Finished);
        }
        let incoming = Incoming {
            msg: msg.clone(),
            attempt: attempts.failed + 1,
        };
        // The shared lease runner: renewed every third of the lease while the handler runs.
        let held = Held::new(self.store.clone(), lease);
        let work = handler.handle(incoming);
        let result = match run(
            &self.store,
            held,
            self.cfg.lease,
            work,
            drain_deadline(drain),
        )
        .await
        {
            Ran::Done(result, held) => {
                lease = held.take();
                result
            }
            // Someone took over (we were too slow to renew): their result wins.
            Ran::Lost(_, None) => return Ok(Step::Again),
            // The renewal kept failing: a retryable failure of this attempt.
            Ran::Lost(e, Some(held)) => {
                lease = held.take();
                Err(HandlerError::retry(e))
            }
            Ran::Cancelled(held, ()) => {
                // Cancelled by a revoke or shutdown deadline: give the key back.
                self.release(held.take()).await?;
                return Ok(Step::Finished(Disposition::Abandoned));
            }
        };
        let (record, writes) = match result {
            Ok(outcome) => (
                StoredReply {
                    headers: outcome.headers,
                    payload: outcome.payload,
                    error: None,
                },
                outcome.writes,
            ),
            Err(HandlerError::Fail(why)) => (StoredReply::failure(why), Vec::new()),
            Err(HandlerError::Retry(e)) => {
                bump(&self.stats.retried);
                attempts.last_error = Some(e.to_string());
                self.count_failure(&attempts_key, attempts).await?;
                if attempts.failed >= self.cfg.max_attempts {
                    let why = e.to_string();
                    return self
                        .give_up(msg, echo, lease, &attempts_key, attempts, why)
                        .await
                        .map(Step::Finished);
                }
                self.release(lease).await?;
                return Ok(Step::Backoff);
            }
        };
        let failed = record.error.is_some();
        match self
            .record(&lease, &record, writes, &attempts_key, attempts)
            .await
        {
            Ok(()) => {}
            Err(Error::StaleLease { .. }) => return Ok(Step::Again),
            Err(e @ (Error::BatchConflict { .. } | Error::InvalidBatch { .. })) => {
                // The handler's writes lost a race (or are malformed): not recorded; retry.
                bump(&self.stats.retried);
                attempts.last_error = Some(e.to_string());
                self.count_failure(&attempts_key, attempts).await?;
                self.release(lease).await?;
                return Ok(Step::Backoff);
            }
            Err(e @ (Error::ValueTooLarge { .. } | Error::KeyTooLong { .. })) => {
                let failure = StoredReply::failure(format!("result not recorded: {e}"));
                self.record(&lease, &failure, Vec::new(), &attempts_key, attempts)
                    .await?;
                bump(&self.stats.failed);
                self.reply(msg, echo, &failure, false).await;
                return Ok(Step::Finished(Disposition::Done));
            }
            Err(e) => {
                let _ = self.store.release(lease).await;
                return Err(e.into());
            }
        }
        bump(if failed {
            &self.stats.failed
        } else {
            &self.stats.processed
        });
        self.reply(msg, echo, &record, false).await;
        Ok(Step::Finished(Disposition::Done))
    }

    /// Records `record` as the key's result, clearing the attempt counter in the same batch.
    async fn record(
        &self,
        lease: &Lease,
        record: &StoredReply,
        mut writes: Vec<Write>,
        attempts_key: &OwnedKey,
        attempts: &Attempts,
    ) -> Result<(), Error> {
        if let Some(version) = attempts.version {
            writes.push(Write::delete_if_version(attempts_key.clone(), version));
        }
        self.store
            .complete(lease, &record.encode(), self.cfg.result_ttl, &writes)
            .await
            .map(drop)
    }

    async fn release(&self, lease: Lease) -> Result<(), KafkaError> {
        match self.store.release(lease).await {
            Ok(()) | Err(Error::StaleLease { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn load_attempts(
        &self,
        key: &OwnedKey,
        attempts: &mut Attempts,
    ) -> Result<(), KafkaError> {
        match self.store.get(key.as_key()).await? {
            Some(Snapshot::Value(v)) => {
                attempts.version = Some(v.version);
                let stored = v
                    .value
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u32::from_le_bytes);
                attempts.failed = attempts.failed.max(stored);
            }
            _ => attempts.version = None,
        }
        Ok(())
    }

    /// Counts a failed attempt in the store, so it survives a crash of this process.
    async fn count_failure(
        &self,
        key: &OwnedKey,
        attempts: &mut Attempts,
    ) -> Result<(), KafkaError> {
        for _ in 0..8 {
            let next = attempts.failed + 1;
            let value = next.to_le_bytes().to_vec();
            let write = match attempts.version {
                None => Write::put_if_absent(key.clone(), value),
                Some(v) => Write::set_if_version(key.clone(), v, value),
            };
            let write = match self.cfg.result_ttl {
                Some(ttl) => write.with_ttl(ttl),
                None => write,
            };
            match self.store.cas(&write).await? {
                CasOutcome::Applied { version } => {
                    attempts.version = version;
                    attempts.failed = next;
                    return Ok(());
                }
                CasOutcome::Conflict { .. } => self.load_attempts(key, attempts).await?,
            }
        }
        Err(KafkaError::runtime(
            "the attempt counter keeps changing under a held lease",
        ))
    }

    /// Attempts are exhausted: dead-letter the message (and forget the key, so a re-drive from
    /// the dead-letter topic runs afresh), or, without a dead-letter topic, record the failure.
    async fn give_up(
        &self,
        msg: &Message,
        echo: &[(String, Vec<u8>)],
        lease: Lease,
        attempts_key: &OwnedKey,
        attempts: &Attempts,
        why: String,
    ) -> Result<Disposition, KafkaError> {
        let Some(dlq) = &self.cfg.dead_letter else {
            let failure =
                StoredReply::failure(format!("gave up after {} attempts: {why}", attempts.failed));
            self.record(&lease, &failure, Vec::new(), attempts_key, attempts)
                .await?;
            bump(&self.stats.failed);
            self.reply(msg, echo, &failure, false).await;
            return Ok(Disposition::Done);
        };
        let origin = format!("{}/{}/{}", msg.topic, msg.partition, msg.offset);
        let count = attempts.failed.to_string();
        let extra: [(&str, &[u8]); 3] = [
            (ERROR, why.as_bytes()),
            (ATTEMPTS, count.as_bytes()),
            (ORIGIN, origin.as_bytes()),
        ];
        let original = msg.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
        let headers = to_headers(original.chain(extra));
        let mut record = FutureRecord::to(dlq).headers(headers);
        if let Some(k) = &msg.key {
            record = record.key(k);
        }
        if let Some(p) = &msg.payload {
            record = record.payload(p);
        }
        if let Err((e, _)) = self.producer.send(record, self.cfg.reply_timeout).await {
            let _ = self.store.release(lease).await;
            return Err(KafkaError::Delivery {
                topic: dlq.clone(),
                source: e,
            });
        }
        bump(&self.stats.dead_lettered);
        self.release(lease).await?;
        if let Some(version) = attempts.version {
            let _ = self
                .store
                .cas(&Write::delete_if_version(attempts_key.clone(), version))
                .await?;
        }
        let failure = StoredReply::failure(format!(
            "dead-lettered to {dlq} after {} attempts: {why}",
            attempts.failed
        ));
        self.reply(msg, echo, &failure, false).await;
        Ok(Disposition::Done)
    }

    /// Sends the reply if the request names a `reply-to` topic. A failure to deliver is
    /// counted, not fatal: the result is recorded, so a retried request replays it.
    async fn reply(
        &self,
        msg: &Message,
        echo: &[(String, Vec<u8>)],
        record: &StoredReply,
        replayed: bool,
    ) {
        let Some(topic) = msg.header_str(REPLY_TO) else {
            return;
        };
        if !valid_topic(topic) {
            bump(&self.stats.reply_failures);
            return;
        }
        let mut out: Vec<(&str, &[u8])> = Vec::with_capacity(record.headers.len() + echo.len() + 3);
        for (n, v) in &record.headers {
            out.push((n, v));
        }
        for (n, v) in echo {
            out.retain(|(o, _)| !o.eq_ignore_ascii_case(n));
            out.push((n, v));
        }
        if let Some(id) = msg.header(REQUEST_ID) {
            out.retain(|(o, _)| !o.eq_ignore_ascii_case(REQUEST_ID));
            out.push((REQUEST_ID, id));
        }
        if replayed {
            out.retain(|(o, _)| !o.eq_ignore_ascii_case(REPLAYED));
            out.push((REPLAYED, b"true"));
        }
        if let Some(err) = &record.error {
            out.retain(|(o, _)| !o.eq_ignore_ascii_case(ERROR));
            out.push((ERROR, err.as_bytes()));
        }
        let headers = to_headers(out);
        let mut reply = FutureRecord::to(topic)
            .payload(&record.payload)
            .headers(headers);
        if let Some(k) = &msg.key {
            reply = reply.key(k);
        }
        match self.producer.send(reply, self.cfg.reply_timeout).await {
            Ok(_) => bump(&self.stats.replies),
            Err(_) => bump(&self.stats.reply_failures),
        }
    }
}

impl StoredReply {
    fn failure(why: String) -> Self {
        StoredReply {
            headers: Vec::new(),
            payload: Vec::new(),
            error: Some(why),
        }
    }
}

/// Failed attempts of one message, mirrored in the store under the attempts scope.
#[derive(Default)]
struct Attempts {
    failed: u32,
    version: Option<u64>,
    last_error: Option<String>,
}

enum Step {
    Finished(Disposition),
    /// Lost the lease to someone else: start over (their result will be replayed).
    Again,
    /// A retryable failure: the lease is released; wait, then start over.
    Backoff,
}

fn backoff(first: Duration, max: Duration, failed: u32) -> Duration {
    let factor = 1u32 << failed.saturating_sub(1).min(16);
    first.saturating_mul(factor).min(max)
}

/// The partition tasks, shared by the polling thread (which starts them) and the rebalance
/// callback (which drains them).
#[derive(Default)]
struct Partitions {
    map: Mutex<HashMap<(String, i32), Worker>>,
    /// Partitions revoked since the polling thread last looked: it drops what it holds back
    /// for them (their new owner fetches them again from the committed offset).
    revoked: Mutex<Vec<(String, i32)>>,
}

struct Worker {
    queue: mpsc::Sender<Vec<Arc<Message>>>,
    drain: watch::Sender<Option<Instant>>,
    /// Disconnected when the task has ended.
    done: std::sync::mpsc::Receiver<()>,
    /// Offsets may be stored while open; closed once the partition is revoked.
    gate: Arc<Mutex<bool>>,
}

impl Partitions {
    /// Tells the tasks of `which` (all if `None`) to finish by `deadline`, waits for them (a
    /// second longer at most: a cancelled handler still releases its lease), and closes their
    /// offset gates.
    fn drain(&self, which: Option<&[(String, i32)]>, deadline: Instant) {
        let workers: Vec<Worker> = {
            let mut map = self.map.lock();
            match which {
                None => map.drain().map(|(_, w)| w).collect(),
                Some(list) => {
                    self.revoked.lock().extend_from_slice(list);
                    list.iter().filter_map(|k| map.remove(k)).collect()
                }
            }
        };
        for w in &workers {
            let _ = w.drain.send(Some(deadline));
        }
        let limit = deadline + Duration::from_secs(1);
        for w in workers {
            drop(w.queue);
            let _ = w
                .done
                .recv_timeout(limit.saturating_duration_since(Instant::now()));
            *w.gate.lock() = false;
        }
    }
}

/// The consumer's context: drains revoked partitions before librdkafka unassigns them.
struct Ctx {
    partitions: Arc<Partitions>,
    revoke_timeout: Duration,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            // This runs on the polling thread, never on the runtime: blocking here for the
            // partition tasks is safe, and keeps the partitions ours until they are done.
            self.partitions
                .drain(Some(&revoked), Instant::now() + self.revoke_timeout);
            if !consumer.assignment_lost() {
                let _ = consumer.commit_consumer_state(CommitMode::Sync);
            }
        }
    }
}

/// Most messages handed to a partition task at once.
const BATCH: usize = 64;

/// Messages fetched but not yet handed to their partition's task.
struct Pending {
    topic: Arc<str>,
    partition: i32,
    batch: Vec<Arc<Message>>,
    /// The partition task's queue, once looked up.
    queue: Option<mpsc::Sender<Vec<Arc<Message>>>>,
}

fn poll_loop<St: IdempotencyStore + Clone, H: Handler>(
    shared: &Arc<Shared<St>>,
    consumer: &Arc<BaseConsumer<Ctx>>,
    handler: &Arc<H>,
    runtime: &tokio::runtime::Handle,
) {
    let partitions = consumer.context().partitions.clone();
    let mut pending: Vec<Pending> = Vec::new();
    let mut held = 0usize;
    while !shared.stop.is_set() {
        // Block only when nothing is held back; otherwise take what is already fetched and
        // hand the batches over as soon as the local queue runs dry.
        let wait = if held == 0 {
            Duration::from_millis(50)
        } else {
            Duration::ZERO
        };
        let polled = consumer.poll(wait);
        // A revoke runs inside `poll`, on this thread: forget what was held for those
        // partitions before handing anything else over.
        let revoked = std::mem::take(&mut *partitions.revoked.lock());
        if !revoked.is_empty() {
            pending.retain(|p| {
                let gone = revoked
                    .iter()
                    .any(|(t, q)| *q == p.partition && **t == *p.topic);
                if gone {
                    held -= p.batch.len();
                }
                !gone
            });
        }
        // Errors (broker down, partition EOF) are transient and retried by librdkafka.
        if let Some(Ok(m)) = polled {
            let at = match pending
                .iter()
                .position(|p| p.partition == m.partition() && *p.topic == *m.topic())
            {
                Some(at) => at,
                None => {
                    pending.push(Pending {
                        topic: Arc::from(m.topic()),
                        partition: m.partition(),
                        batch: Vec::with_capacity(BATCH),
                        queue: None,
                    });
                    pending.len() - 1
                }
            };
            let p = &mut pending[at];
            let msg = Message::from_kafka(&m, p.topic.clone(), &shared.cfg.key_sources);
            drop(m);
            p.batch.push(Arc::new(msg));
            held += 1;
            if p.batch.len() < BATCH {
                continue;
            }
        }
        for p in pending.iter_mut().filter(|p| !p.batch.is_empty()) {
            held -= hand_over(shared, consumer, handler, runtime, &partitions, p, false);
        }
        // Back-pressure: past the bound, wait for the fullest partition's task to take a batch.
        while held > shared.cfg.queue && !shared.stop.is_set() {
            let Some(p) = pending.iter_mut().max_by_key(|p| p.batch.len()) else {
                break;
            };
            held -= hand_over(shared, consumer, handler, runtime, &partitions, p, true);
        }
    }
    partitions.drain(None, Instant::now() + shared.cfg.shutdown_timeout);
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    consumer.unsubscribe();
}

/// Hands `p`'s batch to its partition's task (started on first use); returns how many
/// messages left `p`. When the task's queue is full the batch stays (and grows) unless `wait`,
/// which blocks until there is room or the processor stops.
fn hand_over<St: IdempotencyStore + Clone, H: Handler>(
    shared: &Arc<Shared<St>>,
    consumer: &Arc<BaseConsumer<Ctx>>,
    handler: &Arc<H>,
    runtime: &tokio::runtime::Handle,
    partitions: &Partitions,
    p: &mut Pending,
    wait: bool,
) -> usize {
    let n = p.batch.len();
    for _ in 0..2 {
        match send_batch(shared, consumer, handler, runtime, partitions, p, wait) {
            Sent::Taken => return n,
            Sent::Full => return 0,
            // The task ended (its partition was revoked and perhaps assigned to us again):
            // look it up afresh, once.
            Sent::Closed => p.queue = None,
        }
    }
    // Still closed: the processor is stopping. Its offsets are not stored; they will be
    // redelivered.
    p.batch.clear();
    n
}

enum Sent {
    Taken,
    Full,
    Closed,
}

fn send_batch<St: IdempotencyStore + Clone, H: Handler>(
    shared: &Arc<Shared<St>>,
    consumer: &Arc<BaseConsumer<Ctx>>,
    handler: &Arc<H>,
    runtime: &tokio::runtime::Handle,
    partitions: &Partitions,
    p: &mut Pending,
    wait: bool,
) -> Sent {
    let queue = p.queue.get_or_insert_with(|| {
        let mut map = partitions.map.lock();
        let worker = map
            .entry((p.topic.to_string(), p.partition))
            .or_insert_with(|| {
                start_worker(
                    shared,
                    consumer,
                    handler,
                    runtime,
                    p.topic.clone(),
                    p.partition,
                )
            });
        worker.queue.clone()
    });
    let batch = std::mem::take(&mut p.batch);
    let result = if wait {
        // The polling thread is not a runtime thread, so it may block on a send.
        runtime.block_on(async {
            tokio::select! {
                r = queue.send(batch) => r.map_err(|e| mpsc::error::TrySendError::Closed(e.0)),
                () = shared.stop.wait() => Ok(()),
            }
        })
    } else {
        queue.try_send(batch)
    };
    match result {
        Ok(()) => Sent::Taken,
        Err(mpsc::error::TrySendError::Full(batch)) => {
            p.batch = batch;
            Sent::Full
        }
        Err(mpsc::error::TrySendError::Closed(batch)) => {
            p.batch = batch;
            Sent::Closed
        }
    }
}

fn start_worker<St: IdempotencyStore + Clone, H: Handler>(
    shared: &Arc<Shared<St>>,
    consumer: &Arc<BaseConsumer<Ctx>>,
    handler: &Arc<H>,
    runtime: &tokio::runtime::Handle,
    topic: Arc<str>,
    partition: i32,
) -> Worker {
    // Batches, not messages: the polling thread bounds the messages it holds back.
    let (queue, mut rx) = mpsc::channel::<Vec<Arc<Message>>>(8);
    let (drain, mut drain_rx) = watch::channel(None);
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(true));
    let (shared, consumer, handler, task_gate) = (
        shared.clone(),
        consumer.clone(),
        handler.clone(),
        gate.clone(),
    );
    runtime.spawn(async move {
        let _done = done_tx;
        // Stores the offset of the last message done; librdkafka commits it later.
        let store_offset = |offset: Option<i64>| {
            let Some(offset) = offset else { return };
            let open = task_gate.lock();
            if *open && consumer.store_offset(&topic, partition, offset).is_ok() {
                bump(&shared.stats.offsets_stored);
            }
        };
        'run: loop {
            let batch = tokio::select! {
                biased;
                () = drain_requested(&mut drain_rx) => break,
                b = rx.recv() => match b { Some(b) => b, None => break },
            };
            let mut last_done = None;
            for msg in batch {
                if drain_rx.borrow().is_some() {
                    store_offset(last_done);
                    break 'run;
                }
                let offset = msg.offset;
                match shared.process(&*handler, msg, &mut drain_rx).await {
                    Ok(Disposition::Done) => last_done = Some(offset),
                    Ok(Disposition::Abandoned) => {
                        store_offset(last_done);
                        break 'run;
                    }
                    Err(e) => {
                        store_offset(last_done);
                        shared.fail(e);
                        break 'run;
                    }
                }
            }
            store_offset(last_done);
        }
    });
    Worker {
        queue,
        drain,
        done,
        gate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(headers: &[(&str, &str)], key: Option<&str>) -> Message {
        let mut m = Message {
            topic: "t".into(),
            partition: 3,
            offset: 42,
            key: key.map(|k| k.as_bytes().to_vec()),
            payload: None,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            id: Vec::new(),
        };
        m.id = derive_id(&m, &KeySource::defaults());
        m
    }

    #[test]
    fn key_sources_in_order() {
        assert_eq!(message(&[("Idempotency-Key", "k1")], Some("mk")).id, b"k1");
        assert_eq!(message(&[("idempotency-key", "")], Some("mk")).id, b"mk");
        assert_eq!(message(&[], Some("")).id, b"t/3/42");
        let long = "x".repeat(MAX_DERIVED_ID + 1);
        let id = message(&[], Some(&long)).id;
        assert!(id.starts_with(b"xxh3:") && id.len() == 37, "{id:?}");
        assert_eq!(id, message(&[], Some(&long)).id);
        let m = message(&[("idempotency-key", "k1")], Some("mk"));
        assert_eq!(derive_id(&m, &[KeySource::MessageKey]), b"mk");
        assert_eq!(derive_id(&m, &[KeySource::Position]), b"t/3/42");
    }

    #[test]
    fn echo_headers_are_parsed_or_refused() {
        let ok = message(
            &[
                ("X-Echo-Set-Header", "X-Trace: t1"),
                ("x-echo-set-header", "A:b"),
            ],
            None,
        );
        assert_eq!(
            echo_headers(&ok).unwrap(),
            vec![
                ("x-trace".into(), b"t1".to_vec()),
                ("a".into(), b"b".to_vec())
            ]
        );
        let bad = message(&[("x-echo-set-header", "Content-Length: 1")], None);
        assert!(
            echo_headers(&bad)
                .unwrap_err()
                .to_ascii_lowercase()
                .contains("content-length")
        );
    }

    #[test]
    fn topic_names_and_backoff() {
        assert!(valid_topic("orders.replies-1_x"));
        assert!(
            !valid_topic("")
                && !valid_topic("..")
                && !valid_topic("a b")
                && !valid_topic(&"a".repeat(250))
        );
        let (f, m) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff(f, m, 1), f);
        assert_eq!(backoff(f, m, 2), f * 2);
        assert_eq!(backoff(f, m, 3), f * 4);
        assert_eq!(backoff(f, m, 30), m);
    }
}
