//! What the processor produces besides recording: replies (fresh or replayed, with the
//! request's correlation and echo headers), the outbox's messages, and dead letters once
//! attempts are exhausted.
//!
//! Invariants: a dead letter is produced before its key is forgotten, so a message is never
//! dropped between the two; a reply failure is counted, never fatal to the partition; a
//! message's offset is stored only after its outbox is empty (a flush that cannot finish
//! before a drain leaves the message to be redelivered, and the redelivery flushes).

use super::*;
use crate::adapter::outbox::{self, FlushError, Outgoing};
use crate::kafka::ProducerPublisher;

/// How long an outbox record lives when the processor sets no result TTL: the embedded
/// store's default result TTL, so it does not outlive the result it belongs to.
const OUTBOX_TTL: Duration = Duration::from_secs(24 * 3600);

impl<St: IdempotencyStore + Clone> Shared<St> {
    /// The key of `msg`'s outbox record (same id as the message's record: on Redis, the same
    /// slot, so the two commit in one batch).
    pub(super) fn outbox_key(&self, msg: &Message) -> OwnedKey {
        OwnedKey::new(&self.outbox_scope, msg.id())
    }

    /// The writes that record `outgoing` with the result (the outbox record, and the tokens of
    /// messages sent with one); `Err` with the reason if they cannot be sent (a topic Kafka
    /// would refuse, or parts past the record's bounds).
    pub(super) fn outbox_writes(
        &self,
        msg: &Message,
        outgoing: &[Outgoing],
    ) -> Result<Vec<Write>, String> {
        if let Some(bad) = outgoing.iter().find(|m| !valid_topic(m.topic())) {
            return Err(format!(
                "outgoing message to {:?}: not a valid topic name",
                bad.topic().escape_debug().to_string()
            ));
        }
        outbox::check(outgoing).map_err(str::to_owned)?;
        let ttl = self.cfg.result_ttl.unwrap_or(OUTBOX_TTL);
        let record = Write::put_if_absent(self.outbox_key(msg), outbox::encode(0, outgoing));
        let mut writes = vec![record.with_ttl(ttl)];
        writes.extend(outbox::token_writes(msg.id(), outgoing, ttl));
        Ok(writes)
    }

    /// Produces what `msg`'s outbox has not produced yet, retrying with backoff while the
    /// broker refuses. `Some(Abandoned)` if the drain deadline came first (the message is left
    /// to be redelivered, its outbox intact).
    pub(super) async fn flush_outbox(
        &self,
        msg: &Message,
        drain: &mut Drain,
    ) -> Result<Option<Disposition>, KafkaError> {
        let key = self.outbox_key(msg);
        let ttl = self.cfg.result_ttl.unwrap_or(OUTBOX_TTL);
        let publisher =
            ProducerPublisher::new(self.producer.clone()).timeout(self.cfg.reply_timeout);
        let mut failures = 0;
        loop {
            match outbox::flush(&self.store, &key, msg.id(), ttl, &publisher).await {
                Ok(n) => {
                    self.stats.sent.fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(None);
                }
                Err(FlushError::Store(e)) => return Err(e.into()),
                Err(FlushError::Corrupt(reason)) => {
                    return Err(KafkaError::CorruptRecord {
                        key: String::from_utf8_lossy(msg.id()).into_owned(),
                        reason,
                    });
                }
                Err(FlushError::Publish { topic, source }) => {
                    failures += 1;
                    tracing::warn!(target: "idemkv::kafka", topic = %topic, error = %source, "outbox message could not be produced; retrying (the result stays recorded)");
                    let wait =
                        attempt::backoff(self.cfg.retry_backoff, self.cfg.max_backoff, failures);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = drain_deadline(drain) => return Ok(Some(Disposition::Abandoned)),
                    }
                }
            }
        }
    }
}

impl<St: IdempotencyStore + Clone> Shared<St> {
    /// Attempts are exhausted: dead-letter the message (and forget the key, so a re-drive from
    /// the dead-letter topic runs afresh), or, without a dead-letter topic, record the failure.
    pub(super) async fn give_up(
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
        let original = msg.headers();
        let headers = to_headers(original.chain(extra));
        let mut record = FutureRecord::to(dlq).headers(headers);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        if let Some(p) = msg.payload() {
            record = record.payload(p);
        }
        if let Err((e, _)) = self.producer.send(record, self.cfg.reply_timeout).await {
            tracing::error!(target: "idemkv::kafka", topic = %dlq, error = %e, origin = %origin, "dead letter could not be delivered; the processor stops");
            let _ = self.store.release(lease).await;
            return Err(KafkaError::Delivery {
                topic: dlq.clone(),
                source: e,
            });
        }
        bump(&self.stats.dead_lettered);
        tracing::warn!(target: "idemkv::kafka", topic = %dlq, origin = %origin, attempts = attempts.failed, reason = %why, "message dead-lettered");
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

    /// The reply to `msg`, if it names a `reply-to` topic (a name that is not a topic's is
    /// counted and logged, and gets none).
    fn reply_record<'a>(
        &self,
        msg: &'a Message,
        echo: &'a [(String, Vec<u8>)],
        record: &'a StoredReply,
        replayed: bool,
    ) -> Option<FutureRecord<'a, [u8], [u8]>> {
        let topic = msg.header_str(REPLY_TO)?;
        if !valid_topic(topic) {
            bump(&self.stats.reply_failures);
            tracing::warn!(target: "idemkv::kafka", reply_to = %topic.escape_debug(), "no reply sent: reply-to is not a valid topic name");
            return None;
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
            .payload(record.payload.as_slice())
            .headers(headers);
        if let Some(k) = msg.key() {
            reply = reply.key(k);
        }
        Some(reply)
    }

    /// Counts a reply's delivery, or logs why it failed.
    fn delivered(&self, topic: &str, result: Result<(), rdkafka::error::KafkaError>) {
        match result {
            Ok(()) => bump(&self.stats.replies),
            Err(e) => {
                bump(&self.stats.reply_failures);
                tracing::warn!(target: "idemkv::kafka", topic, error = %e, "reply could not be delivered; a retried request replays it");
            }
        }
    }

    /// Sends the reply if the request names a `reply-to` topic. A failure to deliver is
    /// counted, not fatal: the result is recorded, so a retried request replays it.
    pub(super) async fn reply(
        &self,
        msg: &Message,
        echo: &[(String, Vec<u8>)],
        record: &StoredReply,
        replayed: bool,
    ) {
        let Some(reply) = self.reply_record(msg, echo, record, replayed) else {
            return;
        };
        let topic = reply.topic;
        let sent = self.producer.send(reply, self.cfg.reply_timeout).await;
        self.delivered(topic, sent.map(drop).map_err(|(e, _)| e));
    }

    /// [`reply`](Self::reply) to each of `replies` (fresh results): all are queued first, then
    /// their deliveries awaited, so a batch waits for one round trip to the broker, not one
    /// per reply.
    pub(super) async fn reply_all(
        &self,
        replies: impl Iterator<Item = (&Message, &[(String, Vec<u8>)], &StoredReply)>,
    ) {
        let mut queued = Vec::new();
        for (msg, echo, record) in replies {
            let Some(reply) = self.reply_record(msg, echo, record, false) else {
                continue;
            };
            let topic = reply.topic;
            match self.producer.send_result(reply) {
                Ok(delivery) => queued.push((topic, delivery)),
                // The producer's queue is full: this one waits for room, as `reply` does.
                Err((_, reply)) => {
                    let sent = self.producer.send(reply, self.cfg.reply_timeout).await;
                    self.delivered(topic, sent.map(drop).map_err(|(e, _)| e));
                }
            }
        }
        for (topic, delivery) in queued {
            let result = match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_cancelled) => Err(rdkafka::error::KafkaError::Canceled),
            };
            self.delivered(topic, result);
        }
    }
}
