//! The one async face every backend implements: the embedded store (`embedded/async_face.rs`)
//! and Redis (`redis/ops.rs`).
//!
//! Invariant: each method has the semantics of the blocking method of the same name on
//! [`Store`](crate::Store), and never blocks an executor thread.

use std::future::Future;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::model::{Begin, CasOutcome, Completion, Lease, PutPending, Snapshot, Take, Write};
use crate::wal::LeaseSync;

/// How a [`begin_with`](IdempotencyStore::begin_with) behaves beyond its key, fingerprint and
/// lease: whether it waits for a holder, and when its lease must be durable.
///
/// ```
/// use idemkv::{BeginOptions, LeaseSync};
/// use std::time::Duration;
/// let opts = BeginOptions::new().wait(Duration::from_secs(5)).lease_sync(LeaseSync::Deferred);
/// assert_eq!(opts.max_wait(), Some(Duration::from_secs(5)));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BeginOptions {
    max_wait: Option<Duration>,
    lease_sync: Option<LeaseSync>,
}

impl BeginOptions {
    /// No wait, and the store handle's own [`LeaseSync`]: what [`IdempotencyStore::begin`] does.
    pub fn new() -> Self {
        Self::default()
    }
    /// Waits up to `max_wait` for a holder, as [`IdempotencyStore::begin_wait`] does.
    pub fn wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }
    /// [`wait`](Self::wait) if `max_wait` is set, otherwise no wait.
    pub fn wait_opt(mut self, max_wait: Option<Duration>) -> Self {
        self.max_wait = max_wait;
        self
    }
    /// When an acquired lease must be durable, overriding the store handle's choice. Stores
    /// that wait for no disk (Redis, memory) ignore it.
    pub fn lease_sync(mut self, sync: LeaseSync) -> Self {
        self.lease_sync = Some(sync);
        self
    }
    /// The longest wait for a holder, if any.
    pub fn max_wait(&self) -> Option<Duration> {
        self.max_wait
    }
    /// The lease durability asked for, if any (otherwise the handle's).
    pub fn lease_sync_choice(&self) -> Option<LeaseSync> {
        self.lease_sync
    }
}

/// The operations the HTTP and Kafka adapters use, as futures.
///
/// The embedded [`Store`](crate::Store) implements it, and so does `RedisStore` (feature
/// `redis`); [`Either`] picks one of two at run time. Semantics are those of the
/// blocking methods of the same names on [`Store`](crate::Store). Implementations never block an executor
/// thread: waiting for a holder (and, with durability, for the disk) is an `.await`.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// See [`Store::blocking_begin`](crate::Store::blocking_begin).
    fn begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Begin, Error>> + Send;

    /// See [`Store::blocking_begin_wait`](crate::Store::blocking_begin_wait): waits (asynchronously, at most `max_wait`) for a holder to
    /// finish before answering.
    fn begin_wait(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Begin, Error>> + Send;

    /// [`begin`](Self::begin) or [`begin_wait`](Self::begin_wait) as `options` say, with the
    /// lease's durability chosen per call (see [`LeaseSync`]). The default forwards to those two,
    /// for a store that waits for no disk.
    fn begin_with(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        options: BeginOptions,
    ) -> impl Future<Output = Result<Begin, Error>> + Send {
        async move {
            match options.max_wait {
                Some(w) => self.begin_wait(key, fingerprint, lease, w).await,
                None => self.begin(key, fingerprint, lease).await,
            }
        }
    }

    /// See [`Store::blocking_complete_with`](crate::Store::blocking_complete_with) (an empty `writes` is a plain completion).
    fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
        writes: &[Write],
    ) -> impl Future<Output = Result<Timestamp, Error>> + Send;

    /// [`begin_with`](Self::begin_with) without waiting, on each of `keys`: one answer per key,
    /// in order, as if each were its own `begin` one after another. So a key repeated in `keys`
    /// is held by its first occurrence: the later ones answer [`Begin::InProgress`] (or
    /// [`Begin::Mismatch`] under another fingerprint). With `Immediate` durability the embedded
    /// store takes every lease in one log record and waits for the disk at most once; otherwise
    /// it makes one call per key, as the default does (cheaper where no wait is shared). The outer
    /// `Err` means the call as a whole was refused (the log, a store-wide limit) and changed
    /// nothing; an item's own `Err` is what `begin` would have returned for it.
    fn begin_many(
        &self,
        keys: &[(Key<'_>, Fingerprint)],
        lease: Duration,
        lease_sync: LeaseSync,
    ) -> impl Future<Output = Result<Vec<Result<Begin, Error>>, Error>> + Send {
        async move {
            let mut out = Vec::with_capacity(keys.len());
            let options = BeginOptions::new().lease_sync(lease_sync);
            for &(key, fingerprint) in keys {
                out.push(self.begin_with(key, fingerprint, lease, options).await);
            }
            Ok(out)
        }
    }

    /// [`complete`](Self::complete) of each item, one answer per item, in order; each item
    /// succeeds or fails on its own. With `Immediate` durability the embedded store writes the
    /// items without writes as one log record and waits for the disk once; otherwise it makes
    /// one call per item, as the default does. The outer
    /// `Err` means the shared record was refused (the log, a store-wide limit), and none of
    /// those items changed.
    fn complete_many(
        &self,
        items: &[Completion<'_>],
    ) -> impl Future<Output = Result<Vec<Result<Timestamp, Error>>, Error>> + Send {
        async move {
            let mut out = Vec::with_capacity(items.len());
            for c in items {
                out.push(self.complete(c.lease, c.response, c.ttl, c.writes).await);
            }
            Ok(out)
        }
    }

    /// See [`Store::blocking_release`](crate::Store::blocking_release).
    fn release(&self, lease: Lease) -> impl Future<Output = Result<(), Error>> + Send;

    /// See [`Store::blocking_renew`](crate::Store::blocking_renew).
    fn renew(
        &self,
        lease: &mut Lease,
        extend: Duration,
    ) -> impl Future<Output = Result<Timestamp, Error>> + Send;

    /// See [`Store::blocking_get`](crate::Store::blocking_get).
    fn get(&self, key: Key<'_>) -> impl Future<Output = Result<Option<Snapshot>, Error>> + Send;

    /// See [`Store::blocking_remove`](crate::Store::blocking_remove).
    fn remove(&self, key: Key<'_>) -> impl Future<Output = Result<bool, Error>> + Send;

    /// See [`Store::blocking_cas`](crate::Store::blocking_cas).
    fn cas(&self, write: &Write) -> impl Future<Output = Result<CasOutcome, Error>> + Send;

    /// See [`Store::blocking_put_pending`](crate::Store::blocking_put_pending).
    fn put_pending(
        &self,
        key: Key<'_>,
        payload: &[u8],
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<PutPending, Error>> + Send;

    /// See [`Store::blocking_take_pending`](crate::Store::blocking_take_pending).
    fn take_pending(
        &self,
        key: Key<'_>,
        lease: Duration,
    ) -> impl Future<Output = Result<Take, Error>> + Send;
}

/// One of two stores, chosen at run time — `Either<Store, RedisStore>` for a service that runs
/// embedded or on Redis by configuration — with one type for the adapters:
///
/// ```
/// use idemkv::{Either, IdempotencyStore, Store};
///
/// fn pick(on_redis: bool) -> Either<Store, Store> {
///     // With the `redis` feature the right side would be a `RedisStore`.
///     if on_redis { Either::Right(Store::in_memory()) } else { Either::Left(Store::in_memory()) }
/// }
/// let store = pick(false);
/// let layer = idemkv::http::IdempotencyLayer::new(store);
/// # drop(layer);
/// ```
#[derive(Clone, Debug)]
pub enum Either<A, B> {
    /// The first store.
    Left(A),
    /// The second store.
    Right(B),
}

/// Forwards one call to whichever side this is.
macro_rules! either {
    ($self:expr, $s:ident => $call:expr) => {
        match $self {
            Either::Left($s) => $call.await,
            Either::Right($s) => $call.await,
        }
    };
}

impl<A: IdempotencyStore, B: IdempotencyStore> IdempotencyStore for Either<A, B> {
    async fn begin(&self, key: Key<'_>, fp: Fingerprint, lease: Duration) -> Result<Begin, Error> {
        either!(self, s => s.begin(key, fp, lease))
    }
    async fn begin_wait(
        &self,
        key: Key<'_>,
        fp: Fingerprint,
        lease: Duration,
        max_wait: Duration,
    ) -> Result<Begin, Error> {
        either!(self, s => s.begin_wait(key, fp, lease, max_wait))
    }
    async fn begin_with(
        &self,
        key: Key<'_>,
        fp: Fingerprint,
        lease: Duration,
        options: BeginOptions,
    ) -> Result<Begin, Error> {
        either!(self, s => s.begin_with(key, fp, lease, options))
    }
    async fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
        writes: &[Write],
    ) -> Result<Timestamp, Error> {
        either!(self, s => s.complete(lease, response, ttl, writes))
    }
    async fn release(&self, lease: Lease) -> Result<(), Error> {
        either!(self, s => s.release(lease))
    }
    async fn begin_many(
        &self,
        keys: &[(Key<'_>, Fingerprint)],
        lease: Duration,
        lease_sync: LeaseSync,
    ) -> Result<Vec<Result<Begin, Error>>, Error> {
        either!(self, s => s.begin_many(keys, lease, lease_sync))
    }
    async fn complete_many(
        &self,
        items: &[Completion<'_>],
    ) -> Result<Vec<Result<Timestamp, Error>>, Error> {
        either!(self, s => s.complete_many(items))
    }
    async fn renew(&self, lease: &mut Lease, extend: Duration) -> Result<Timestamp, Error> {
        either!(self, s => s.renew(lease, extend))
    }
    async fn get(&self, key: Key<'_>) -> Result<Option<Snapshot>, Error> {
        either!(self, s => s.get(key))
    }
    async fn remove(&self, key: Key<'_>) -> Result<bool, Error> {
        either!(self, s => s.remove(key))
    }
    async fn cas(&self, write: &Write) -> Result<CasOutcome, Error> {
        either!(self, s => s.cas(write))
    }
    async fn put_pending(
        &self,
        key: Key<'_>,
        payload: &[u8],
        ttl: Option<Duration>,
    ) -> Result<PutPending, Error> {
        either!(self, s => s.put_pending(key, payload, ttl))
    }
    async fn take_pending(&self, key: Key<'_>, lease: Duration) -> Result<Take, Error> {
        either!(self, s => s.take_pending(key, lease))
    }
}
