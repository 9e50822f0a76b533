//! The [`IdempotencyStore`] operations on Redis, each one script (`scripts.rs`): begin and
//! waiting for a holder (by pub/sub, see `notifier`), complete with its batch, release, renew,
//! get, remove, cas, and the pending-request protocol.
//!
//! Invariant: every state change of a key is one script, atomic on the server; a reply that
//! does not parse is `Error::Unavailable`, never a guess.

use super::*;

impl IdempotencyStore for RedisStore {
    async fn begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Begin, Error> {
        let r = self.begin_once(key, fingerprint, lease).await;
        self.inner.counts.begin(&r);
        r
    }

    async fn begin_wait(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        max_wait: Duration,
    ) -> Result<Begin, Error> {
        let r = self
            .wait_for_holder(key, fingerprint, lease, max_wait)
            .await;
        self.inner.counts.begin(&r);
        r
    }

    async fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
        writes: &[Write],
    ) -> Result<Timestamp, Error> {
        let r = self.complete_once(lease, response, ttl, writes).await;
        let c = &self.inner.counts;
        c.lease_op(Some(&c.completions), &r);
        r
    }

    /// Every key's script is sent at once: on the multiplexed connection they are pipelined
    /// (one round trip for the batch). Keys that repeat go one at a time, so that the first
    /// occurrence is the one that acquires.
    async fn begin_many(
        &self,
        keys: &[(Key<'_>, Fingerprint)],
        lease: Duration,
        _lease_sync: crate::LeaseSync,
    ) -> Result<Vec<Result<Begin, Error>>, Error> {
        let repeats = keys
            .iter()
            .enumerate()
            .any(|(i, (k, _))| keys[..i].iter().any(|(e, _)| e == k));
        if repeats {
            // A repeated key's answer depends on the order its scripts run in: one at a time.
            let mut out = Vec::with_capacity(keys.len());
            for &(key, fp) in keys {
                out.push(self.begin(key, fp, lease).await);
            }
            return Ok(out);
        }
        let begins = keys.iter().map(|&(key, fp)| self.begin(key, fp, lease));
        Ok(futures_util::future::join_all(begins).await)
    }

    /// Pipelined as [`begin_many`](Self::begin_many) is.
    async fn complete_many(
        &self,
        items: &[crate::Completion<'_>],
    ) -> Result<Vec<Result<Timestamp, Error>>, Error> {
        let completes = items
            .iter()
            .map(|c| self.complete(c.lease, c.response, c.ttl, c.writes));
        Ok(futures_util::future::join_all(completes).await)
    }

    async fn release(&self, lease: Lease) -> Result<(), Error> {
        let r = self.release_once(lease).await;
        let c = &self.inner.counts;
        c.lease_op(Some(&c.releases), &r);
        r
    }

    async fn renew(&self, lease: &mut Lease, extend: Duration) -> Result<Timestamp, Error> {
        let r = self.renew_once(lease, extend).await;
        self.inner.counts.lease_op(None, &r);
        r
    }

    async fn get(&self, key: Key<'_>) -> Result<Option<Snapshot>, Error> {
        self.check_key(key)?;
        let fields: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(self.redis_key(key))
            .query_async(&mut self.conn())
            .await
            .observed(&self.inner.health)?;
        snapshot_of(&fields)
    }

    async fn remove(&self, key: Key<'_>) -> Result<bool, Error> {
        self.check_key(key)?;
        let rk = self.redis_key(key);
        if let Some(c) = &self.inner.cache {
            c.map.lock().remove(&rk);
        }
        let n: i64 = self
            .eval(self.stamp(Call::new(&self.inner.scripts.remove).key(&rk)))
            .await?;
        Ok(n > 0)
    }

    async fn cas(&self, write: &Write) -> Result<CasOutcome, Error> {
        let key = write.key.as_key();
        self.check_key(key)?;
        if let Some(v) = cas_value(&write.op) {
            self.check_value(v)?;
        }
        if let Some(d) = write.ttl {
            nonzero(d, "the ttl")?;
        }
        let (op, version, value) = cas_args(&write.op);
        let rk = self.redis_key(key);
        let reply: Vec<Value> = self
            .eval(
                self.stamp(
                    Call::new(&self.inner.scripts.cas)
                        .key(&rk)
                        .arg(op)
                        .arg(version)
                        .arg(value)
                        .arg(write.ttl.map_or(0, ms)),
                ),
            )
            .await?;
        match code(&reply)? {
            1 => {
                let version = opt_uint(&reply, 1)?;
                Ok(CasOutcome::Applied { version })
            }
            0 => Ok(CasOutcome::Conflict {
                current: opt_uint(&reply, 1)?,
            }),
            _ => Err(wrong_kind(RecordKind::Value, &reply)),
        }
    }

    async fn put_pending(
        &self,
        key: Key<'_>,
        payload: &[u8],
        ttl: Option<Duration>,
    ) -> Result<PutPending, Error> {
        self.check_key(key)?;
        self.check_value(payload)?;
        let ttl_ms = match ttl {
            Some(d) => nonzero(d, "the ttl")?,
            None => ms(self.cfg().pending_ttl),
        };
        let rk = self.redis_key(key);
        let reply: Vec<Value> = self
            .eval(
                self.stamp(
                    Call::new(&self.inner.scripts.put_pending)
                        .key(&rk)
                        .arg(payload)
                        .arg(ttl_ms),
                ),
            )
            .await?;
        match code(&reply)? {
            1 => Ok(PutPending::Stored),
            2 => Ok(PutPending::InProgress {
                deadline: Timestamp::from_millis(uint(&reply, 1)?),
            }),
            3 => Ok(PutPending::Completed),
            _ => Err(wrong_kind(RecordKind::Pending, &reply)),
        }
    }

    async fn take_pending(&self, key: Key<'_>, lease: Duration) -> Result<Take, Error> {
        self.check_key(key)?;
        let lease_ms = nonzero(lease, "the lease duration")?;
        let rk = self.redis_key(key);
        let reply: Vec<Value> = self
            .eval(
                self.stamp(
                    Call::new(&self.inner.scripts.take_pending)
                        .key(&rk)
                        .arg(lease_ms)
                        .arg(ms(self.cfg().lease_retention))
                        .arg(Fingerprint::NONE.as_bytes().as_slice()),
                ),
            )
            .await?;
        match code(&reply)? {
            0 => Ok(Take::NotFound),
            1 => {
                let taken = Take::Acquired {
                    lease: Lease::new(
                        key.to_owned(),
                        uint(&reply, 1)?,
                        Timestamp::from_millis(uint(&reply, 2)?),
                        Fingerprint::NONE,
                        uint(&reply, 3)? == 1,
                    ),
                    payload: bytes(&reply, 4)?,
                };
                Ok(taken)
            }
            2 => Ok(Take::InProgress {
                deadline: Timestamp::from_millis(uint(&reply, 1)?),
            }),
            3 => Ok(Take::Completed(Completed {
                response: bytes(&reply, 1)?,
                completed_at: Timestamp::from_millis(uint(&reply, 2)?),
                expires_at: Timestamp::from_millis(uint(&reply, 3)?),
                fingerprint: fingerprint_of(&bytes(&reply, 4)?),
            })),
            _ => Err(wrong_kind(RecordKind::Pending, &reply)),
        }
    }
}

/// The operations' bodies; the trait methods above count their outcomes.
impl RedisStore {
    /// `begin_wait`'s loop (counted by the trait method).
    async fn wait_for_holder(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        max_wait: Duration,
    ) -> Result<Begin, Error> {
        let until = Instant::now() + max_wait;
        loop {
            let outcome = self.begin_once(key, fingerprint, lease).await?;
            let Begin::InProgress { .. } = outcome else {
                return Ok(outcome);
            };
            if Instant::now() >= until {
                return Ok(outcome);
            }
            // Subscribe, then look again, then wait: a completion published between the two
            // looks is not missed.
            let channel = Self::channel(&self.redis_key(key));
            let watch = self.inner.notifier.watch(&channel).await;
            let notified = watch.as_ref().map(|w| w.notify.clone());
            let fired = notified.as_ref().map(|n| n.notified());
            let mut fired = fired.map(Box::pin);
            if let Some(f) = fired.as_mut() {
                f.as_mut().enable();
            }
            let again = self.begin_once(key, fingerprint, lease).await;
            let deadline = match &again {
                Ok(Begin::InProgress { deadline }) => *deadline,
                _ => {
                    self.inner.notifier.unwatch(watch).await;
                    return again;
                }
            };
            // Wake at the holder's deadline (it may have died), or on a notification, or when
            // the budget is spent; without a subscription, look again every 50 ms.
            let to_deadline = Duration::from_millis(
                deadline
                    .as_millis()
                    .saturating_sub(
                        crate::clock::Clock::now(&crate::clock::SystemClock).as_millis(),
                    )
                    .max(1),
            );
            let mut slice = until
                .saturating_duration_since(Instant::now())
                .min(to_deadline);
            if fired.is_none() {
                slice = slice.min(Duration::from_millis(50));
            }
            match fired {
                Some(f) => {
                    let _ = tokio::time::timeout(slice, f).await;
                }
                None => tokio::time::sleep(slice).await,
            }
            self.inner.notifier.unwatch(watch).await;
        }
    }

    async fn complete_once(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
        writes: &[Write],
    ) -> Result<Timestamp, Error> {
        self.check_value(response)?;
        let ttl_ms = match ttl {
            Some(d) => nonzero(d, "the ttl")?,
            None => ms(self.cfg().default_ttl),
        };
        self.check_batch(lease, writes)?;
        let rk = self.redis_key(lease.key());
        let mut inv = Call::new(&self.inner.scripts.complete);
        inv.key(&rk);
        for w in writes {
            inv.key(self.redis_key(w.key.as_key()));
        }
        inv.arg(lease.token()).arg(response).arg(ttl_ms);
        for w in writes {
            let (op, version, value) = cas_args(&w.op);
            inv.arg(op).arg(version).arg(value).arg(w.ttl.map_or(0, ms));
        }
        let reply: Vec<Value> = self.eval(self.stamp(&mut inv)).await?;
        match code(&reply)? {
            1 => {
                let at = Timestamp::from_millis(uint(&reply, 1)?);
                Ok(at)
            }
            -2 => Err(Error::StaleLease {
                token: lease.token(),
            }),
            -3 => Err(Error::BatchConflict {
                index: uint(&reply, 1)? as usize,
                current: opt_uint(&reply, 2)?,
            }),
            _ => Err(Error::WrongKind {
                expected: RecordKind::Value,
                found: kind_from(&bytes(&reply, 2)?),
            }),
        }
    }

    async fn release_once(&self, lease: Lease) -> Result<(), Error> {
        let rk = self.redis_key(lease.key());
        let reply: i64 = self
            .eval(
                self.stamp(
                    Call::new(&self.inner.scripts.release)
                        .key(&rk)
                        .arg(lease.token())
                        .arg(ms(self.cfg().pending_ttl)),
                ),
            )
            .await?;
        match reply {
            1 => Ok(()),
            _ => Err(Error::StaleLease {
                token: lease.token(),
            }),
        }
    }

    async fn renew_once(&self, lease: &mut Lease, extend: Duration) -> Result<Timestamp, Error> {
        let extend_ms = nonzero(extend, "the lease extension")?;
        let rk = self.redis_key(lease.key());
        let reply: i64 = self
            .eval(
                self.stamp(
                    Call::new(&self.inner.scripts.renew)
                        .key(&rk)
                        .arg(lease.token())
                        .arg(extend_ms)
                        .arg(ms(self.cfg().lease_retention)),
                ),
            )
            .await?;
        if reply < 0 {
            return Err(Error::StaleLease {
                token: lease.token(),
            });
        }
        let deadline = Timestamp::from_millis(reply as u64);
        lease.set_deadline(deadline);
        Ok(deadline)
    }
}
