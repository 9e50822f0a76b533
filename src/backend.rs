//! The one async face every backend implements (the embedded store, Redis), and the embedded
//! store's implementation of it.
//!
//! Invariant: each method has the semantics of the blocking method of the same name on
//! [`Store`], and never blocks an executor thread.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::clock::Timestamp;
use crate::embedded::{Round, Settle, Store};
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::model::{Begin, CasOutcome, Lease, PutPending, Snapshot, Take, Write};
use crate::wait::Signal;

/// The operations the HTTP and Kafka adapters use, as futures.
///
/// The embedded [`Store`] implements it; so will the Redis backend. Semantics are those of the
/// blocking methods of the same names on [`Store`]. Implementations never block an executor
/// thread: waiting for a holder (and, with durability, for the disk) is an `.await`.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// See [`Store::begin`].
    fn begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Begin, Error>> + Send;

    /// See [`Store::begin_wait`]: waits (asynchronously, at most `max_wait`) for a holder to
    /// finish before answering.
    fn begin_wait(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Begin, Error>> + Send;

    /// See [`Store::complete_with`] (an empty `writes` is a plain completion).
    fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
        writes: &[Write],
    ) -> impl Future<Output = Result<Timestamp, Error>> + Send;

    /// See [`Store::release`].
    fn release(&self, lease: Lease) -> impl Future<Output = Result<(), Error>> + Send;

    /// See [`Store::renew`].
    fn renew(
        &self,
        lease: &mut Lease,
        extend: Duration,
    ) -> impl Future<Output = Result<Timestamp, Error>> + Send;

    /// See [`Store::get`].
    fn get(&self, key: Key<'_>) -> impl Future<Output = Result<Option<Snapshot>, Error>> + Send;

    /// See [`Store::remove`].
    fn remove(&self, key: Key<'_>) -> impl Future<Output = Result<bool, Error>> + Send;

    /// See [`Store::cas`].
    fn cas(&self, write: &Write) -> impl Future<Output = Result<CasOutcome, Error>> + Send;

    /// See [`Store::put_pending`].
    fn put_pending(
        &self,
        key: Key<'_>,
        payload: &[u8],
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<PutPending, Error>> + Send;

    /// See [`Store::take_pending`].
    fn take_pending(
        &self,
        key: Key<'_>,
        lease: Duration,
    ) -> impl Future<Output = Result<Take, Error>> + Send;
}

/// Each method runs the operation (in memory, under its shard lock: no waiting there), then
/// awaits durability of what it did or saw, without blocking the executor.
impl IdempotencyStore for Store {
    async fn begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Begin, Error> {
        let settle = Settle::default();
        let (outcome, _) = self
            .inner()
            .begin(key, fingerprint, lease, false, &settle)?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await?;
        Ok(outcome)
    }

    async fn begin_wait(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        max_wait: Duration,
    ) -> Result<Begin, Error> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let inner = self.inner();
        let until = Instant::now() + max_wait;
        loop {
            let settle = Settle::default();
            match inner.begin_round(key, fingerprint, lease, until, &settle)? {
                Round::Done(outcome) => {
                    inner
                        .settle_async(settle.get(), self.durability_override())
                        .await?;
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
        let expires = self
            .inner()
            .complete(lease, response, ttl, writes, &settle)?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await?;
        Ok(expires)
    }

    async fn release(&self, lease: Lease) -> Result<(), Error> {
        let settle = Settle::default();
        self.inner().release(&lease, &settle)?;
        self.inner()
            .settle_async(settle.get(), self.durability_override())
            .await
    }

    async fn renew(&self, lease: &mut Lease, extend: Duration) -> Result<Timestamp, Error> {
        let settle = Settle::default();
        let deadline = self.inner().renew(lease, extend, &settle)?;
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
