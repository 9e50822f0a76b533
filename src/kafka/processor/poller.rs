//! The polling thread and the partition tasks: fetching, routing each message to its
//! partition's bounded queue (back-pressure), rebalance callbacks that drain revoked partitions
//! and commit, and starting a partition's task.
//!
//! Invariant: a partition's messages are processed one at a time in offset order; after a
//! revoke, nothing held back for that partition is handed to a task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// The partition tasks, shared by the polling thread (which starts them) and the rebalance
/// callback (which drains them).
#[derive(Default)]
pub(super) struct Partitions {
    pub(super) map: Mutex<HashMap<(String, i32), Worker>>,
    /// Partitions revoked since the polling thread last looked: it drops what it holds back
    /// for them (their new owner fetches them again from the committed offset).
    pub(super) revoked: Mutex<Vec<(String, i32)>>,
}

pub(super) struct Worker {
    pub(super) queue: mpsc::Sender<Vec<Arc<Message>>>,
    pub(super) drain: watch::Sender<Option<Instant>>,
    /// Disconnected when the task has ended.
    pub(super) done: std::sync::mpsc::Receiver<()>,
    /// Offsets may be stored while open; closed once the partition is revoked.
    pub(super) gate: Arc<Mutex<bool>>,
}

impl Partitions {
    /// Tells the tasks of `which` (all if `None`) to finish by `deadline`, waits for them (a
    /// second longer at most: a cancelled handler still releases its lease), and closes their
    /// offset gates.
    pub(super) fn drain(&self, which: Option<&[(String, i32)]>, deadline: Instant) {
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

/// The consumer's context: drains revoked partitions before librdkafka unassigns them, and
/// hands statistics and errors to the user's [`ClientHooks`].
pub(super) struct Ctx {
    pub(super) partitions: Arc<Partitions>,
    pub(super) revoke_timeout: Duration,
    pub(super) hooks: Option<Arc<dyn ClientHooks>>,
}

impl ClientContext for Ctx {
    /// A client-level error (a broker down, authentication failed): to the hooks, and a
    /// `warn` event for operators.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(target: "idemkv::kafka", error = %error, reason, "Kafka client error");
        if let Some(h) = &self.hooks {
            h.error(&error, reason);
        }
    }

    /// librdkafka's statistics (every `statistics.interval.ms`): with the `metrics` feature,
    /// the lag of each assigned partition, as the gauge `idemkv_kafka_consumer_lag{topic,
    /// partition}`: messages between the partition's end and the offset the processor has
    /// stored for commit (a message counts until its result is recorded), or the committed
    /// offset, or the partition's start when neither is known yet.
    fn stats(&self, statistics: rdkafka::Statistics) {
        #[cfg(feature = "metrics")]
        lag_gauges(&statistics);
        if let Some(h) = &self.hooks {
            h.statistics(&statistics);
        }
    }
}

/// The gauge `idemkv_kafka_consumer_lag{topic, partition}` from librdkafka's statistics.
#[cfg(feature = "metrics")]
fn lag_gauges(statistics: &rdkafka::Statistics) {
    for (topic, t) in &statistics.topics {
        for (id, p) in &t.partitions {
            // -1 is librdkafka's "internal" partition; only assigned ones have a position.
            if *id < 0 || p.hi_offset < 0 || !p.desired {
                continue;
            }
            let mut done = p.stored_offset.max(p.committed_offset);
            if done < 0 {
                done = p.lo_offset.max(0);
            }
            metrics::gauge!(
                "idemkv_kafka_consumer_lag",
                "topic" => topic.clone(),
                "partition" => id.to_string()
            )
            .set((p.hi_offset - done).max(0) as f64);
        }
    }
}

impl ConsumerContext for Ctx {
    /// Background (auto) commits: a failure is logged; the offsets stay stored and the next
    /// commit covers them.
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &rdkafka::TopicPartitionList,
    ) {
        if let Err(e) = result
            && !is_no_offset(&e)
        {
            tracing::warn!(target: "idemkv::kafka", error = %e, "background offset commit failed");
        }
    }

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
                commit(consumer, "revoke");
            }
        }
    }
}

/// Commits the stored offsets synchronously; a failure is logged (the offsets stay stored,
/// and the next commit or a redelivery after a crash covers them).
fn commit(consumer: &BaseConsumer<Ctx>, when: &str) {
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync)
        && !is_no_offset(&e)
    {
        tracing::warn!(target: "idemkv::kafka", error = %e, when, "offset commit failed");
    }
}

/// "Nothing to commit": not a failure.
fn is_no_offset(e: &rdkafka::error::KafkaError) -> bool {
    matches!(
        e,
        rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)
    )
}

/// Most messages handed to a partition task at once.
pub(super) const BATCH: usize = 64;

/// How long the polling thread waits for a new message while every task it holds messages
/// for is behind.
const STALL_WAIT: Duration = Duration::from_millis(1);

/// Messages fetched but not yet handed to their partition's task.
pub(super) struct Pending {
    pub(super) topic: Arc<str>,
    pub(super) partition: i32,
    pub(super) batch: Vec<Arc<Message>>,
    /// The partition task's queue, once looked up.
    pub(super) queue: Option<mpsc::Sender<Vec<Arc<Message>>>>,
}

pub(super) fn poll_loop<St: IdempotencyStore + Clone, H: Handler>(
    shared: &Arc<Shared<St>>,
    consumer: &Arc<BaseConsumer<Ctx>>,
    handler: &Arc<H>,
    runtime: &tokio::runtime::Handle,
) {
    let partitions = consumer.context().partitions.clone();
    let mut pending: Vec<Pending> = Vec::new();
    let mut held = 0usize;
    // Whether the last hand-over found every task's queue full: the tasks are behind.
    let mut stalled = false;
    while !shared.stop.is_set() {
        // Block only when nothing is held back; otherwise take what is already fetched and
        // hand the batches over as soon as the local queue runs dry. While the tasks are
        // behind, wait a little for new messages instead of spinning: on a small machine the
        // spin takes the core the tasks need.
        let wait = if held == 0 {
            Duration::from_millis(50)
        } else if stalled {
            STALL_WAIT
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
        if let Some(Err(e)) = &polled
            && !matches!(e, rdkafka::error::KafkaError::PartitionEOF(_))
        {
            tracing::warn!(target: "idemkv::kafka", error = %e, "poll error (librdkafka retries)");
        }
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
            let reuse = shared.recycler.message();
            let msg = Message::from_kafka(&m, p.topic.clone(), &shared.cfg.key_sources, reuse);
            drop(m);
            p.batch.push(msg);
            held += 1;
            if p.batch.len() < BATCH {
                continue;
            }
        }
        let before = held;
        for p in pending.iter_mut().filter(|p| !p.batch.is_empty()) {
            held -= hand_over(shared, consumer, handler, runtime, &partitions, p, false);
        }
        stalled = held > 0 && held == before;
        // Back-pressure: past the bound, wait for the fullest partition's task to take a batch.
        while held > shared.cfg.queue && !shared.stop.is_set() {
            let Some(p) = pending.iter_mut().max_by_key(|p| p.batch.len()) else {
                break;
            };
            held -= hand_over(shared, consumer, handler, runtime, &partitions, p, true);
        }
    }
    partitions.drain(None, Instant::now() + shared.cfg.shutdown_timeout);
    commit(consumer, "shutdown");
    consumer.unsubscribe();
    // Take the revoke that the unsubscribe causes here, on this thread, before the consumer
    // is dropped: a revoke delivered *during* the close makes the rebalance callback's
    // `rd_kafka_assign` wait forever (librdkafka issue 4884; seen here as a hung shutdown
    // in 2 of 30 rebalance tests). Messages still polled are not processed: their offsets
    // are not stored, so they are redelivered.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until && consumer.assignment().is_ok_and(|a| a.count() > 0) {
        let _ = consumer.poll(Duration::from_millis(50));
    }
}

/// Hands `p`'s batch to its partition's task (started on first use); returns how many
/// messages left `p`. When the task's queue is full the batch stays (and grows) unless `wait`,
/// which blocks until there is room or the processor stops.
pub(super) fn hand_over<St: IdempotencyStore + Clone, H: Handler>(
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

pub(super) enum Sent {
    Taken,
    Full,
    Closed,
}

pub(super) fn send_batch<St: IdempotencyStore + Clone, H: Handler>(
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
        Ok(()) => {
            p.batch = shared.recycler.batch();
            Sent::Taken
        }
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

pub(super) fn start_worker<St: IdempotencyStore + Clone, H: Handler>(
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
            let mut batch = tokio::select! {
                biased;
                () = drain_requested(&mut drain_rx) => break,
                b = rx.recv() => match b { Some(b) => b, None => break },
            };
            // Batches queued meanwhile join this one, for fewer and larger store calls.
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(mut more) => {
                        batch.append(&mut more);
                        shared.recycler.give(more);
                    }
                    Err(_) => break,
                }
            }
            let mut last_done = None;
            let mut rest = &batch[..];
            while !rest.is_empty() {
                if drain_rx.borrow().is_some() {
                    store_offset(last_done);
                    break 'run;
                }
                match shared.process_batch(&*handler, rest, &mut drain_rx).await {
                    Ok(end) => {
                        if end.done > 0 {
                            last_done = Some(rest[end.done - 1].offset);
                            rest = &rest[end.done..];
                        }
                        if end.abandoned {
                            store_offset(last_done);
                            break 'run;
                        }
                    }
                    Err(e) => {
                        store_offset(last_done);
                        shared.fail(e);
                        break 'run;
                    }
                }
            }
            store_offset(last_done);
            shared.recycler.give(batch);
        }
    });
    Worker {
        queue,
        drain,
        done,
        gate,
    }
}
