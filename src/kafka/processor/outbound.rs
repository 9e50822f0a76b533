//! What the processor produces besides recording: replies (fresh or replayed, with the
//! request's correlation and echo headers) and dead letters once attempts are exhausted.
//!
//! Invariant: a dead letter is produced before its key is forgotten, so a message is never
//! dropped between the two; a reply failure is counted, never fatal to the partition.

use super::*;

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

    /// Sends the reply if the request names a `reply-to` topic. A failure to deliver is
    /// counted, not fatal: the result is recorded, so a retried request replays it.
    pub(super) async fn reply(
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
            tracing::warn!(target: "idemkv::kafka", reply_to = %topic.escape_debug(), "no reply sent: reply-to is not a valid topic name");
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
            Err((e, _)) => {
                bump(&self.stats.reply_failures);
                tracing::warn!(target: "idemkv::kafka", topic, error = %e, "reply could not be delivered; a retried request replays it");
            }
        }
    }
}
