//! The batch path of a partition task. The messages handed to the task together are leased
//! with one `begin_many`, their handlers run one after another in offset order, and their
//! results are recorded with one `complete_many` (on an `Immediate` embedded store: one log
//! record and one wait for the disk each) and replied to together (one wait for the broker).
//!
//! What the batch path does not do itself goes through the per-message path (`attempt.rs`),
//! in order, with the lease the batch took for it:
//! - processors where a message needs more than its own record: token mode, and a follow-up
//!   topic (exactly-once HTTP calls);
//! - a message whose key is not fresh (a replay, a mismatch, a live holder, a takeover to be
//!   counted), or whose echo headers are refused, and every message after it in the batch;
//! - an outcome with an outbox or follow-ups, a retry, a lost lease.
//!
//! Invariants, those of the per-message path:
//! - A partition's messages run one at a time in offset order: a handler starts only after
//!   every earlier message of the partition has run or been answered.
//! - A handler runs only under its key's lease, and its result is recorded only under it:
//!   each completion in `complete_many` checks its own token.
//! - No result waits for its record past its lease: a handler that does not finish at its
//!   first poll runs under the lease runner (renewed), and what ran before it is recorded
//!   first; leases not yet used when a third of the lease has passed are renewed before use.
//! - An offset is stored only once its message's result is recorded (or replayed).

use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use tracing::Instrument as _;

use super::attempt::{Attempts, Step, Tail};
use super::poller::BATCH;
use super::*;
use crate::Completion;

/// A message whose handler ran in the batch, and whose result waits for its record.
struct Finished {
    at: usize,
    lease: Lease,
    record: StoredReply,
    writes: Vec<Write>,
}

/// How a call of [`Shared::process_batch`] ended: the messages done from the front of the
/// slice (their offsets may be stored), and whether the partition must stop (drained).
pub(super) struct BatchEnd {
    pub(super) done: usize,
    pub(super) abandoned: bool,
}

impl<St: IdempotencyStore + Clone> Shared<St> {
    /// Whether this processor's messages may take the batch path at all.
    fn batches(&self) -> bool {
        self.cfg.tokens.is_none() && self.cfg.follow_up_topic.is_none()
    }

    /// Processes messages from the front of `msgs` (one partition's, in offset order): at
    /// least one, at most [`BATCH`].
    pub(super) async fn process_batch<H: Handler>(
        &self,
        handler: &H,
        msgs: &[Arc<Message>],
        drain: &mut Drain,
    ) -> Result<BatchEnd, KafkaError> {
        let mut echoes: Vec<Vec<(String, Vec<u8>)>> = Vec::new();
        if self.batches() {
            for m in msgs.iter().take(BATCH) {
                match echo_headers(&self.cfg.echo, m) {
                    Ok(echo) => echoes.push(echo),
                    Err(_) => break,
                }
            }
        }
        let n = echoes.len();
        // Two or more messages the batch path can take: lease them together.
        let answers = if n < 2 {
            None
        } else {
            let keys: Vec<(Key<'_>, Fingerprint)> = msgs[..n]
                .iter()
                .map(|m| {
                    let payload = m.payload().unwrap_or_default();
                    (Key::new(&self.scope, m.id()), Fingerprint::of(payload))
                })
                .collect();
            self.store
                .begin_many(&keys, self.cfg.lease, self.cfg.lease_sync)
                .await
                .ok()
        };
        let Some(answers) = answers else {
            // One message, one the batch path cannot take, or a batch refused as a whole: the
            // per-message path answers (or fails) the first, and the next call goes on.
            let d = self
                .process(handler, msgs[0].clone(), drain)
                .instrument(span(&msgs[0]))
                .await?;
            return Ok(match d {
                Disposition::Done => BatchEnd {
                    done: 1,
                    abandoned: false,
                },
                Disposition::Abandoned => BatchEnd {
                    done: 0,
                    abandoned: true,
                },
            });
        };
        let taken = Instant::now();
        // Fresh leases from the front run in the batch; the first other answer ends that part.
        let mut leases: Vec<Option<Lease>> = answers
            .into_iter()
            .map(|a| match a {
                Ok(Begin::Acquired(lease)) => Some(lease),
                _ => None,
            })
            .collect();
        let fresh = leases
            .iter()
            .position(|l| l.as_ref().is_none_or(Lease::is_takeover))
            .unwrap_or(n);

        let mut ran: Vec<Finished> = Vec::with_capacity(fresh);
        let mut at = 0;
        let mut stopped = false;
        while at < fresh {
            if drain.borrow().is_some() {
                stopped = true;
                break;
            }
            if taken.elapsed() > self.cfg.lease / 3 {
                break;
            }
            let Some(lease) = leases[at].take() else {
                break;
            };
            let msg = &msgs[at];
            let incoming = Incoming {
                msg: msg.clone(),
                attempt: 1,
                calls: None,
                follow_up: None,
            };
            let mut work =
                std::pin::pin!(super::guarded(handler.handle(incoming)).instrument(span(msg)));
            let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
            let (result, lease) = match first {
                Poll::Ready(result) => (result, lease),
                Poll::Pending => {
                    // A handler that waits: record what ran before it first, since only this
                    // one's lease is renewed while it runs.
                    if let Some(stop) = self
                        .record_ran(handler, msgs, &echoes, &mut ran, drain)
                        .await?
                    {
                        leases[at] = Some(lease);
                        return self.give_back(leases, stop).await;
                    }
                    let held = Held::new(self.store.clone(), lease);
                    match run(
                        &self.store,
                        held,
                        self.cfg.lease,
                        work,
                        drain_deadline(drain),
                    )
                    .await
                    {
                        Ran::Done(result, held) => (result, held.take()),
                        // Taken over: the other holder's result is the one recorded.
                        Ran::Lost(_, None) => {
                            leases[at] = None;
                            break;
                        }
                        Ran::Lost(e, Some(held)) => (Err(HandlerError::retry(e)), held.take()),
                        Ran::Cancelled(held, ()) => {
                            self.release(held.take()).await?;
                            stopped = true;
                            break;
                        }
                    }
                }
            };
            match result {
                Ok(outcome) if outcome.outgoing.is_empty() && outcome.follow_ups.is_empty() => {
                    ran.push(Finished {
                        at,
                        lease,
                        record: StoredReply::reply(outcome.headers, outcome.payload),
                        writes: outcome.writes,
                    });
                }
                Err(HandlerError::Fail(why)) => ran.push(Finished {
                    at,
                    lease,
                    record: StoredReply::failure(why),
                    writes: Vec::new(),
                }),
                // An outbox, follow-ups, a retry: the per-message path's rest, once what ran
                // before is recorded.
                other => {
                    if let Some(stop) = self
                        .record_ran(handler, msgs, &echoes, &mut ran, drain)
                        .await?
                    {
                        leases[at] = Some(lease);
                        return self.give_back(leases, stop).await;
                    }
                    let tail = Tail {
                        calls: None,
                        follow_up_url: None,
                        took_over: false,
                    };
                    let rest = async {
                        let mut attempts = Attempts::default();
                        let step = self
                            .conclude(msg, &echoes[at], lease, other, &mut attempts, tail, drain)
                            .await?;
                        self.finish_alone(handler, msg, attempts, step, drain).await
                    };
                    if let Disposition::Abandoned = rest.instrument(span(msg)).await? {
                        return self.give_back(leases, at).await;
                    }
                }
            }
            at += 1;
        }
        if let Some(stop) = self
            .record_ran(handler, msgs, &echoes, &mut ran, drain)
            .await?
        {
            return self.give_back(leases, stop).await;
        }
        if stopped {
            return self.give_back(leases, at).await;
        }
        // The rest, message by message, each with the lease the batch took for it.
        while at < n {
            if drain.borrow().is_some() {
                return self.give_back(leases, at).await;
            }
            let lease = leases[at].take();
            let msg = &msgs[at];
            let d = self
                .alone(handler, msg, &echoes[at], lease, taken, drain)
                .instrument(span(msg))
                .await?;
            if let Disposition::Abandoned = d {
                return self.give_back(leases, at).await;
            }
            at += 1;
        }
        Ok(BatchEnd {
            done: n,
            abandoned: false,
        })
    }

    /// Releases the leases not used (the partition stops at `done`).
    async fn give_back(
        &self,
        leases: Vec<Option<Lease>>,
        done: usize,
    ) -> Result<BatchEnd, KafkaError> {
        for lease in leases.into_iter().flatten() {
            self.release(lease).await?;
        }
        Ok(BatchEnd {
            done,
            abandoned: true,
        })
    }

    /// The per-message path for `msg`, with the lease the batch took for it, if any (a lease
    /// taken a while ago is renewed first; one lost meanwhile starts the message afresh).
    async fn alone<H: Handler>(
        &self,
        handler: &H,
        msg: &Arc<Message>,
        echo: &[(String, Vec<u8>)],
        lease: Option<Lease>,
        taken: Instant,
        drain: &mut Drain,
    ) -> Result<Disposition, KafkaError> {
        let Some(mut lease) = lease else {
            return self.process(handler, msg.clone(), drain).await;
        };
        if taken.elapsed() > self.cfg.lease / 3 {
            match self.store.renew(&mut lease, self.cfg.lease).await {
                Ok(_) => {}
                Err(Error::StaleLease { .. }) => {
                    return self.process(handler, msg.clone(), drain).await;
                }
                Err(e) => {
                    let _ = self.store.release(lease).await;
                    return Err(e.into());
                }
            }
        }
        let mut attempts = Attempts::default();
        let step = self
            .attempt(handler, msg, echo, lease, &mut attempts, drain)
            .await?;
        self.finish_alone(handler, msg, attempts, step, drain).await
    }

    /// What follows a first attempt that asked for `step`.
    async fn finish_alone<H: Handler>(
        &self,
        handler: &H,
        msg: &Arc<Message>,
        attempts: Attempts,
        step: Step,
        drain: &mut Drain,
    ) -> Result<Disposition, KafkaError> {
        match step {
            Step::Finished(d) => Ok(d),
            step => {
                self.process_from(handler, msg.clone(), attempts, Some(step), drain)
                    .await
            }
        }
    }

    /// Records the results in `ran` (emptying it) with one `complete_many`, then replies to
    /// them. A result the store refuses goes the per-message way (a lost lease replays the
    /// other holder's result; a write conflict is retried). `Some(i)`: the partition must
    /// stop, and the messages before `i` are done.
    async fn record_ran<H: Handler>(
        &self,
        handler: &H,
        msgs: &[Arc<Message>],
        echoes: &[Vec<(String, Vec<u8>)>],
        ran: &mut Vec<Finished>,
        drain: &mut Drain,
    ) -> Result<Option<usize>, KafkaError> {
        if ran.is_empty() {
            return Ok(None);
        }
        // Every record in one buffer.
        let mut encoded = Vec::new();
        let mut ends = Vec::with_capacity(ran.len());
        for r in ran.iter() {
            r.record.encode_into(&mut encoded);
            ends.push(encoded.len());
        }
        let items: Vec<Completion<'_>> = ran
            .iter()
            .zip(&ends)
            .scan(0, |start, (r, &end)| {
                let response = encoded.get(*start..end).unwrap_or_default();
                *start = end;
                Some(Completion {
                    lease: &r.lease,
                    response,
                    ttl: self.cfg.result_ttl,
                    writes: &r.writes,
                })
            })
            .collect();
        let results = match self.store.complete_many(&items).await {
            Ok(results) => results,
            Err(e) => {
                drop(items);
                for r in ran.drain(..) {
                    let _ = self.store.release(r.lease).await;
                }
                return Err(e.into());
            }
        };
        drop(items);
        let mut recorded = Vec::with_capacity(ran.len());
        let mut stop = None;
        for (r, result) in ran.drain(..).zip(results) {
            match result {
                Ok(_) => {
                    bump(if r.record.error.is_some() {
                        &self.stats.failed
                    } else {
                        &self.stats.processed
                    });
                    recorded.push((r.at, r.record));
                }
                Err(_) if stop.is_some() => {
                    // The partition stops: this one is redelivered.
                    let _ = self.release(r.lease).await;
                }
                Err(e) => {
                    let (msg, echo) = (&msgs[r.at], &echoes[r.at]);
                    let writes_len = r.writes.len() + 1;
                    let again = async {
                        let mut attempts = Attempts::default();
                        let step = self
                            .record_failed(e, msg, echo, r.lease, &mut attempts, writes_len)
                            .await?;
                        self.finish_alone(handler, msg, attempts, step, drain).await
                    };
                    let d = again.instrument(span(msg)).await?;
                    if let Disposition::Abandoned = d {
                        stop = Some(r.at);
                    }
                }
            }
        }
        self.reply_all(
            recorded
                .iter()
                .map(|(at, record)| (&*msgs[*at], echoes[*at].as_slice(), record)),
        )
        .await;
        Ok(stop)
    }
}

/// The span of one message's processing (a disabled span costs one callsite check).
fn span(msg: &Message) -> tracing::Span {
    tracing::info_span!(
        "kafka_message",
        topic = %msg.topic,
        partition = msg.partition,
        offset = msg.offset,
    )
}
