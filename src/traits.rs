//! The one async face every backend implements, and the embedded store's implementation.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::clock::Timestamp;
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::store::{Begin, CasOutcome, Lease, PutPending, Round, Snapshot, Store, Take, Write};
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

impl IdempotencyStore for Store {
    async fn begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Begin, Error> {
        Store::begin(self, key, fingerprint, lease)
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
            match inner.begin_round(key, fingerprint, lease, until)? {
                Round::Done(outcome) => return Ok(outcome),
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
        Store::complete_with(self, lease, response, ttl, writes)
    }

    async fn release(&self, lease: Lease) -> Result<(), Error> {
        Store::release(self, lease)
    }

    async fn renew(&self, lease: &mut Lease, extend: Duration) -> Result<Timestamp, Error> {
        Store::renew(self, lease, extend)
    }

    async fn get(&self, key: Key<'_>) -> Result<Option<Snapshot>, Error> {
        Store::get(self, key)
    }

    async fn remove(&self, key: Key<'_>) -> Result<bool, Error> {
        Store::remove(self, key)
    }

    async fn cas(&self, write: &Write) -> Result<CasOutcome, Error> {
        Store::cas(self, write)
    }

    async fn put_pending(
        &self,
        key: Key<'_>,
        payload: &[u8],
        ttl: Option<Duration>,
    ) -> Result<PutPending, Error> {
        Store::put_pending(self, key, payload, ttl)
    }

    async fn take_pending(&self, key: Key<'_>, lease: Duration) -> Result<Take, Error> {
        Store::take_pending(self, key, lease)
    }
}
