//! The embedded store: [`Store`], its public operations, and the modules that implement them.
//!
//! - `builder`: settings and `open` (lock, checkpoint load, replay, writer);
//! - `engine`: shards, locks, hashing, the log hand-off, accounting;
//! - `txn`: the mutation primitives, shared by live operations and recovery;
//! - `lease_ops`, `batch`, `values`: the operations, one concern each;
//! - `maintenance`: the sweeper and checkpoints, on one schedule.
//!
//! Invariant: every public method takes effect at one instant between its call and its
//! return (linearizable), and returns only once its change — and every change it could have
//! observed — is as durable as the handle's [`Durability`] promises.

mod async_face;
mod batch;
mod builder;
mod engine;
mod lease_ops;
mod maintenance;
mod many;
mod txn;
mod values;

use std::time::{Duration, Instant};

pub use builder::{OpenError, StoreBuilder};
use engine::begin_settles;
pub(crate) use engine::{Inner, Round, Settle};

use crate::clock::Timestamp;
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::model::{
    Begin, CasOutcome, CheckpointStats, Lease, PutPending, Snapshot, Stats, Take, Write,
};
use crate::shard::is_dead;
use crate::sync::Arc;
use crate::wal::recovery::RecoveryReport;
use crate::wal::{Durability, LeaseSync};
use engine::snapshot_of;

/// The embedded idempotency store. Cheap to clone (clones share the same store).
///
/// Its methods here block the calling thread (`blocking_*`, waiting for a holder or for the
/// disk); in async code use the same operations through [`IdempotencyStore`](crate::IdempotencyStore), which `Store`
/// implements, as `store.begin(..).await` (see the crate docs, "Blocking and async").
///
/// All operations are atomic per key, and a completion with a batch of writes is atomic across
/// all the keys it touches. Every operation is *linearizable*: it takes effect at one instant
/// between its call and its return.
///
/// ```
/// use idemkv::{Begin, Fingerprint, Key, Store};
/// use std::time::Duration;
///
/// let store = Store::builder().build()?;
/// let key = Key::new("tenant-1", "order-42");
/// let fp = Fingerprint::of(b"POST /orders {\"sku\":1}");
///
/// // First request: we hold the lease, do the work, store the response.
/// let Begin::Acquired(lease) = store.blocking_begin(key, fp, Duration::from_secs(30))? else { panic!() };
/// store.blocking_complete(&lease, b"201 order o-1", None)?;
///
/// // A retry replays it.
/// match store.blocking_begin(key, fp, Duration::from_secs(30))? {
///     Begin::Completed(done) => assert_eq!(done.response, b"201 order o-1"),
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), idemkv::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
    /// This handle's durability, overriding the store's (see [`Store::with_durability`]).
    durability: Option<Durability>,
    /// When this handle's acquired leases must be durable (see [`Store::with_lease_sync`]).
    lease_sync: LeaseSync,
    /// Stops and joins the sweeper when the last clone is dropped.
    _sweeper: Option<std::sync::Arc<maintenance::Handle>>,
}

impl Store {
    /// A builder with the defaults: 64 shards, 255-byte keys, 1 MiB values, no record or byte
    /// limit, 24 h TTL, a sweeper every second, the system clock.
    pub fn builder() -> StoreBuilder {
        StoreBuilder::default()
    }

    /// An in-memory store with the default configuration.
    pub fn in_memory() -> Self {
        match StoreBuilder::default().build() {
            Ok(s) => s,
            Err(e) => unreachable!("the default configuration is valid: {e}"),
        }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    pub(crate) fn durability_override(&self) -> Option<Durability> {
        self.durability
    }

    pub(crate) fn lease_sync(&self) -> LeaseSync {
        self.lease_sync
    }

    /// A handle on the same store whose calls use durability `d` instead of the store's:
    /// `Immediate` waits until the change (and everything the call observed) is synced — with a
    /// `Batched` store the writer then syncs at once instead of waiting out its delay;
    /// `Batched` or `None` return without waiting. Every change is logged either way.
    ///
    /// ```
    /// use idemkv::{Durability, Store};
    /// # let dir = std::env::temp_dir().join(format!("idemkv-dur-{}", std::process::id()));
    /// let store = Store::builder().durability(Durability::Batched { max_delay: std::time::Duration::from_millis(5) }).open(&dir)?;
    /// let payments = store.with_durability(Durability::Immediate); // these must not be lost
    /// # drop((store, payments)); std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_durability(&self, d: Durability) -> Store {
        Store {
            durability: Some(d),
            ..self.clone()
        }
    }

    /// A handle on the same store whose `begin`s wait for an acquired lease's durability as
    /// `sync` says (default [`LeaseSync::Synced`]). With [`LeaseSync::Deferred`] and
    /// `Durability::Immediate`, a request waits for one `fdatasync` instead of two: its
    /// completion's, which covers the lease. See [`LeaseSync`] for what a crash then leaves.
    ///
    /// ```
    /// use idemkv::{Begin, Durability, Fingerprint, Key, LeaseSync, Store};
    /// use std::time::Duration;
    /// # let dir = std::env::temp_dir().join(format!("idemkv-lease-sync-{}", std::process::id()));
    /// let store = Store::builder().durability(Durability::Immediate).open(&dir)?;
    /// let fast = store.with_lease_sync(LeaseSync::Deferred);
    /// let Begin::Acquired(lease) = fast.blocking_begin(Key::new("s", "k"), Fingerprint::of(b"x"), Duration::from_secs(5))?
    /// else { panic!() };
    /// // Here the lease may not be on disk yet; the completion waits for both.
    /// fast.blocking_complete(&lease, b"done", None)?;
    /// # drop((store, fast)); std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_lease_sync(&self, sync: LeaseSync) -> Store {
        Store {
            lease_sync: sync,
            ..self.clone()
        }
    }

    /// Starts work on `key`, or reports who has it. See [`Begin`] for the outcomes.
    ///
    /// An expired lease is taken over (the new lease says so); a different `fingerprint` on a
    /// key in use is a [`Begin::Mismatch`].
    pub fn blocking_begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Begin, Error> {
        let settle = Settle::default();
        let (outcome, _) =
            self.inner
                .begin(key, fingerprint, lease, false, self.lease_sync, &settle)?;
        if begin_settles(&outcome, self.lease_sync) {
            self.inner.settle(&settle, self.durability)?;
        }
        Ok(outcome)
    }

    /// Like [`begin`](Self::blocking_begin), but if someone else holds the key, blocks until they
    /// complete or release it (or their lease expires) for at most `max_wait`, then answers as
    /// `begin` would. No polling: the holder's completion wakes the waiter.
    pub fn blocking_begin_wait(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        max_wait: Duration,
    ) -> Result<Begin, Error> {
        let until = Instant::now() + max_wait;
        loop {
            let settle = Settle::default();
            match self.inner.begin_round(
                key,
                fingerprint,
                lease,
                until,
                self.lease_sync,
                &settle,
            )? {
                Round::Done(outcome) => {
                    if begin_settles(&outcome, self.lease_sync) {
                        self.inner.settle(&settle, self.durability)?;
                    }
                    return Ok(outcome);
                }
                Round::Wait {
                    hash,
                    signal,
                    slice,
                } => {
                    if !signal.wait_blocking(slice) {
                        self.inner.forget_waiter(hash, &signal);
                    }
                }
            }
        }
    }

    /// Stores `response` for the lease's key and ends the lease. Only the current holder can
    /// complete; anyone else gets [`Error::StaleLease`] and nothing is written. Returns when the
    /// record expires (`ttl`, or the store's default).
    pub fn blocking_complete(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Timestamp, Error> {
        self.blocking_complete_with(lease, response, ttl, &[])
    }

    /// [`complete`](Self::blocking_complete) together with versioned writes on other keys, all or none:
    /// if any write's condition fails, nothing is written ([`Error::BatchConflict`]) and the
    /// lease is still held.
    ///
    /// ```
    /// use idemkv::{Begin, CasOutcome, Fingerprint, Key, OwnedKey, Snapshot, Store, Write};
    /// use std::time::Duration;
    ///
    /// let store = Store::in_memory();
    /// let balance = OwnedKey::new("accounts", "c1");
    /// let CasOutcome::Applied { version: Some(v) } =
    ///     store.blocking_cas(&Write::put_if_absent(balance.clone(), "100.00"))? else { panic!() };
    ///
    /// let Begin::Acquired(lease) =
    ///     store.blocking_begin(Key::new("payments", "p-1"), Fingerprint::of(b"12.50"), Duration::from_secs(10))?
    /// else { panic!() };
    /// // The debit and "payment p-1 processed" commit together.
    /// store.blocking_complete_with(&lease, b"ok", None, &[Write::set_if_version(balance.clone(), v, "87.50")])?;
    /// let Some(Snapshot::Value(now)) = store.blocking_get(balance.as_key())? else { panic!() };
    /// assert_eq!(now.value, b"87.50");
    /// # Ok::<(), idemkv::Error>(())
    /// ```
    pub fn blocking_complete_with(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
        writes: &[Write],
    ) -> Result<Timestamp, Error> {
        let settle = Settle::default();
        let expires = self
            .inner
            .note(self.inner.complete(lease, response, ttl, writes, &settle))?;
        self.inner.settle(&settle, self.durability)?;
        Ok(expires)
    }

    /// Abandons the lease: the next `begin` runs the work again. For a stored request
    /// (`take_pending`), the request goes back to waiting.
    pub fn blocking_release(&self, lease: Lease) -> Result<(), Error> {
        let settle = Settle::default();
        self.inner.note(self.inner.release(&lease, &settle))?;
        self.inner.settle(&settle, self.durability)
    }

    /// Extends the lease to `extend` from now (a heartbeat for long handlers) and returns the
    /// new deadline. A lease that expired but was not taken over yet can still be renewed.
    pub fn blocking_renew(&self, lease: &mut Lease, extend: Duration) -> Result<Timestamp, Error> {
        let settle = Settle::default();
        let d = self.inner.note(self.inner.renew(lease, extend, &settle))?;
        self.inner.settle(&settle, self.durability)?;
        lease.deadline = d;
        Ok(d)
    }

    /// What `key` holds now, if anything (expired records are absent).
    pub fn blocking_get(&self, key: Key<'_>) -> Result<Option<Snapshot>, Error> {
        let settle = Settle::default();
        let found = self.inner.get(key, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        Ok(found)
    }

    /// Removes whatever `key` holds; returns whether there was something. A lease on it
    /// becomes stale, and waiters on it wake.
    pub fn blocking_remove(&self, key: Key<'_>) -> Result<bool, Error> {
        let settle = Settle::default();
        let removed = self.inner.remove(key, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        Ok(removed)
    }

    /// A compare-and-set on a versioned value.
    ///
    /// ```
    /// use idemkv::{CasOutcome, OwnedKey, Store, Write};
    /// let store = Store::in_memory();
    /// let k = OwnedKey::new("consumer-offsets", "orders/0");
    /// let CasOutcome::Applied { version: Some(v1) } = store.blocking_cas(&Write::put_if_absent(k.clone(), "17"))? else { panic!() };
    /// assert!(matches!(store.blocking_cas(&Write::put_if_absent(k.clone(), "18"))?, CasOutcome::Conflict { current: Some(v) } if v == v1));
    /// assert!(matches!(store.blocking_cas(&Write::set_if_version(k.clone(), v1, "18"))?, CasOutcome::Applied { .. }));
    /// # Ok::<(), idemkv::Error>(())
    /// ```
    pub fn blocking_cas(&self, write: &Write) -> Result<CasOutcome, Error> {
        let settle = Settle::default();
        let outcome = self.inner.cas(write, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        Ok(outcome)
    }

    /// Stores a request `payload` under `key` to be processed once later (the PUT of the
    /// exactly-once protocol). Repeatable until the request is taken.
    pub fn blocking_put_pending(
        &self,
        key: Key<'_>,
        payload: &[u8],
        ttl: Option<Duration>,
    ) -> Result<PutPending, Error> {
        let settle = Settle::default();
        let outcome = self.inner.put_pending(key, payload, ttl, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        Ok(outcome)
    }

    /// Takes the stored request under `key` for processing, exactly once: the first caller gets
    /// a lease and the payload; `complete` turns it into a stored response.
    pub fn blocking_take_pending(&self, key: Key<'_>, lease: Duration) -> Result<Take, Error> {
        let settle = Settle::default();
        let outcome = self.inner.take_pending(key, lease, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        Ok(outcome)
    }

    /// Every live record under `scope`, with its id, in no particular order. Visits every shard
    /// (one lock at a time), so it costs time in the number of records: for listings and
    /// administration, not the request path. Not a snapshot of one instant.
    pub fn scan(&self, scope: &[u8]) -> Vec<(Vec<u8>, Snapshot)> {
        let now = self.inner.now();
        let mut out = Vec::new();
        for shard in self.inner.shards.iter() {
            let s = shard.0.lock();
            for r in s.table.iter() {
                if r.scope() == scope && !is_dead(r, now) {
                    out.push((r.id().to_vec(), snapshot_of(r)));
                }
            }
        }
        out
    }

    /// Writes `value` under `key` with the given `version`, if the key holds nothing: for
    /// restoring a dump (`idemkv restore`) with the versions compare-and-set callers hold.
    /// Versions written later stay above it. Returns false, writing nothing, if the key holds
    /// a live record.
    pub fn restore_value(
        &self,
        key: Key<'_>,
        value: &[u8],
        version: u64,
        ttl: Option<Duration>,
    ) -> Result<bool, Error> {
        let settle = Settle::default();
        let done = self
            .inner
            .restore_value(key, value, version, ttl, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        Ok(done)
    }

    /// Every live record, scope and id with its state, one shard at a time: `f` runs outside
    /// the shard's lock (on a copy of that shard's records), so it may call the store, and at
    /// most one shard's records are held at once. For tools and administration; not a
    /// snapshot of one instant.
    pub fn for_each_record(&self, mut f: impl FnMut(Key<'_>, Snapshot)) {
        let now = self.inner.now();
        for shard in self.inner.shards.iter() {
            let copy: Vec<(Vec<u8>, Vec<u8>, Snapshot)> = {
                let s = shard.0.lock();
                s.table
                    .iter()
                    .filter(|r| !is_dead(r, now))
                    .map(|r| (r.scope().to_vec(), r.id().to_vec(), snapshot_of(r)))
                    .collect()
            };
            for (scope, id, snap) in copy {
                f(Key::new(&scope, &id), snap);
            }
        }
    }

    /// Writes a checkpoint now (see [`StoreBuilder::checkpoint_every`] for the automatic ones):
    /// `checkpoint.redb` is brought up to date, and the log segments it then covers are
    /// deleted. Only the keys the log changed since the last checkpoint are rewritten (their
    /// count is in the returned stats); every live record is written when the log cannot say
    /// which changed. A no-op for a store in memory.
    pub fn checkpoint(&self) -> Result<CheckpointStats, Error> {
        self.inner.checkpoint()
    }

    /// What recovery found when this store was opened on a directory (`None` in memory).
    pub fn recovery_report(&self) -> Option<&RecoveryReport> {
        self.inner.recovery.as_ref()
    }

    /// Drops every expired record now, one shard at a time; returns how many.
    pub fn sweep_expired(&self) -> usize {
        (0..self.inner.shard_count())
            .map(|i| self.inner.sweep_shard(i))
            .sum()
    }

    /// Counters and sizes. Takes each shard lock briefly, one at a time.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests;
