//! The per-message state machine: begin (or wait for the holder, or replay), run the handler
//! under the shared lease runner, record the result with the handler's writes and the attempt
//! counter in one completion, or count a failure and back off.
//!
//! Invariant: a message's result is recorded at most once, by the holder of the key's current
//! lease; the offset is stored for commit only after that (or after a replay).

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::kafka::call::FOLLOW_UP;

impl<St: IdempotencyStore + Clone> Shared<St> {
    /// Takes one message from fetch to "offset may be stored".
    pub(super) async fn process<H: Handler>(
        &self,
        handler: &H,
        msg: Arc<Message>,
        drain: &mut Drain,
    ) -> Result<Disposition, KafkaError> {
        self.process_from(handler, msg, Attempts::default(), None, drain)
            .await
    }

    /// [`process`](Self::process), for a message whose first attempt already ran (in a batch)
    /// and asked for `after`: `Again` (begin again, waiting for a holder) or `Backoff` (wait,
    /// then begin again); `None` starts from the beginning.
    pub(super) async fn process_from<H: Handler>(
        &self,
        handler: &H,
        msg: Arc<Message>,
        mut attempts: Attempts,
        after: Option<Step>,
        drain: &mut Drain,
    ) -> Result<Disposition, KafkaError> {
        let echo = match echo_headers(&self.cfg.echo, &msg) {
            Ok(echo) => echo,
            Err(why) => {
                bump(&self.stats.rejected);
                self.reply(&msg, &[], &StoredReply::failure(why), false)
                    .await;
                return Ok(Disposition::Done);
            }
        };
        let key = Key::new(&self.scope, msg.id());
        let fingerprint = Fingerprint::of(msg.payload().unwrap_or_default());
        if let Some(scope) = self.cfg.tokens.as_ref().filter(|_| after.is_none()) {
            let token = OwnedKey::new(scope, msg.id());
            match self.store.get(token.as_key()).await? {
                Some(Snapshot::Value(v)) => attempts.token = Some((token, v.version)),
                _ => {
                    bump(&self.stats.untokened);
                    return Ok(Disposition::Done);
                }
            }
        }
        // The first look does not wait: most keys are new, and a plain `begin` is cheaper.
        let mut first = after.is_none();
        if let Some(Step::Backoff) = after
            && let Some(d) = self.back_off(&attempts, drain).await
        {
            return Ok(d);
        }
        loop {
            let options = BeginOptions::new().lease_sync(self.cfg.lease_sync);
            let begin = if std::mem::take(&mut first) {
                self.store
                    .begin_with(key, fingerprint, self.cfg.lease, options)
                    .await
            } else {
                let options = options.wait(self.cfg.wait_for_holder);
                tokio::select! {
                    biased;
                    r = self.store.begin_with(key, fingerprint, self.cfg.lease, options) => r,
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
                            key: String::from_utf8_lossy(msg.id()).into_owned(),
                            reason: e.0,
                        }
                    })?;
                    // A crash may have come between the result and its outbox's messages.
                    if let Some(d) = self.flush_outbox(&msg, drain).await? {
                        return Ok(d);
                    }
                    bump(&self.stats.replayed);
                    if record.deferred {
                        // The answer is the follow-up's; first, finish cleaning up the calls.
                        let text = String::from_utf8_lossy(&record.payload).into_owned();
                        let winners: Vec<&str> = text.lines().collect();
                        if let Some(d) = self.clean_calls(&msg, &winners, drain).await? {
                            return Ok(d);
                        }
                        self.reply_from_follow_up(&msg, &echo).await;
                        return Ok(Disposition::Done);
                    }
                    self.reply(&msg, &echo, &record, true).await;
                    // A follow-up whose DELETE a crash cut: again (it is idempotent).
                    if let Some(url) = self.follow_up_url(&msg)
                        && let Some(d) = self.forget_call(url, drain).await
                    {
                        return Ok(d);
                    }
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
                    if let Some(d) = self.back_off(&attempts, drain).await {
                        return Ok(d);
                    }
                }
            }
        }
    }

    /// The wait after a failed attempt; `Some` if the partition was drained meanwhile.
    async fn back_off(&self, attempts: &Attempts, drain: &mut Drain) -> Option<Disposition> {
        let wait = backoff(
            self.cfg.retry_backoff,
            self.cfg.max_backoff,
            attempts.failed,
        );
        tokio::select! {
            () = tokio::time::sleep(wait) => None,
            () = drain_requested(drain) => Some(Disposition::Abandoned),
        }
    }

    /// One attempt under `lease`.
    pub(super) async fn attempt<H: Handler>(
        &self,
        handler: &H,
        msg: &Arc<Message>,
        echo: &[(String, Vec<u8>)],
        mut lease: Lease,
        attempts: &mut Attempts,
        drain: &mut Drain,
    ) -> Result<Step, KafkaError> {
        let attempts_key = OwnedKey::new(&self.attempts_scope, msg.id());
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
        let calls = self.call_site(msg, &lease);
        let follow_up_url = self.follow_up_url(msg).map(str::to_owned);
        let attempt = attempts.failed + 1;
        let took_over = lease.is_takeover();
        // The shared lease runner: renewed every third of the lease while the handler runs.
        let held = Held::new(self.store.clone(), lease);
        let work = {
            let (msg, calls, url) = (msg.clone(), calls.clone(), follow_up_url.clone());
            async move {
                // A follow-up first runs its call (POST, or GET if the answer was lost).
                let follow_up = match url {
                    Some(url) => Some(crate::kafka::FollowUp {
                        tag: msg.header_str(FOLLOW_UP).unwrap_or_default().to_owned(),
                        response: self.caller.run(&url).await,
                        url,
                    }),
                    None => None,
                };
                let incoming = Incoming {
                    msg,
                    attempt,
                    calls,
                    follow_up,
                };
                super::guarded(handler.handle(incoming)).await
            }
        };
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
        let tail = Tail {
            calls,
            follow_up_url,
            took_over,
        };
        self.conclude(msg, echo, lease, result, attempts, tail, drain)
            .await
    }

    /// The rest of an attempt once its handler has run under `lease`: record the result (with
    /// the handler's writes and the outbox), send the outbox, clean up calls, reply.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn conclude(
        &self,
        msg: &Arc<Message>,
        echo: &[(String, Vec<u8>)],
        lease: Lease,
        result: Result<Outcome, HandlerError>,
        attempts: &mut Attempts,
        tail: Tail,
        drain: &mut Drain,
    ) -> Result<Step, KafkaError> {
        let Tail {
            calls,
            follow_up_url,
            took_over,
        } = tail;
        let attempts_key = OwnedKey::new(&self.attempts_scope, msg.id());
        let mut sends = false;
        // The winning attempt's call URLs, when the reply is its follow-ups'.
        let mut winners: Vec<String> = Vec::new();
        let (record, writes) = match result {
            Ok(mut outcome) => {
                let mut record = StoredReply::reply(
                    std::mem::take(&mut outcome.headers),
                    std::mem::take(&mut outcome.payload),
                );
                if !outcome.follow_ups.is_empty() {
                    // Follow-ups go first in the outbox: follow-up 0's id is `{id}/0`.
                    let mut out: Vec<_> = outcome
                        .follow_ups
                        .iter()
                        .map(|c| self.follow_up_message(msg, c))
                        .collect();
                    out.append(&mut outcome.outgoing);
                    outcome.outgoing = out;
                    winners = outcome.follow_ups.iter().map(|c| c.url.clone()).collect();
                    record = StoredReply {
                        headers: Vec::new(),
                        payload: winners.join("\n").into_bytes(),
                        error: None,
                        deferred: true,
                    };
                }
                if outcome.outgoing.is_empty() {
                    (record, outcome.writes)
                } else {
                    match self.outbox_writes(msg, &outcome.outgoing) {
                        Ok(mut more) => {
                            // An outbox left by an earlier result of this key that has since
                            // expired holds committed messages: out with them first.
                            if let Some(d) = self.flush_outbox(msg, drain).await? {
                                self.release(lease).await?;
                                return Ok(Step::Finished(d));
                            }
                            sends = true;
                            outcome.writes.append(&mut more);
                            (record, outcome.writes)
                        }
                        Err(why) => (StoredReply::failure(why), Vec::new()),
                    }
                }
            }
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
        // The batch `record` commits: the handler's writes, the attempt counter's, the token.
        let writes_len = writes.len() + usize::from(attempts.version.is_some()) + 1;
        if let Err(e) = self
            .record(&lease, &record, writes, &attempts_key, attempts)
            .await
        {
            return self
                .record_failed(e, msg, echo, lease, attempts, writes_len)
                .await;
        }
        bump(if failed {
            &self.stats.failed
        } else {
            &self.stats.processed
        });
        if sends && let Some(d) = self.flush_outbox(msg, drain).await? {
            return Ok(Step::Finished(d));
        }
        // Calls of attempts that did not win (taken over, retried, or this one's, if it ended
        // without following them up) are deleted now that the result is in.
        let called = calls.is_some_and(|c| c.next_index.load(Ordering::SeqCst) > 0);
        if took_over || attempts.failed > 0 || called {
            let winners: Vec<&str> = winners.iter().map(String::as_str).collect();
            if let Some(d) = self.clean_calls(msg, &winners, drain).await? {
                return Ok(Step::Finished(d));
            }
        }
        if !record.deferred {
            self.reply(msg, echo, &record, false).await;
        }
        if let Some(url) = &follow_up_url
            && let Some(d) = self.forget_call(url, drain).await
        {
            return Ok(Step::Finished(d));
        }
        Ok(Step::Finished(Disposition::Done))
    }

    /// A result that `record` refused (`e`, with `lease` still held unless it was lost): what
    /// the attempt does next. `writes_len` counts the batch's writes, the token's last.
    pub(super) async fn record_failed(
        &self,
        e: Error,
        msg: &Arc<Message>,
        echo: &[(String, Vec<u8>)],
        lease: Lease,
        attempts: &mut Attempts,
        writes_len: usize,
    ) -> Result<Step, KafkaError> {
        let attempts_key = OwnedKey::new(&self.attempts_scope, msg.id());
        match e {
            Error::StaleLease { .. } => Ok(Step::Again),
            // The token is gone: another holder processed the message meanwhile.
            Error::BatchConflict { index, .. }
                if attempts.token.is_some() && index + 1 == writes_len =>
            {
                bump(&self.stats.untokened);
                self.release(lease).await?;
                Ok(Step::Finished(Disposition::Done))
            }
            e @ (Error::BatchConflict { .. } | Error::InvalidBatch { .. }) => {
                // The handler's writes lost a race (or are malformed): not recorded; retry.
                bump(&self.stats.retried);
                attempts.last_error = Some(e.to_string());
                self.count_failure(&attempts_key, attempts).await?;
                self.release(lease).await?;
                Ok(Step::Backoff)
            }
            e @ (Error::ValueTooLarge { .. } | Error::KeyTooLong { .. }) => {
                let failure = StoredReply::failure(format!("result not recorded: {e}"));
                self.record(&lease, &failure, Vec::new(), &attempts_key, attempts)
                    .await?;
                bump(&self.stats.failed);
                self.reply(msg, echo, &failure, false).await;
                Ok(Step::Finished(Disposition::Done))
            }
            e => {
                let _ = self.store.release(lease).await;
                Err(e.into())
            }
        }
    }

    /// Records `record` as the key's result, clearing the attempt counter in the same batch.
    pub(super) async fn record(
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
        let mut ttl = self.cfg.result_ttl;
        if let Some((token, version)) = &attempts.token {
            // The token goes with the result, and the result is not kept: the token's absence
            // is what answers a redelivery.
            writes.push(Write::delete_if_version(token.clone(), *version));
            ttl = Some(Duration::from_millis(1));
        }
        self.store
            .complete(lease, &record.encode(), ttl, &writes)
            .await
            .map(drop)
    }

    pub(super) async fn release(&self, lease: Lease) -> Result<(), KafkaError> {
        match self.store.release(lease).await {
            Ok(()) | Err(Error::StaleLease { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn load_attempts(
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
    pub(super) async fn count_failure(
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
}

/// Failed attempts of one message, mirrored in the store under the attempts scope.
#[derive(Default)]
pub(super) struct Attempts {
    pub(super) failed: u32,
    pub(super) version: Option<u64>,
    pub(super) last_error: Option<String>,
    /// Token mode: the message's token and the version it was seen with.
    pub(super) token: Option<(OwnedKey, u64)>,
}

/// What an attempt knows beyond its result, for [`Shared::conclude`].
pub(super) struct Tail {
    pub(super) calls: Option<Arc<CallSite>>,
    pub(super) follow_up_url: Option<String>,
    pub(super) took_over: bool,
}

pub(super) enum Step {
    Finished(Disposition),
    /// Lost the lease to someone else: start over (their result will be replayed).
    Again,
    /// A retryable failure: the lease is released; wait, then start over.
    Backoff,
}

pub(crate) fn backoff(first: Duration, max: Duration, failed: u32) -> Duration {
    let factor = 1u32 << failed.saturating_sub(1).min(16);
    first.saturating_mul(factor).min(max)
}
