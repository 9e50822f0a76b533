//! The engine's core: the sharded index, shard locking, hashing, the log hand-off, the
//! durability wait (`settle`), and the accounting of records and bytes against the limits.
//!
//! Invariant: a record's key always hashes to the same shard (bits 40..56 of the hash), so one
//! shard lock serialises every change to a key; a change is logged under that lock before it is
//! applied, so the log holds the changes of a key in the order they were made.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use crate::checkpoint::Checkpoints;
use crate::clock::{Clock, Timestamp};
use crate::error::{Error, RecordKind};
use crate::key::Key;
use crate::limits::Limits;
use crate::model::{Begin, CasOp, Completed, Lease, Snapshot, Stats, Versioned};
use crate::record::{Kind, Record};
use crate::shard::{Counters, Shard, eq_key, make_room};
use crate::sync::{Arc, AtomicU64, Mutex, MutexGuard, Ordering};
use crate::wait::Signal;
use crate::wal::format::{Op, RecordWriter};
use crate::wal::io::LogStorage;
use crate::wal::recovery::RecoveryReport;
use crate::wal::{Durability, LeaseSync, Wal};

/// A registered waiter: the key's hash and the signal its holder will fire.
pub(crate) type Waiter = (u64, Arc<Signal>);

/// What one round of `begin_wait` found.
pub(crate) enum Round {
    /// The answer.
    Done(Begin),
    /// Wait on `signal` for at most `slice`, then look again; on a timeout, forget the waiter.
    Wait {
        hash: u64,
        signal: Arc<Signal>,
        slice: Duration,
    },
}

/// Whether a `begin` that answered `outcome` waits for its settle under `sync`: with
/// [`LeaseSync::Deferred`], an acquired lease does not (the holder's completion or release
/// will cover it), nor does an in-flight answer (it reports nothing stored). A replay or a
/// mismatch reports a stored record, and waits as every other operation does.
#[inline]
pub(crate) fn begin_settles(outcome: &Begin, sync: LeaseSync) -> bool {
    sync == LeaseSync::Synced || !matches!(outcome, Begin::Acquired(_) | Begin::InProgress { .. })
}

/// The log sequence number a caller waits for before answering; 0 for none.
pub(crate) type Settle = std::cell::Cell<u64>;

/// A locked shard that, when unlocked, notes its last log sequence number in `settle`.
pub(crate) struct ShardGuard<'a> {
    guard: MutexGuard<'a, Shard>,
    settle: &'a Settle,
}

impl std::ops::Deref for ShardGuard<'_> {
    type Target = Shard;
    fn deref(&self) -> &Shard {
        &self.guard
    }
}

impl std::ops::DerefMut for ShardGuard<'_> {
    fn deref_mut(&mut self) -> &mut Shard {
        &mut self.guard
    }
}

impl Drop for ShardGuard<'_> {
    fn drop(&mut self) {
        self.settle
            .set(self.settle.get().max(self.guard.counters.last_seq));
    }
}

/// Keeps each shard lock on its own cache lines, so two cores locking neighbouring shards do
/// not fight over one line.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Padded<T>(pub(crate) T);

pub(crate) struct Inner {
    pub(super) shards: Box<[Padded<Mutex<Shard>>]>,
    pub(super) shard_mask: u64,
    pub(super) hasher: foldhash::fast::RandomState,
    pub(super) clock: std::sync::Arc<dyn Clock>,
    pub(super) max_key_len: usize,
    pub(super) max_value_len: usize,
    pub(super) max_records: u64,
    pub(super) max_bytes: u64,
    pub(super) max_batch: usize,
    pub(super) default_ttl_ms: u64,
    pub(super) pending_ttl_ms: u64,
    pub(super) lease_retention_ms: u64,
    /// Whether a record or byte limit is set, and so `used_*` are kept.
    pub(super) limited: bool,
    pub(super) used_records: AtomicU64,
    pub(super) used_bytes: AtomicU64,
    /// The write-ahead log, for a store opened on a directory with durability.
    pub(super) wal: Option<Wal>,
    /// The directory's lock, held while the store is open.
    pub(super) lock: Option<std::fs::File>,
    /// What recovery found, for a store opened on a directory.
    pub(super) recovery: Option<RecoveryReport>,
    /// The checkpoint database, for a store opened on a directory.
    pub(super) checkpoints: Option<Checkpoints>,
    pub(super) wal_dir: std::path::PathBuf,
    /// Where the log's files are written.
    pub(super) storage: std::sync::Arc<dyn LogStorage>,
    /// Checkpoint after this many bytes of log, or this long after the last checkpoint if
    /// anything was logged since.
    pub(super) checkpoint_every: u64,
    // Read by the maintenance thread, which loom models do not start.
    #[cfg_attr(loom, allow(dead_code))]
    pub(super) checkpoint_interval: Duration,
    /// One checkpoint at a time; holds what the last one left.
    pub(super) checkpointing: parking_lot::Mutex<super::maintenance::LastCheckpoint>,
    pub(super) checkpoints_written: AtomicU64,
    pub(super) stale_leases: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("shards", &self.shards.len())
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

pub(super) fn completed_of(rec: &Record) -> Completed {
    Completed {
        response: rec.value().to_vec(),
        fingerprint: rec.header().fingerprint,
        completed_at: Timestamp::from_millis(rec.header().a),
        expires_at: Timestamp::from_millis(rec.header().b),
    }
}

pub(super) fn snapshot_of(rec: &Record) -> Snapshot {
    let h = rec.header();
    match rec.kind() {
        Kind::InFlight | Kind::InFlightPending => Snapshot::InFlight {
            token: h.a,
            deadline: Timestamp::from_millis(h.b),
            fingerprint: h.fingerprint,
            pending: rec.kind() == Kind::InFlightPending,
        },
        Kind::Completed => Snapshot::Completed(completed_of(rec)),
        Kind::Pending => Snapshot::Pending {
            payload: rec.value().to_vec(),
            expires_at: Timestamp::from_millis(h.b),
        },
        Kind::Value => Snapshot::Value(Versioned {
            version: h.a,
            value: rec.value().to_vec(),
            expires_at: (h.b != u64::MAX).then_some(Timestamp::from_millis(h.b)),
        }),
    }
}

pub(super) fn kind_of(kind: Kind) -> RecordKind {
    match kind {
        Kind::InFlight | Kind::Completed => RecordKind::Idempotency,
        Kind::InFlightPending | Kind::Pending => RecordKind::Pending,
        Kind::Value => RecordKind::Value,
    }
}

/// The version a live record has for `cas`, or an error if it is not a value.
pub(super) fn cas_version(rec: Option<&Record>) -> Result<Option<u64>, Error> {
    match rec {
        None => Ok(None),
        Some(r) if r.kind() == Kind::Value => Ok(Some(r.header().a)),
        Some(r) => Err(Error::WrongKind {
            expected: RecordKind::Value,
            found: kind_of(r.kind()),
        }),
    }
}

/// Whether `op` may be applied over a record at `current` version.
pub(super) fn cas_holds(op: &CasOp, current: Option<u64>) -> bool {
    match op {
        CasOp::PutIfAbsent(_) => current.is_none(),
        CasOp::SetIfVersion { version, .. } | CasOp::DeleteIfVersion { version } => {
            current == Some(*version)
        }
    }
}

impl Inner {
    /// Whether the store logs its changes (opened on a directory with durability).
    #[inline]
    #[cfg_attr(any(loom, shuttle), allow(dead_code))]
    pub(super) fn has_log(&self) -> bool {
        self.wal.is_some()
    }

    #[inline]
    pub(super) fn now(&self) -> u64 {
        self.clock.now().as_millis()
    }
    /// Hashes scope and id with a length prefix, so `("ab","c")` and `("a","bc")` differ.
    #[inline]
    pub(crate) fn hash(&self, key: Key<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_u8(key.scope().len() as u8);
        h.write(key.scope());
        h.write(key.id());
        h.finish()
    }
    /// The slot of `key` (hashed `hash`) in a shard's `table`, occupied or vacant. A full table
    /// is made larger first (see [`make_room`]), so a vacant slot can be filled at once.
    #[inline]
    pub(super) fn entry<'t>(
        &self,
        table: &'t mut HashTable<Record>,
        hash: u64,
        key: Key<'_>,
    ) -> Entry<'t, Record> {
        let hash_of = |r: &Record| self.hash(r.key());
        make_room(table, hash_of);
        table.entry(hash, eq_key(key), hash_of)
    }
    /// The hash of a lease's key: cached by the store that granted it.
    #[inline]
    pub(super) fn lease_hash(&self, lease: &Lease) -> u64 {
        lease.hash.unwrap_or_else(|| self.hash(lease.key()))
    }
    /// The shard for a hash. The table inside a shard indexes buckets with the hash's *low*
    /// bits and keeps its top 7 bits as a tag in each control byte; the shard is picked from
    /// bits 40..56, which neither use (shards ≤ 2^16, shard tables < 2^40 buckets). Taking
    /// the top bits instead would leave every key in a shard with nearly the same tag, and
    /// the low bits would leave every shard's table a quarter full of collisions.
    #[inline]
    pub(super) fn shard_index(&self, hash: u64) -> usize {
        ((hash >> 40) & self.shard_mask) as usize
    }
    /// Locks the shard of `hash`. On unlock, the shard's last log sequence number is noted in
    /// `settle`: what the caller must wait for before answering (see `Inner::settle`).
    #[inline]
    pub(super) fn lock<'a>(&'a self, hash: u64, settle: &'a Settle) -> ShardGuard<'a> {
        self.lock_index(self.shard_index(hash), settle)
    }
    #[inline]
    pub(super) fn lock_index<'a>(&'a self, i: usize, settle: &'a Settle) -> ShardGuard<'a> {
        ShardGuard {
            guard: self.shards[i].0.lock(),
            settle,
        }
    }
    /// Appends a record of a change to the log (if the store has one), under the shard lock(s)
    /// of the keys it changes; `last` is the shard's `last_seq`. Refused, changing nothing,
    /// if the log is poisoned.
    #[inline]
    pub(super) fn log(
        &self,
        last: &mut u64,
        op: Op,
        lazy: bool,
        items: impl FnOnce(&mut RecordWriter<'_>),
    ) -> Result<(), Error> {
        if let Some(wal) = &self.wal {
            *last = wal.append_with(op, lazy, items)?;
        }
        Ok(())
    }
    /// Blocks until everything a caller saw or did is durable, if the caller's durability
    /// (`mode`, else the store's) is `Immediate`.
    #[inline]
    pub(crate) fn settle(&self, settle: &Settle, mode: Option<Durability>) -> Result<(), Error> {
        match &self.wal {
            Some(wal)
                if settle.get() > 0 && mode.unwrap_or(wal.mode()) == Durability::Immediate =>
            {
                wal.wait(settle.get())
            }
            _ => Ok(()),
        }
    }
    /// [`settle`](Self::settle) for async callers.
    #[inline]
    pub(crate) async fn settle_async(
        &self,
        seq: u64,
        mode: Option<Durability>,
    ) -> Result<(), Error> {
        match &self.wal {
            Some(wal) if seq > 0 && mode.unwrap_or(wal.mode()) == Durability::Immediate => {
                wal.wait_async(seq).await
            }
            _ => Ok(()),
        }
    }
    #[inline]
    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }
    #[inline]
    pub(super) fn limits(&self) -> Limits {
        Limits {
            max_key_len: self.max_key_len,
            max_value_len: self.max_value_len,
            max_batch: self.max_batch,
        }
    }
    #[inline]
    pub(super) fn check_key(&self, key: Key<'_>) -> Result<(), Error> {
        self.limits().check_key(key)
    }
    #[inline]
    pub(super) fn check_value(&self, value: &[u8]) -> Result<(), Error> {
        self.limits().check_value(value)
    }
    /// A new fencing token or version for a key whose hash is `hash`: the shard's counter in
    /// the high 48 bits, the shard's index in the low 16. So tokens are unique store-wide and
    /// increase for every key (a key never changes shard), with no shared atomic counter.
    #[inline]
    pub(super) fn next_seq(&self, c: &mut Counters, hash: u64) -> u64 {
        c.seq += 1;
        (c.seq << 16) | self.shard_index(hash) as u64
    }
    /// Makes room for `n` more records spread over the shards (recovery sizes the index
    /// once instead of growing it step by step).
    pub(crate) fn reserve_records(&self, n: u64) {
        let per_shard = usize::try_from(n / self.shards.len() as u64).unwrap_or(usize::MAX);
        if per_shard == 0 {
            return;
        }
        // Beyond ~16M records a shard the guess is more likely wrong than right.
        let per_shard = per_shard.min(1 << 24);
        for shard in self.shards.iter() {
            shard
                .0
                .lock()
                .table
                .reserve(per_shard, |r| self.hash(r.key()));
        }
    }

    /// Gives back table room that recovery reserved and did not use.
    pub(crate) fn shrink_tables(&self) {
        for shard in self.shards.iter() {
            let mut s = shard.0.lock();
            let len = s.table.len();
            s.table.shrink_to(len, |r| self.hash(r.key()));
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for shard in self.shards.iter() {
            let c = shard.0.lock().counters;
            s.acquired += c.acquired;
            s.replayed += c.replayed;
            s.in_progress += c.in_progress;
            s.mismatches += c.mismatches;
            s.takeovers += c.takeovers;
            s.expirations += c.expirations;
            s.completions += c.completions;
            s.in_flight += c.in_flight;
            s.releases += c.releases;
            s.records += c.records;
            s.bytes += c.bytes;
        }
        s.checkpoints = self.checkpoints_written.load(Ordering::Relaxed);
        s.stale_leases = self.stale_leases.load(Ordering::Relaxed);
        if let Some(wal) = &self.wal {
            s.log_bytes = wal.written();
            s.poisoned = wal.is_poisoned();
            s.log_segments =
                crate::wal::segments::list(&self.wal_dir).map_or(0, |l| l.len() as u64);
        }
        s
    }

    /// Counts a refusal for a lease no longer held (a rare path: one shared atomic).
    pub(crate) fn note<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        if let Err(Error::StaleLease { .. }) = &r {
            self.stale_leases.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}
