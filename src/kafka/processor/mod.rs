//! The consumer side: one polling thread, one task per assigned partition.
//!
//! The polling thread owns the librdkafka consumer's event loop: it fetches messages, routes
//! each to its partition's task through a bounded queue, and runs the rebalance callbacks.
//! A partition's task processes its messages in order, one handler at a time, a batch at once
//! where it can (`batch`: one `begin_many`, the handlers, one `complete_many`); partitions run
//! concurrently. After a message is recorded (or replayed) its offset is *stored*; librdkafka
//! commits stored offsets every `auto.commit.interval.ms`, and we commit synchronously when
//! partitions are revoked and at shutdown.
//!
//! This module holds the public face (the processor, its handle and statistics) and the state
//! the parts share; the parts, one job each: `builder` (the configuration and `build`),
//! `message` (a consumed message and
//! its id), `batch` (the batch path), `attempt` (the per-message state machine), `outbound`
//! (replies and dead letters),
//! `poller` (the polling thread, partition tasks, rebalance). The children read this module's
//! items through `use super::*`.

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
use crate::{BeginOptions, LeaseSync, Snapshot, Write};

/// Processes one message. Implemented for every `Fn(Incoming) -> impl Future<Output =
/// Result<Outcome, HandlerError>>`, so an async closure is a handler.
///
/// A handler that panics is treated as one that returned [`HandlerError::Retry`]: its lease is
/// released, the message is tried again after the backoff and dead-lettered after the last
/// attempt, and the partition goes on (an `idemkv::kafka` error event says what panicked).
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

/// The handler's work, with a panic while it is polled turned into a retryable failure (the
/// future is not polled again after it panicked).
async fn guarded<F>(work: F) -> Result<Outcome, HandlerError>
where
    F: Future<Output = Result<Outcome, HandlerError>>,
{
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(move |cx| {
        // The handler's state is dropped right after a panic and never looked at again, so a
        // broken invariant inside it cannot be observed.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(polled) => polled,
            Err(payload) => {
                let why = Panicked::of(payload.as_ref());
                tracing::error!(target: "idemkv::kafka", panic = %why.0, "the handler panicked; the message will be retried");
                std::task::Poll::Ready(Err(HandlerError::retry(why)))
            }
        }
    })
    .await
}

/// A handler's panic, as the error of a retryable failure.
#[derive(Debug, thiserror::Error)]
#[error("the handler panicked: {0}")]
struct Panicked(String);

impl Panicked {
    fn of(payload: &(dyn std::any::Any + Send)) -> Panicked {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(a payload that is not a string)".to_owned());
        Panicked(text)
    }
}

mod attempt;
mod batch;
mod builder;
mod calls;
mod message;
mod outbound;
mod poller;

use super::call::HttpCaller;
pub(crate) use attempt::backoff;
use builder::Config;
pub use builder::ProcessorBuilder;
pub(crate) use calls::CallSite;

use crate::echo::EchoPolicy;
use attempt::Attempts;
pub(crate) use message::Message;
use message::{echo_headers, valid_topic};
use poller::{Ctx, Partitions, poll_loop};

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
    /// Outbox messages produced (a message produced again after a crash counts again).
    pub sent: u64,
    /// Messages skipped in token mode because their token did not exist (already processed,
    /// or sent without one).
    pub untokened: u64,
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
    sent: AtomicU64,
    untokened: AtomicU64,
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

/// Callbacks from the processor's Kafka consumer, for what the processor does not do itself:
/// statistics (every `statistics.interval.ms`, which you set in the consumer config) and
/// client errors (a broker unreachable, authentication failing). Both default to nothing;
/// client errors are also logged as `warn` events under the target `idemkv::kafka`. They run
/// on librdkafka's threads: return quickly.
///
/// OAUTHBEARER tokens need no hook: librdkafka fetches and refreshes them itself with
/// `sasl.oauthbearer.method=oidc` (feature `kafka-oidc`).
///
/// ```
/// use idemkv::kafka::ClientHooks;
///
/// struct Stats;
/// impl ClientHooks for Stats {
///     fn statistics(&self, s: &rdkafka::Statistics) {
///         println!("{} brokers, {} messages in the queue", s.brokers.len(), s.msg_cnt);
///     }
/// }
/// ```
pub trait ClientHooks: Send + Sync + 'static {
    /// librdkafka's statistics.
    fn statistics(&self, statistics: &rdkafka::Statistics) {
        let _ = statistics;
    }

    /// A client-level error and librdkafka's reason text.
    fn error(&self, error: &rdkafka::error::KafkaError, reason: &str) {
        let _ = (error, reason);
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
    outbox_scope: String,
    calls_scope: String,
    caller: HttpCaller,
    cfg: Config,
    stats: Counters,
    stop: StopFlag,
    fatal: Mutex<Option<KafkaError>>,
    /// Messages the partition tasks are done with, for the polling thread to reuse.
    recycler: message::Recycler,
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
            sent: get(&s.sent),
            untokened: get(&s.untokened),
        }
    }

    fn fail(&self, e: KafkaError) {
        tracing::error!(target: "idemkv::kafka", error = %e, "fatal error; the processor stops gracefully");
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
