//! The embedded store's implementation of [`IdempotencyStore`], the async face the adapters
//! use: the same operations as the blocking API, waiting for the disk and for a holder by
//! `.await` instead of blocking the thread.
//!
//! Invariant: no method here blocks an executor thread; each has the semantics of the blocking
//! method of the same name.

use std::time::{Duration, Instant};

use super::{Round, Settle, Store, begin_settles};
use crate::backend::{BeginOptions, IdempotencyStore};
use crate::clock::Timestamp;
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::model::{Begin, CasOutcome, Completion, Lease, PutPending, Snapshot, Take, Write};
use crate::wait::Signal;
use crate::wal::LeaseSync;

/// Each method runs the operation (in memory, under its shard lock: no waiting there), then
/// awaits durability of what it did or saw, without blocking the executor.
impl IdempotencyStore for Store {
    async fn begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Begin, Error> {
        self.begin_with(key, fingerprint, lease, BeginOptions::new())
            .await
    }

    async fn begin_wait(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        max_wait: Duration,
    ) -> Result<Begin, Error> {
        self.begin_with(key, fingerprint, lease, BeginOptions::new().wait(max_wait))
            .await
    }

    async fn begin_with(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        options: BeginOptions,
    ) -> Result<Begin, Error> {
        let inner = self.inner();
        let sync = options.lease_sync_choice().unwrap_or(self.lease_sync());
        let Some(max_wait) = options.max_wait() else {
            let settle = Settle::default();
            let (outcome, _) = inner.begin(key, fingerprint, lease, false, sync, &settle)?;
            if begin_settles(&outcome, sync) {
                inner
                    .settle_async(settle.get(), self.durability_override())
                    .await?;
            }
            return Ok(outcome);
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let until = Instant::now() + max_wait;
        loop {
            let settle = Settle::default();
            match inner.begin_round(key, fingerprint, lease, until, sync, &settle)? {
                Round::Done(outcome) => {
                    if begin_settles(&outcome, sync) {
                        inner
                            .settle_async(settle.get(), self.durability_override())
                            .await?;
                    }
                    return Ok(outcome);
                }
                Round::Wait {
                    hash,
                    signal,
                    slice,
                } => {
                    let fired = tokio::time::timeout(slice, Signal::fired(&signal)).await;
                    if fired.is_err() {
                        inner.forget_waiter(hash, &signal);
                    }
                }
            }
        }
    }

    async fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
        writes: &[Write],
    ) -> Result<Timestamp, Error> {
        let settle = Settle::default();
        let inner = self.inner();
        let expires = inner.note(inner.complete(lease, response, ttl, writes, &settle))?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await?;
        Ok(expires)
    }

    async fn begin_many(
        &self,
        keys: &[(Key<'_>, Fingerprint)],
        lease: Duration,
        lease_sync: LeaseSync,
    ) -> Result<Vec<Result<Begin, Error>>, Error> {
        let settle = Settle::default();
        let inner = self.inner();
        if !self.batch_calls_pay() {
            // One call a key, as the trait's default does, without its awaits.
            let answers = keys
                .iter()
                .map(|&(key, fp)| {
                    let r = inner.begin(key, fp, lease, false, lease_sync, &settle);
                    r.map(|(outcome, _)| outcome)
                })
                .collect();
            return Ok(answers);
        }
        let answers = inner.begin_many(keys, lease, lease_sync, &settle)?;
        if answers
            .iter()
            .any(|a| a.as_ref().is_ok_and(|b| begin_settles(b, lease_sync)))
        {
            inner
                .settle_async(settle.get(), self.durability_override())
                .await?;
        }
        Ok(answers)
    }

    async fn complete_many(
        &self,
        items: &[Completion<'_>],
    ) -> Result<Vec<Result<Timestamp, Error>>, Error> {
        let settle = Settle::default();
        let inner = self.inner();
        if !self.batch_calls_pay() {
            let results = items
                .iter()
                .map(|c| inner.note(inner.complete(c.lease, c.response, c.ttl, c.writes, &settle)))
                .collect();
            return Ok(results);
        }
        let results = inner.complete_many(items, &settle)?;
        inner
            .settle_async(settle.get(), self.durability_override())
            .await?;
        Ok(results)
    }

    async fn release(&self, lease: Lease) -> Result<(), Error> {
        let settle = Settle::default();
        let inner = self.inner();
        inner.note(inner.release(&lease, &settle))?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await
    }

    async fn renew(&self, lease: &mut Lease, extend: Duration) -> Result<Timestamp, Error> {
        let settle = Settle::default();
        let inner = self.inner();
        let deadline = inner.note(inner.renew(lease, extend, &settle))?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await?;
        lease.set_deadline(deadline);
        Ok(deadline)
    }

    async fn get(&self, key: Key<'_>) -> Result<Option<Snapshot>, Error> {
        let settle = Settle::default();
        let found = self.inner().get(key, &settle)?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await?;
        Ok(found)
    }

    async fn remove(&self, key: Key<'_>) -> Result<bool, Error> {
        let settle = Settle::default();
        let removed = self.inner().remove(key, &settle)?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await?;
        Ok(removed)
    }

    async fn cas(&self, write: &Write) -> Result<CasOutcome, Error> {
        let settle = Settle::default();
        let outcome = self.inner().cas(write, &settle)?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await?;
        Ok(outcome)
    }

    async fn put_pending(
        &self,
        key: Key<'_>,
        payload: &[u8],
        ttl: Option<Duration>,
    ) -> Result<PutPending, Error> {
        let settle = Settle::default();
        let outcome = self.inner().put_pending(key, payload, ttl, &settle)?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await?;
        Ok(outcome)
    }

    async fn take_pending(&self, key: Key<'_>, lease: Duration) -> Result<Take, Error> {
        let settle = Settle::default();
        let outcome = self.inner().take_pending(key, lease, &settle)?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await?;
        Ok(outcome)
    }
}

impl Store {
    /// Whether `begin_many` and `complete_many` on this handle take the batch path (one log
    /// record and at most one disk wait a call, `many.rs`): only when its calls wait for the
    /// disk (`Immediate`), the one case where a batch saves more than it costs. Otherwise one
    /// call a key is cheaper: 268 against 142 µs for 1024 keys in memory, 390 against 328 µs
    /// with a `Batched` log (`cargo bench --bench core -- begin_complete`; DESIGN.md).
    fn batch_calls_pay(&self) -> bool {
        let mode = self
            .durability_override()
            .or_else(|| self.inner().wal.as_ref().map(|w| w.mode()));
        mode == Some(crate::Durability::Immediate)
    }
}
