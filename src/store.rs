//! The embedded store: configuration, outcomes, and every operation.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use hashbrown::hash_table::Entry;

use crate::checkpoint::Checkpoints;
use crate::clock::{Clock, SystemClock, Timestamp, duration_to_millis_ceil};
use crate::error::{Error, RecordKind};
use crate::key::{Fingerprint, Key, MAX_ID_LEN, MAX_SCOPE_LEN, OwnedKey};
use crate::record::{Kind, NewRecord, Record};
use crate::shard::{Counters, Shard, eq_key, is_dead, reclaim_at};
use crate::sync::{Arc, AtomicU64, Mutex, MutexGuard, Ordering};
use crate::wait::Signal;
use crate::wal::format::Item;
use crate::wal::format::{Op, RecordWriter};
use crate::wal::io::{LogStorage, OsStorage};
use crate::wal::recovery::{LogError, OnCorruption, RecoveryReport};
use crate::wal::{Durability, Wal};

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another store (in this or another process) has the directory open.
    #[error(
        "{path} is in use by another idemkv store (its LOCK file is held); close that one first"
    )]
    Locked {
        /// The directory.
        path: std::path::PathBuf,
    },
    /// A file or directory could not be created, read or synced.
    #[error("I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The log could not be read back.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The checkpoint could not be read back.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] Error),
}

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

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A held lease on a key: proof that the caller, and nobody else, may complete it.
///
/// Its `token` is a fencing token: unique in the store, and larger than every token (and
/// version) handed out before for the same key. `complete`, `release` and `renew` check it, so a
/// holder whose lease expired and was taken over gets [`Error::StaleLease`] and can never
/// overwrite the new holder's work.
#[derive(Debug)]
pub struct Lease {
    key: OwnedKey,
    /// The key's hash in the store that granted the lease (saves rehashing on complete).
    hash: Option<u64>,
    token: u64,
    deadline: Timestamp,
    fingerprint: Fingerprint,
    takeover: bool,
}

impl Lease {
    /// A copy for the crate's own bookkeeping (the lease runner's release-on-drop); a lease is
    /// not `Clone` for users, so that one attempt holds one lease.
    #[allow(dead_code)]
    pub(crate) fn duplicate(&self) -> Lease {
        Lease {
            key: self.key.clone(),
            hash: self.hash,
            token: self.token,
            deadline: self.deadline,
            fingerprint: self.fingerprint,
            takeover: self.takeover,
        }
    }

    /// Builds a lease as a backend hands it out. Backends other than the embedded store use this.
    pub fn new(
        key: OwnedKey,
        token: u64,
        deadline: Timestamp,
        fingerprint: Fingerprint,
        takeover: bool,
    ) -> Self {
        Lease {
            key,
            hash: None,
            token,
            deadline,
            fingerprint,
            takeover,
        }
    }

    /// The key the lease holds.
    pub fn key(&self) -> Key<'_> {
        self.key.as_key()
    }

    /// The fencing token.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// When the lease expires unless renewed; after it, another caller may take the key over.
    pub fn deadline(&self) -> Timestamp {
        self.deadline
    }

    /// The fingerprint the key was begun with.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// True when this lease took over an expired one: an earlier attempt may have partly run.
    pub fn is_takeover(&self) -> bool {
        self.takeover
    }

    /// Records a new deadline after a successful renew (for backends).
    pub fn set_deadline(&mut self, deadline: Timestamp) {
        self.deadline = deadline;
    }
}

/// A completed record: the response to replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The stored response, exactly as given to `complete`.
    pub response: Vec<u8>,
    /// The fingerprint of the request that produced it.
    pub fingerprint: Fingerprint,
    /// When it was completed.
    pub completed_at: Timestamp,
    /// When it expires.
    pub expires_at: Timestamp,
}

/// What [`Store::begin`] found.
#[derive(Debug)]
#[must_use]
pub enum Begin {
    /// The caller holds the key: run the work, then `complete` or `release`.
    /// [`Lease::is_takeover`] says whether an expired earlier attempt was taken over.
    Acquired(Lease),
    /// Someone else holds a live lease until `deadline` (a caller can say `Retry-After`).
    InProgress {
        /// The holder's lease deadline.
        deadline: Timestamp,
    },
    /// Done before: replay this.
    Completed(Completed),
    /// The key was used with another fingerprint.
    Mismatch,
}

/// What [`Store::take_pending`] found.
#[derive(Debug)]
#[must_use]
pub enum Take {
    /// The caller holds the stored request: process `payload`, then `complete` or `release`.
    Acquired {
        /// The lease to complete with.
        lease: Lease,
        /// The stored request.
        payload: Vec<u8>,
    },
    /// Someone else is processing it until `deadline`.
    InProgress {
        /// The holder's lease deadline.
        deadline: Timestamp,
    },
    /// Processed before: this is the stored response.
    Completed(Completed),
    /// No request is stored under this key (never stored, deleted, or expired).
    NotFound,
}

/// What [`Store::put_pending`] did.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum PutPending {
    /// The payload is stored (replacing an earlier, not yet processed one).
    Stored,
    /// The request is being processed; the payload was not changed.
    InProgress {
        /// The holder's lease deadline.
        deadline: Timestamp,
    },
    /// The request was processed already; the payload was not changed.
    Completed,
}

/// A versioned value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// Its version: unique in the store, larger after every write of the key (also across a
    /// delete and re-create, so a stale version never matches again).
    pub version: u64,
    /// The bytes.
    pub value: Vec<u8>,
    /// When it expires, if ever.
    pub expires_at: Option<Timestamp>,
}

/// A copy of what a key holds, from [`Store::get`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Snapshot {
    /// Held by a lease (possibly expired and not yet taken over).
    InFlight {
        /// The lease's fencing token.
        token: u64,
        /// The lease deadline.
        deadline: Timestamp,
        /// The fingerprint it was begun with.
        fingerprint: Fingerprint,
        /// Whether it is a stored request being processed (`take_pending`).
        pending: bool,
    },
    /// Completed.
    Completed(Completed),
    /// A stored request not processed yet.
    Pending {
        /// The stored request.
        payload: Vec<u8>,
        /// When it expires.
        expires_at: Timestamp,
    },
    /// A versioned value.
    Value(Versioned),
}

/// A compare-and-set on a versioned value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOp {
    /// Write only if the key is absent.
    PutIfAbsent(Vec<u8>),
    /// Write only if the current version is `version`.
    SetIfVersion {
        /// The expected current version.
        version: u64,
        /// The new bytes.
        value: Vec<u8>,
    },
    /// Delete only if the current version is `version`.
    DeleteIfVersion {
        /// The expected current version.
        version: u64,
    },
}

/// One versioned write: on its own with [`Store::cas`], or in a completion batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The key written.
    pub key: OwnedKey,
    /// The condition and the change.
    pub op: CasOp,
    /// Expiry of the written value; `None` keeps it until deleted.
    pub ttl: Option<Duration>,
}

impl Write {
    /// Write `value` if `key` is absent.
    pub fn put_if_absent(key: OwnedKey, value: impl Into<Vec<u8>>) -> Self {
        Write {
            key,
            op: CasOp::PutIfAbsent(value.into()),
            ttl: None,
        }
    }

    /// Write `value` if `key`'s version is `version`.
    pub fn set_if_version(key: OwnedKey, version: u64, value: impl Into<Vec<u8>>) -> Self {
        Write {
            key,
            op: CasOp::SetIfVersion {
                version,
                value: value.into(),
            },
            ttl: None,
        }
    }

    /// Delete `key` if its version is `version`.
    pub fn delete_if_version(key: OwnedKey, version: u64) -> Self {
        Write {
            key,
            op: CasOp::DeleteIfVersion { version },
            ttl: None,
        }
    }

    /// Sets an expiry on the written value.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// What a compare-and-set did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum CasOutcome {
    /// Written; `version` is the new version (`None` after a delete).
    Applied {
        /// The key's version now.
        version: Option<u64>,
    },
    /// The condition did not hold; nothing was written.
    Conflict {
        /// The key's current version, `None` if absent.
        current: Option<u64>,
    },
}

/// What a checkpoint wrote, from [`Store::checkpoint`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointStats {
    /// Live records written.
    pub records: u64,
    /// Every log record up to this sequence number is reflected.
    pub covers_seq: u64,
    /// Log segments deleted.
    pub segments_deleted: usize,
}

/// Counters and sizes of a store, from [`Store::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Leases granted (including takeovers).
    pub acquired: u64,
    /// Begins answered with a stored response.
    pub replayed: u64,
    /// Begins answered "in progress".
    pub in_progress: u64,
    /// Begins answered "mismatch".
    pub mismatches: u64,
    /// Leases granted over an expired lease.
    pub takeovers: u64,
    /// Records dropped because they expired.
    pub expirations: u64,
    /// Records stored now.
    pub records: u64,
    /// Bytes accounted now (each record's header, key and value).
    pub bytes: u64,
    /// Checkpoints written since the store was opened.
    pub checkpoints: u64,
}

/// Configures and builds a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreBuilder {
    shards: usize,
    max_key_len: usize,
    max_value_len: usize,
    max_records: u64,
    max_bytes: u64,
    max_batch: usize,
    default_ttl: Duration,
    pending_ttl: Duration,
    lease_retention: Duration,
    sweep_interval: Option<Duration>,
    clock: Option<std::sync::Arc<dyn Clock>>,
    durability: Durability,
    on_corruption: OnCorruption,
    segment_size: u64,
    storage: std::sync::Arc<dyn LogStorage>,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
}

impl Default for StoreBuilder {
    fn default() -> Self {
        StoreBuilder {
            shards: 64,
            max_key_len: 255,
            max_value_len: 1 << 20,
            max_records: u64::MAX,
            max_bytes: u64::MAX,
            max_batch: 64,
            default_ttl: DAY,
            pending_ttl: DAY,
            lease_retention: DAY,
            sweep_interval: Some(Duration::from_secs(1)),
            clock: None,
            durability: Durability::Immediate,
            on_corruption: OnCorruption::Fail,
            segment_size: crate::wal::SEGMENT_SIZE,
            storage: std::sync::Arc::new(OsStorage),
            checkpoint_every: crate::wal::SEGMENT_SIZE,
            checkpoint_interval: Duration::from_secs(300),
        }
    }
}

impl StoreBuilder {
    /// Number of shards, a power of two (default 64).
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }
    /// Longest key id accepted, in bytes (default 255, as Stripe; at most 65,535).
    pub fn max_key_len(mut self, n: usize) -> Self {
        self.max_key_len = n;
        self
    }
    /// Largest response, payload or value accepted, in bytes (default 1 MiB).
    pub fn max_value_len(mut self, n: usize) -> Self {
        self.max_value_len = n;
        self
    }
    /// Most records held at once (default unlimited: the byte limit bounds them).
    pub fn max_records(mut self, n: u64) -> Self {
        self.max_records = n;
        self
    }
    /// Most bytes held at once, counting each record's 40-byte header, key and value
    /// (default unlimited, like Redis' `maxmemory 0`). Setting either limit adds two atomic
    /// operations to each write that grows or shrinks the store.
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }
    /// Most versioned writes in one completion batch (default 64).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }
    /// How long completed records live unless `complete` says otherwise (default 24 h).
    pub fn default_ttl(mut self, d: Duration) -> Self {
        self.default_ttl = d;
        self
    }
    /// How long stored requests wait to be processed unless `put_pending` says otherwise
    /// (default 24 h).
    pub fn pending_ttl(mut self, d: Duration) -> Self {
        self.pending_ttl = d;
        self
    }
    /// How long an expired, never-completed lease is kept so that a retry learns it takes
    /// over an abandoned attempt (default 24 h). After that the sweeper drops it.
    pub fn lease_retention(mut self, d: Duration) -> Self {
        self.lease_retention = d;
        self
    }
    /// How often the background sweeper reclaims expired records (default every second);
    /// `None` runs no sweeper (call [`Store::sweep_expired`] yourself).
    pub fn sweep_interval(mut self, d: Option<Duration>) -> Self {
        self.sweep_interval = d;
        self
    }
    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(std::sync::Arc::new(clock));
        self
    }

    /// How changes reach the disk for a store [`open`](Self::open)ed on a directory
    /// (default `Immediate`). `Durability::None` opens nothing: memory only.
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Size of each preallocated log segment (default 64 MiB).
    pub fn log_segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes;
        self
    }

    /// Write a checkpoint (in the background sweeper's thread) each time this many bytes
    /// of log have been written since the last one (default 64 MiB, one segment).
    pub fn checkpoint_every(mut self, log_bytes: u64) -> Self {
        self.checkpoint_every = log_bytes.max(1);
        self
    }

    /// Also write a checkpoint when this long has passed since the last one and anything was
    /// logged meanwhile (default 5 minutes), so a restart never replays more than that.
    pub fn checkpoint_interval(mut self, d: Duration) -> Self {
        self.checkpoint_interval = d;
        self
    }

    /// Where the log's files are written (default: [`OsStorage`], the operating system's
    /// files). Crash tests pass a storage that fails or loses unsynced writes at a chosen call;
    /// see [`LogStorage`].
    pub fn log_storage(mut self, storage: impl LogStorage) -> Self {
        self.storage = std::sync::Arc::new(storage);
        self
    }

    /// What recovery does with damage in the middle of the log (default: refuse to open).
    pub fn on_corruption(mut self, o: OnCorruption) -> Self {
        self.on_corruption = o;
        self
    }

    /// Builds an in-memory store.
    pub fn build(self) -> Result<Store, Error> {
        let inner = self.make_inner()?;
        Ok(self.finish(inner))
    }

    /// Opens (or creates) a durable store in `dir`: takes the directory's lock, replays the
    /// log, and logs every change from then on with the configured [`Durability`].
    ///
    /// ```
    /// use idemkv::{Begin, Fingerprint, Key, Store};
    /// use std::time::Duration;
    ///
    /// let dir = std::env::temp_dir().join(format!("idemkv-doc-{}", std::process::id()));
    /// let key = Key::new("t", "order-1");
    /// let fp = Fingerprint::of(b"body");
    /// {
    ///     let store = Store::builder().open(&dir)?;
    ///     let Begin::Acquired(lease) = store.begin(key, fp, Duration::from_secs(30))? else { panic!() };
    ///     store.complete(&lease, b"created", None)?; // durable when this returns
    /// }
    /// let store = Store::builder().open(&dir)?; // after a restart (or a crash)
    /// assert!(matches!(store.begin(key, fp, Duration::from_secs(30))?, Begin::Completed(c) if c.response == b"created"));
    /// # drop(store); std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(self, dir: impl AsRef<std::path::Path>) -> Result<Store, OpenError> {
        let dir = dir.as_ref();
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| OpenError::Io { path, source }
        };
        let mut inner = self.make_inner()?;
        if self.durability == Durability::None {
            return Ok(self.finish(inner));
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(OpenError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir).map_err(io(&wal_dir))?;
        // 1. The last checkpoint, 2. the log written since.
        let checkpoints = Checkpoints::open(dir.join("checkpoint.redb"))?;
        let mut max_token = 0u64;
        let loaded = checkpoints.load(|item| {
            max_token = max_token.max(inner.apply(item));
        })?;
        max_token = max_token.max(loaded.token_high);
        let mut report = crate::wal::recovery::replay(
            &wal_dir,
            loaded.seq,
            self.on_corruption,
            self.storage.as_ref(),
            |rec| {
                for item in &rec.items {
                    max_token = max_token.max(inner.apply(item));
                }
            },
        )?;
        report.checkpoint_seq = loaded.seq;
        report.checkpoint_records = loaded.records;
        for shard in inner.shards.iter() {
            let mut s = shard.0.lock();
            s.counters.seq = s.counters.seq.max(max_token);
        }
        inner.wal = Some(
            Wal::start(
                &wal_dir,
                report.last_seq + 1,
                self.durability,
                self.segment_size,
                std::sync::Arc::clone(&self.storage),
            )
            .map_err(io(&wal_dir))?,
        );
        inner.lock = Some(lock);
        inner.recovery = Some(report);
        inner.checkpoints = Some(checkpoints);
        inner.wal_dir = wal_dir;
        inner.checkpoint_every = self.checkpoint_every;
        Ok(self.finish(inner))
    }

    fn make_inner(&self) -> Result<Inner, Error> {
        let bad = |reason: String| Err(Error::InvalidConfig { reason });
        if !self.shards.is_power_of_two() || self.shards > 1 << 16 {
            return bad(format!(
                "shards must be a power of two up to 65536, not {}",
                self.shards
            ));
        }
        if self.max_key_len == 0 || self.max_key_len > MAX_ID_LEN {
            return bad(format!(
                "max_key_len must be 1..={MAX_ID_LEN}, not {}",
                self.max_key_len
            ));
        }
        // A record is header + scope + id + value in one allocation; it must fit the value
        // length field and a `Layout` (below `isize::MAX`, which matters on 32-bit targets).
        let largest = crate::record::HEADER_SIZE + MAX_SCOPE_LEN + MAX_ID_LEN;
        if u32::try_from(self.max_value_len).is_err()
            || self.max_value_len > isize::MAX as usize - largest
        {
            return bad(format!(
                "max_value_len must fit in 32 bits and the address space, not {}",
                self.max_value_len
            ));
        }
        for (what, d) in [
            ("default_ttl", self.default_ttl),
            ("pending_ttl", self.pending_ttl),
            ("lease_retention", self.lease_retention),
        ] {
            if d.is_zero() {
                return bad(format!("{what} must be longer than zero"));
            }
        }
        let shards = (0..self.shards)
            .map(|_| Padded(Mutex::new(Shard::new())))
            .collect();
        Ok(Inner {
            shards,
            shard_mask: (self.shards - 1) as u64,
            hasher: foldhash::fast::RandomState::default(),
            clock: self
                .clock
                .clone()
                .unwrap_or_else(|| std::sync::Arc::new(SystemClock)),
            max_key_len: self.max_key_len,
            max_value_len: self.max_value_len,
            max_records: self.max_records,
            max_bytes: self.max_bytes,
            max_batch: self.max_batch,
            default_ttl_ms: duration_to_millis_ceil(self.default_ttl),
            pending_ttl_ms: duration_to_millis_ceil(self.pending_ttl),
            lease_retention_ms: duration_to_millis_ceil(self.lease_retention),
            limited: self.max_records != u64::MAX || self.max_bytes != u64::MAX,
            used_records: AtomicU64::new(0),
            used_bytes: AtomicU64::new(0),
            wal: None,
            lock: None,
            recovery: None,
            checkpoints: None,
            wal_dir: std::path::PathBuf::new(),
            storage: std::sync::Arc::clone(&self.storage),
            checkpoint_every: u64::MAX,
            checkpoint_interval: self.checkpoint_interval,
            checkpointing: parking_lot::Mutex::new((0, Instant::now())),
            checkpoints_written: AtomicU64::new(0),
        })
    }

    fn finish(&self, inner: Inner) -> Store {
        let inner = Arc::new(inner);
        let sweeper = match self.sweep_interval {
            Some(every) if !every.is_zero() => crate::sweeper::start(&inner, every),
            _ => None,
        };
        Store {
            inner,
            durability: None,
            _sweeper: sweeper.map(std::sync::Arc::new),
        }
    }
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
struct Padded<T>(T);

/// The embedded idempotency store. Cheap to clone (clones share the same store).
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
/// let Begin::Acquired(lease) = store.begin(key, fp, Duration::from_secs(30))? else { panic!() };
/// store.complete(&lease, b"201 order o-1", None)?;
///
/// // A retry replays it.
/// match store.begin(key, fp, Duration::from_secs(30))? {
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
    /// Stops and joins the sweeper when the last clone is dropped.
    _sweeper: Option<std::sync::Arc<crate::sweeper::Handle>>,
}

pub(crate) struct Inner {
    shards: Box<[Padded<Mutex<Shard>>]>,
    shard_mask: u64,
    hasher: foldhash::fast::RandomState,
    clock: std::sync::Arc<dyn Clock>,
    max_key_len: usize,
    max_value_len: usize,
    max_records: u64,
    max_bytes: u64,
    max_batch: usize,
    default_ttl_ms: u64,
    pending_ttl_ms: u64,
    lease_retention_ms: u64,
    /// Whether a record or byte limit is set, and so `used_*` are kept.
    limited: bool,
    used_records: AtomicU64,
    used_bytes: AtomicU64,
    /// The write-ahead log, for a store opened on a directory with durability.
    wal: Option<Wal>,
    /// The directory's lock, held while the store is open.
    lock: Option<std::fs::File>,
    /// What recovery found, for a store opened on a directory.
    recovery: Option<RecoveryReport>,
    /// The checkpoint database, for a store opened on a directory.
    checkpoints: Option<Checkpoints>,
    wal_dir: std::path::PathBuf,
    /// Where the log's files are written.
    storage: std::sync::Arc<dyn LogStorage>,
    /// Checkpoint after this many bytes of log, or this long after the last checkpoint if
    /// anything was logged since.
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    /// One checkpoint at a time; holds the log size and the time at the last one.
    checkpointing: parking_lot::Mutex<(u64, Instant)>,
    checkpoints_written: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("shards", &self.shards.len())
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// The size limits every backend checks the same way, before touching anything.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_key_len: usize,
    pub max_value_len: usize,
    pub max_batch: usize,
}

impl Limits {
    pub(crate) fn check_key(&self, key: Key<'_>) -> Result<(), Error> {
        if key.scope().len() > MAX_SCOPE_LEN {
            return Err(Error::ScopeTooLong {
                len: key.scope().len(),
                max: MAX_SCOPE_LEN,
            });
        }
        if key.id().is_empty() {
            return Err(Error::EmptyKey);
        }
        if key.id().len() > self.max_key_len {
            return Err(Error::KeyTooLong {
                len: key.id().len(),
                max: self.max_key_len,
            });
        }
        Ok(())
    }

    pub(crate) fn check_value(&self, value: &[u8]) -> Result<(), Error> {
        if value.len() > self.max_value_len {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max: self.max_value_len,
            });
        }
        Ok(())
    }

    /// A completion batch: its size, every key and value, positive TTLs, no write on the
    /// lease's own key, no key twice.
    pub(crate) fn check_batch(&self, lease_key: Key<'_>, writes: &[Write]) -> Result<(), Error> {
        if writes.len() > self.max_batch {
            return Err(Error::InvalidBatch {
                reason: "more writes than max_batch",
            });
        }
        for (i, w) in writes.iter().enumerate() {
            self.check_key(w.key.as_key())?;
            if let Some(v) = cas_value(&w.op) {
                self.check_value(v)?;
            }
            if let Some(d) = w.ttl {
                nonzero(d, "a write's ttl")?;
            }
            if w.key.as_key() == lease_key {
                return Err(Error::InvalidBatch {
                    reason: "a write targets the lease's own key",
                });
            }
            if writes[..i].iter().any(|o| o.key == w.key) {
                return Err(Error::InvalidBatch {
                    reason: "two writes target the same key",
                });
            }
        }
        Ok(())
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    duration_to_millis_ceil(d)
}

pub(crate) fn nonzero(d: Duration, what: &'static str) -> Result<u64, Error> {
    if d.is_zero() {
        Err(Error::ZeroDuration { what })
    } else {
        Ok(ms(d))
    }
}

fn completed_of(rec: &Record) -> Completed {
    Completed {
        response: rec.value().to_vec(),
        fingerprint: rec.header().fingerprint,
        completed_at: Timestamp::from_millis(rec.header().a),
        expires_at: Timestamp::from_millis(rec.header().b),
    }
}

fn snapshot_of(rec: &Record) -> Snapshot {
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

fn kind_of(kind: Kind) -> RecordKind {
    match kind {
        Kind::InFlight | Kind::Completed => RecordKind::Idempotency,
        Kind::InFlightPending | Kind::Pending => RecordKind::Pending,
        Kind::Value => RecordKind::Value,
    }
}

/// The version a live record has for `cas`, or an error if it is not a value.
fn cas_version(rec: Option<&Record>) -> Result<Option<u64>, Error> {
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
fn cas_holds(op: &CasOp, current: Option<u64>) -> bool {
    match op {
        CasOp::PutIfAbsent(_) => current.is_none(),
        CasOp::SetIfVersion { version, .. } | CasOp::DeleteIfVersion { version } => {
            current == Some(*version)
        }
    }
}

pub(crate) fn cas_value(op: &CasOp) -> Option<&[u8]> {
    match op {
        CasOp::PutIfAbsent(v) | CasOp::SetIfVersion { value: v, .. } => Some(v),
        CasOp::DeleteIfVersion { .. } => None,
    }
}

impl Inner {
    fn now(&self) -> u64 {
        self.clock.now().as_millis()
    }

    /// Hashes scope and id with a length prefix, so `("ab","c")` and `("a","bc")` differ.
    pub(crate) fn hash(&self, key: Key<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_u8(key.scope().len() as u8);
        h.write(key.scope());
        h.write(key.id());
        h.finish()
    }

    /// The hash of a lease's key: cached by the store that granted it.
    fn lease_hash(&self, lease: &Lease) -> u64 {
        lease.hash.unwrap_or_else(|| self.hash(lease.key()))
    }

    /// The shard for a hash. The table inside a shard indexes buckets with the hash's *low*
    /// bits and keeps its top 7 bits as a tag in each control byte; the shard is picked from
    /// bits 40..56, which neither use (shards ≤ 2^16, shard tables < 2^40 buckets). Taking
    /// the top bits instead would leave every key in a shard with nearly the same tag, and
    /// the low bits would leave every shard's table a quarter full of collisions.
    fn shard_index(&self, hash: u64) -> usize {
        ((hash >> 40) & self.shard_mask) as usize
    }

    /// Locks the shard of `hash`. On unlock, the shard's last log sequence number is noted in
    /// `settle`: what the caller must wait for before answering (see `Inner::settle`).
    fn lock<'a>(&'a self, hash: u64, settle: &'a Settle) -> ShardGuard<'a> {
        self.lock_index(self.shard_index(hash), settle)
    }

    fn lock_index<'a>(&'a self, i: usize, settle: &'a Settle) -> ShardGuard<'a> {
        ShardGuard {
            guard: self.shards[i].0.lock(),
            settle,
        }
    }

    /// Appends a record of a change to the log (if the store has one), under the shard lock(s)
    /// of the keys it changes; `last` is the shard's `last_seq`. Refused, changing nothing,
    /// if the log is poisoned.
    fn log(
        &self,
        last: &mut u64,
        op: Op,
        items: impl FnOnce(&mut RecordWriter<'_>),
    ) -> Result<(), Error> {
        if let Some(wal) = &self.wal {
            *last = wal.append(op, items)?;
        }
        Ok(())
    }

    /// Blocks until everything a caller saw or did is durable, if the caller's durability
    /// (`mode`, else the store's) is `Immediate`.
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

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn limits(&self) -> Limits {
        Limits {
            max_key_len: self.max_key_len,
            max_value_len: self.max_value_len,
            max_batch: self.max_batch,
        }
    }

    fn check_key(&self, key: Key<'_>) -> Result<(), Error> {
        self.limits().check_key(key)
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Error> {
        self.limits().check_value(value)
    }

    /// Admits `records` more records and `bytes` more bytes to the store-wide totals, or
    /// fails leaving them as they were. The totals are kept (in atomics) only when a limit is
    /// configured: without one, accounting costs no atomic operation.
    fn admit(&self, records: u64, bytes: u64) -> Result<(), Error> {
        if !self.limited {
            return Ok(());
        }
        if records > 0 {
            let before = self.used_records.fetch_add(records, Ordering::Relaxed);
            if before.saturating_add(records) > self.max_records {
                self.used_records.fetch_sub(records, Ordering::Relaxed);
                return Err(Error::RecordLimit {
                    max: self.max_records,
                });
            }
        }
        if bytes > 0 {
            let before = self.used_bytes.fetch_add(bytes, Ordering::Relaxed);
            if before.saturating_add(bytes) > self.max_bytes {
                self.used_bytes.fetch_sub(bytes, Ordering::Relaxed);
                self.used_records.fetch_sub(records, Ordering::Relaxed);
                return Err(Error::ByteLimit {
                    needed: bytes,
                    max: self.max_bytes,
                });
            }
        }
        Ok(())
    }

    /// Returns records and bytes to the store-wide totals.
    fn give_back(&self, records: u64, bytes: u64) {
        if self.limited {
            self.used_records.fetch_sub(records, Ordering::Relaxed);
            self.used_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Accounts a growth to a shard (and the store), or fails changing nothing.
    fn reserve(&self, c: &mut Counters, records: u64, bytes: u64) -> Result<(), Error> {
        self.admit(records, bytes)?;
        c.records += records;
        c.bytes += bytes;
        Ok(())
    }

    /// Accounts a shrink to a shard (and the store).
    fn unreserve(&self, c: &mut Counters, records: u64, bytes: u64) {
        self.give_back(records, bytes);
        c.records -= records;
        c.bytes -= bytes;
    }

    /// Accounts for a record changing size from `old` to `new` bytes.
    fn resize(&self, c: &mut Counters, old: usize, new: usize) -> Result<(), Error> {
        if new > old {
            self.reserve(c, 0, (new - old) as u64)
        } else {
            self.unreserve(c, 0, (old - new) as u64);
            Ok(())
        }
    }

    /// A new fencing token or version for a key whose hash is `hash`: the shard's counter in
    /// the high 48 bits, the shard's index in the low 16. So tokens are unique store-wide and
    /// increase for every key (a key never changes shard), with no shared atomic counter.
    fn next_seq(&self, c: &mut Counters, hash: u64) -> u64 {
        c.seq += 1;
        (c.seq << 16) | self.shard_index(hash) as u64
    }

    /// Turns `rec` (same key) into a fresh record, reusing its slot: reserves, logs, applies.
    #[expect(
        clippy::too_many_arguments,
        reason = "the header fields, spelled out at each call"
    )]
    fn overwrite(
        &self,
        c: &mut Counters,
        op: Op,
        rec: &mut Record,
        kind: Kind,
        a: u64,
        b: u64,
        fingerprint: Fingerprint,
        value: &[u8],
    ) -> Result<(), Error> {
        let (old, new) = (rec.size(), rec.size() - rec.value().len() + value.len());
        self.resize(c, old, new)?;
        let logged = self.log(&mut c.last_seq, op, |w| {
            w.put_parts(rec.key(), kind, a, b, fingerprint, value)
        });
        if let Err(e) = logged {
            let _ = self.resize(c, new, old);
            return Err(e);
        }
        rec.set_value(value);
        rec.set_kind(kind);
        let h = rec.header_mut();
        h.a = a;
        h.b = b;
        h.fingerprint = fingerprint;
        Ok(())
    }

    /// Changes a record's kind and `a`/`b` fields (a takeover, a renew, a release): logs, applies.
    fn restamp(
        &self,
        c: &mut Counters,
        op: Op,
        rec: &mut Record,
        kind: Kind,
        a: u64,
        b: u64,
    ) -> Result<(), Error> {
        let fp = rec.header().fingerprint;
        self.log(&mut c.last_seq, op, |w| {
            w.put_parts(rec.key(), kind, a, b, fp, rec.value())
        })?;
        rec.set_kind(kind);
        let h = rec.header_mut();
        h.a = a;
        h.b = b;
        Ok(())
    }

    /// Inserts a new record into a vacant slot: reserves, logs, applies.
    fn insert(
        &self,
        c: &mut Counters,
        op: Op,
        slot: hashbrown::hash_table::VacantEntry<'_, Record>,
        parts: NewRecord<'_>,
    ) -> Result<(), Error> {
        let size = Record::size_for(parts.key, parts.value.len()) as u64;
        self.reserve(c, 1, size)?;
        let logged = self.log(&mut c.last_seq, op, |w| {
            w.put_parts(
                parts.key,
                parts.kind,
                parts.a,
                parts.b,
                parts.fingerprint,
                parts.value,
            )
        });
        if let Err(e) = logged {
            self.unreserve(c, 1, size);
            return Err(e);
        }
        slot.insert(Record::new(parts));
        Ok(())
    }

    /// Removes the record at `entry`: logs, applies.
    fn delete(
        &self,
        c: &mut Counters,
        op: Op,
        entry: hashbrown::hash_table::OccupiedEntry<'_, Record>,
    ) -> Result<(), Error> {
        self.log(&mut c.last_seq, op, |w| w.delete(entry.get().key()))?;
        let (rec, _) = entry.remove();
        self.unreserve(c, 1, rec.size() as u64);
        Ok(())
    }

    /// Drops an expired record found at a key. If the log refuses, the record stays (it is
    /// invisible anyway) and the caller's own change will be refused with the same error.
    fn expire(&self, c: &mut Counters, entry: hashbrown::hash_table::OccupiedEntry<'_, Record>) {
        if self.delete(c, Op::Expire, entry).is_ok() {
            c.expirations += 1;
        }
    }

    pub(crate) fn begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        wait: bool,
        settle: &Settle,
    ) -> Result<(Begin, Option<Waiter>), Error> {
        self.check_key(key)?;
        let lease_ms = nonzero(lease, "the lease duration")?;
        let hash = self.hash(key);
        let now = self.now();
        let deadline = now.saturating_add(lease_ms);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let hasher = |r: &Record| self.hash(r.key());
        let acquired = |token, takeover| {
            Begin::Acquired(Lease {
                key: key.to_owned(),
                hash: Some(hash),
                token,
                deadline: Timestamp::from_millis(deadline),
                fingerprint,
                takeover,
            })
        };
        let fresh = |token| NewRecord {
            kind: Kind::InFlight,
            a: token,
            b: deadline,
            fingerprint,
            key,
            value: &[],
        };
        let outcome = match shard.table.entry(hash, eq_key(key), hasher) {
            Entry::Vacant(slot) => {
                let c = &mut shard.counters;
                let token = self.next_seq(c, hash);
                self.insert(c, Op::Begin, slot, fresh(token))?;
                c.acquired += 1;
                acquired(token, false)
            }
            Entry::Occupied(mut slot) => {
                let rec = slot.get_mut();
                if is_dead(rec, now) {
                    let c = &mut shard.counters;
                    let token = self.next_seq(c, hash);
                    self.overwrite(
                        c,
                        Op::Begin,
                        rec,
                        Kind::InFlight,
                        token,
                        deadline,
                        fingerprint,
                        &[],
                    )?;
                    shard.counters.expirations += 1;
                    shard.counters.acquired += 1;
                    acquired(token, false)
                } else {
                    match rec.kind() {
                        Kind::Completed if rec.header().fingerprint != fingerprint => {
                            shard.counters.mismatches += 1;
                            Begin::Mismatch
                        }
                        Kind::Completed => {
                            shard.counters.replayed += 1;
                            Begin::Completed(completed_of(rec))
                        }
                        Kind::InFlight if rec.header().fingerprint != fingerprint => {
                            shard.counters.mismatches += 1;
                            Begin::Mismatch
                        }
                        Kind::InFlight if rec.header().b > now => {
                            shard.counters.in_progress += 1;
                            let deadline = rec.header().b;
                            if wait {
                                let signal = shard.add_waiter(hash);
                                return Ok((
                                    Begin::InProgress {
                                        deadline: Timestamp::from_millis(deadline),
                                    },
                                    Some((hash, signal)),
                                ));
                            }
                            Begin::InProgress {
                                deadline: Timestamp::from_millis(deadline),
                            }
                        }
                        Kind::InFlight => {
                            let c = &mut shard.counters;
                            let token = self.next_seq(c, hash);
                            self.restamp(c, Op::Begin, rec, Kind::InFlight, token, deadline)?;
                            shard.counters.acquired += 1;
                            shard.counters.takeovers += 1;
                            acquired(token, true)
                        }
                        other => {
                            return Err(Error::WrongKind {
                                expected: RecordKind::Idempotency,
                                found: kind_of(other),
                            });
                        }
                    }
                }
            }
        };
        if let Begin::Acquired(_) = outcome {
            shard.note_reclaim_at(deadline.saturating_add(self.lease_retention_ms));
        }
        Ok((outcome, None))
    }

    /// One round of `begin_wait`: answers as `begin` would, unless the key is in flight and
    /// time is left before `until`; then a waiter is registered (under the shard lock that saw
    /// the key in flight) and the caller waits on it for at most the returned slice: what is
    /// left of its budget, and no later than the holder's lease deadline, when the key can be
    /// taken over. Then the caller looks again.
    pub(crate) fn begin_round(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        until: Instant,
        settle: &Settle,
    ) -> Result<Round, Error> {
        let left = until.saturating_duration_since(Instant::now());
        let (outcome, waiter) = self.begin(key, fingerprint, lease, !left.is_zero(), settle)?;
        let (Begin::InProgress { deadline }, Some((hash, signal))) = (&outcome, waiter) else {
            return Ok(Round::Done(outcome));
        };
        let lease_left = deadline.as_millis().saturating_sub(self.now()).max(1);
        let slice = left.min(Duration::from_millis(lease_left));
        Ok(Round::Wait {
            hash,
            signal,
            slice,
        })
    }

    /// Removes a waiter that timed out (a fired one was removed by whoever fired it).
    pub(crate) fn forget_waiter(&self, hash: u64, signal: &Arc<Signal>) {
        self.lock(hash, &Settle::default()).remove_waiter(signal);
    }

    pub(crate) fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
        writes: &[Write],
        settle: &Settle,
    ) -> Result<Timestamp, Error> {
        self.check_value(response)?;
        let ttl_ms = match ttl {
            Some(d) => nonzero(d, "the ttl")?,
            None => self.default_ttl_ms,
        };
        if !writes.is_empty() {
            return self.complete_batch(lease, response, ttl_ms, writes, settle);
        }
        let key = lease.key();
        let hash = self.lease_hash(lease);
        let now = self.now();
        let expires = now.saturating_add(ttl_ms);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let Some(rec) = shard.table.find_mut(hash, eq_key(key)) else {
            return Err(Error::StaleLease { token: lease.token });
        };
        Self::check_holder(rec, lease)?;
        let fp = rec.header().fingerprint;
        self.overwrite(
            &mut shard.counters,
            Op::Complete,
            rec,
            Kind::Completed,
            now,
            expires,
            fp,
            response,
        )?;
        shard.note_reclaim_at(expires);
        shard.wake(hash);
        Ok(Timestamp::from_millis(expires))
    }

    fn check_holder(rec: &Record, lease: &Lease) -> Result<(), Error> {
        match rec.kind() {
            Kind::InFlight | Kind::InFlightPending if rec.header().a == lease.token => Ok(()),
            _ => Err(Error::StaleLease { token: lease.token }),
        }
    }

    fn check_batch(&self, lease: &Lease, writes: &[Write]) -> Result<(), Error> {
        self.limits().check_batch(lease.key(), writes)
    }

    /// Completion plus versioned writes on other keys, all or nothing: every shard involved is
    /// locked (in index order, so two batches cannot deadlock), every condition and limit is
    /// checked, and only then is anything changed.
    fn complete_batch(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl_ms: u64,
        writes: &[Write],
        settle: &Settle,
    ) -> Result<Timestamp, Error> {
        self.check_batch(lease, writes)?;
        let now = self.now();
        let expires = now.saturating_add(ttl_ms);
        let lease_hash = self.lease_hash(lease);
        let hashes: Vec<u64> = writes.iter().map(|w| self.hash(w.key.as_key())).collect();
        let mut order: Vec<usize> = std::iter::once(lease_hash)
            .chain(hashes.iter().copied())
            .map(|h| self.shard_index(h))
            .collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<ShardGuard<'_>> =
            order.iter().map(|&i| self.lock_index(i, settle)).collect();
        let pos = |hash: u64| -> usize {
            let idx = self.shard_index(hash);
            order.partition_point(|&i| i < idx)
        };

        // 1. Check: the lease, every condition, the limits. Nothing changes yet.
        let lease_shard = &guards[pos(lease_hash)];
        let Some(rec) = lease_shard.table.find(lease_hash, eq_key(lease.key())) else {
            return Err(Error::StaleLease { token: lease.token });
        };
        Self::check_holder(rec, lease)?;
        let mut records_delta: i64 = 0;
        let mut bytes_delta: i64 = (response.len() as i64) - (rec.value().len() as i64);
        let mut dead = 0u64;
        for (i, (w, &h)) in writes.iter().zip(&hashes).enumerate() {
            let found = guards[pos(h)].table.find(h, eq_key(w.key.as_key()));
            let live = found.filter(|r| !is_dead(r, now));
            let current = cas_version(live)?;
            if !cas_holds(&w.op, current) {
                return Err(Error::BatchConflict { index: i, current });
            }
            let old = found.map_or(0, |r| r.size() as i64);
            dead += u64::from(found.is_some() && live.is_none());
            let new =
                cas_value(&w.op).map_or(0, |v| Record::size_for(w.key.as_key(), v.len()) as i64);
            records_delta += i64::from(new > 0) - i64::from(old > 0);
            bytes_delta += new - old;
        }
        let (grow_r, grow_b) = (records_delta.max(0) as u64, bytes_delta.max(0) as u64);
        let (shrink_r, shrink_b) = ((-records_delta).max(0) as u64, (-bytes_delta).max(0) as u64);
        self.admit(grow_r, grow_b)?;
        self.give_back(shrink_r, shrink_b);

        // 2. Log the whole batch as one record: after a crash, all of it is there or none.
        let fp = rec.header().fingerprint;
        let stamped: Vec<(u64, u64)> = writes
            .iter()
            .zip(&hashes)
            .map(|(w, &h)| {
                let version = self.next_seq(&mut guards[pos(h)].counters, h);
                (
                    version,
                    w.ttl.map_or(u64::MAX, |d| now.saturating_add(ms(d))),
                )
            })
            .collect();
        let mut seq = 0;
        let logged = self.log(&mut seq, Op::Complete, |w| {
            w.put_parts(lease.key(), Kind::Completed, now, expires, fp, response);
            for (wr, &(version, b)) in writes.iter().zip(&stamped) {
                match cas_value(&wr.op) {
                    Some(v) => w.put_parts(
                        wr.key.as_key(),
                        Kind::Value,
                        version,
                        b,
                        Fingerprint::NONE,
                        v,
                    ),
                    None => w.delete(wr.key.as_key()),
                }
            }
        });
        if let Err(e) = logged {
            self.give_back(grow_r, grow_b);
            let _ = self.admit(shrink_r, shrink_b);
            return Err(e);
        }
        for g in &mut guards {
            g.counters.last_seq = g.counters.last_seq.max(seq);
        }

        // 3. Apply. Admitted and logged, so nothing below can fail; each shard's own counters
        // follow its own changes.
        let counters_pos = pos(lease_hash);
        guards[counters_pos].counters.expirations += dead;
        for ((w, &h), &(version, b)) in writes.iter().zip(&hashes).zip(&stamped) {
            let shard = &mut *guards[pos(h)];
            let key = w.key.as_key();
            let c = &mut shard.counters;
            match (cas_value(&w.op), shard.table.find_entry(h, eq_key(key))) {
                (None, Ok(entry)) => {
                    let (rec, _) = entry.remove();
                    c.add(-1, -(rec.size() as i64));
                }
                (None, Err(_)) => {}
                (Some(v), Ok(mut entry)) => {
                    let r = entry.get_mut();
                    c.add(0, v.len() as i64 - r.value().len() as i64);
                    r.set_value(v);
                    r.set_kind(Kind::Value);
                    let hd = r.header_mut();
                    hd.a = version;
                    hd.b = b;
                    hd.fingerprint = Fingerprint::NONE;
                    shard.note_reclaim_at(b);
                }
                (Some(v), Err(_)) => {
                    c.add(1, Record::size_for(key, v.len()) as i64);
                    shard.table.insert_unique(
                        h,
                        Record::new(NewRecord {
                            kind: Kind::Value,
                            a: version,
                            b,
                            fingerprint: Fingerprint::NONE,
                            key,
                            value: v,
                        }),
                        |r| self.hash(r.key()),
                    );
                    shard.note_reclaim_at(b);
                }
            }
        }
        let shard = &mut *guards[counters_pos];
        if let Some(rec) = shard.table.find_mut(lease_hash, eq_key(lease.key())) {
            shard
                .counters
                .add(0, response.len() as i64 - rec.value().len() as i64);
            rec.set_value(response);
            rec.set_kind(Kind::Completed);
            let h = rec.header_mut();
            h.a = now;
            h.b = expires;
        }
        shard.note_reclaim_at(expires);
        shard.wake(lease_hash);
        Ok(Timestamp::from_millis(expires))
    }

    pub(crate) fn release(&self, lease: &Lease, settle: &Settle) -> Result<(), Error> {
        let key = lease.key();
        let hash = self.lease_hash(lease);
        let now = self.now();
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let Ok(mut entry) = shard.table.find_entry(hash, eq_key(key)) else {
            return Err(Error::StaleLease { token: lease.token });
        };
        Self::check_holder(entry.get(), lease)?;
        if entry.get().kind() == Kind::InFlightPending {
            // The stored request goes back to waiting, with a fresh expiry.
            let b = now.saturating_add(self.pending_ttl_ms);
            let c = &mut shard.counters;
            self.restamp(c, Op::Release, entry.get_mut(), Kind::Pending, now, b)?;
            shard.note_reclaim_at(b);
        } else {
            self.delete(&mut shard.counters, Op::Release, entry)?;
        }
        shard.wake(hash);
        Ok(())
    }

    pub(crate) fn renew(
        &self,
        lease: &Lease,
        extend: Duration,
        settle: &Settle,
    ) -> Result<Timestamp, Error> {
        let extend_ms = nonzero(extend, "the lease extension")?;
        let key = lease.key();
        let hash = self.lease_hash(lease);
        let deadline = self.now().saturating_add(extend_ms);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let Some(rec) = shard.table.find_mut(hash, eq_key(key)) else {
            return Err(Error::StaleLease { token: lease.token });
        };
        Self::check_holder(rec, lease)?;
        let (kind, token) = (rec.kind(), rec.header().a);
        self.restamp(&mut shard.counters, Op::Renew, rec, kind, token, deadline)?;
        shard.note_reclaim_at(deadline.saturating_add(self.lease_retention_ms));
        Ok(Timestamp::from_millis(deadline))
    }

    pub(crate) fn get(&self, key: Key<'_>, settle: &Settle) -> Result<Option<Snapshot>, Error> {
        self.check_key(key)?;
        let hash = self.hash(key);
        let now = self.now();
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let Ok(entry) = shard.table.find_entry(hash, eq_key(key)) else {
            return Ok(None);
        };
        let rec = entry.get();
        if is_dead(rec, now) {
            self.expire(&mut shard.counters, entry);
            return Ok(None);
        }
        Ok(Some(snapshot_of(rec)))
    }

    pub(crate) fn remove(&self, key: Key<'_>, settle: &Settle) -> Result<bool, Error> {
        self.check_key(key)?;
        let hash = self.hash(key);
        let now = self.now();
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let Ok(entry) = shard.table.find_entry(hash, eq_key(key)) else {
            return Ok(false);
        };
        if is_dead(entry.get(), now) {
            self.expire(&mut shard.counters, entry);
            return Ok(false);
        }
        self.delete(&mut shard.counters, Op::Remove, entry)?;
        shard.wake(hash);
        Ok(true)
    }

    pub(crate) fn cas(&self, write: &Write, settle: &Settle) -> Result<CasOutcome, Error> {
        let key = write.key.as_key();
        self.check_key(key)?;
        if let Some(v) = cas_value(&write.op) {
            self.check_value(v)?;
        }
        let now = self.now();
        let b = match write.ttl {
            Some(d) => now.saturating_add(nonzero(d, "the ttl")?),
            None => u64::MAX,
        };
        let hash = self.hash(key);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let entry = shard.table.entry(hash, eq_key(key), |r| self.hash(r.key()));
        let live = match &entry {
            Entry::Occupied(e) if !is_dead(e.get(), now) => Some(e.get()),
            _ => None,
        };
        let current = cas_version(live)?;
        if !cas_holds(&write.op, current) {
            return Ok(CasOutcome::Conflict { current });
        }
        let was_dead = matches!(&entry, Entry::Occupied(_)) && current.is_none();
        let c = &mut shard.counters;
        let outcome = match (cas_value(&write.op), entry) {
            (None, Entry::Occupied(e)) => {
                self.delete(c, Op::Cas, e)?;
                CasOutcome::Applied { version: None }
            }
            (None, Entry::Vacant(_)) => CasOutcome::Applied { version: None },
            (Some(v), Entry::Occupied(mut e)) => {
                let version = self.next_seq(c, hash);
                self.overwrite(
                    c,
                    Op::Cas,
                    e.get_mut(),
                    Kind::Value,
                    version,
                    b,
                    Fingerprint::NONE,
                    v,
                )?;
                CasOutcome::Applied {
                    version: Some(version),
                }
            }
            (Some(v), Entry::Vacant(slot)) => {
                let version = self.next_seq(c, hash);
                self.insert(
                    c,
                    Op::Cas,
                    slot,
                    NewRecord {
                        kind: Kind::Value,
                        a: version,
                        b,
                        fingerprint: Fingerprint::NONE,
                        key,
                        value: v,
                    },
                )?;
                CasOutcome::Applied {
                    version: Some(version),
                }
            }
        };
        if was_dead {
            shard.counters.expirations += 1;
        }
        shard.note_reclaim_at(b);
        Ok(outcome)
    }

    pub(crate) fn put_pending(
        &self,
        key: Key<'_>,
        payload: &[u8],
        ttl: Option<Duration>,
        settle: &Settle,
    ) -> Result<PutPending, Error> {
        self.check_key(key)?;
        self.check_value(payload)?;
        let ttl_ms = match ttl {
            Some(d) => nonzero(d, "the ttl")?,
            None => self.pending_ttl_ms,
        };
        let hash = self.hash(key);
        let now = self.now();
        let b = now.saturating_add(ttl_ms);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let parts = NewRecord {
            kind: Kind::Pending,
            a: now,
            b,
            fingerprint: Fingerprint::NONE,
            key,
            value: payload,
        };
        let outcome = match shard.table.entry(hash, eq_key(key), |r| self.hash(r.key())) {
            Entry::Vacant(slot) => {
                self.insert(&mut shard.counters, Op::PutPending, slot, parts)?;
                PutPending::Stored
            }
            Entry::Occupied(mut e) => {
                let rec = e.get_mut();
                let dead = is_dead(rec, now);
                match rec.kind() {
                    Kind::Pending | Kind::Completed | Kind::Value if dead => {
                        let c = &mut shard.counters;
                        self.overwrite(
                            c,
                            Op::PutPending,
                            rec,
                            Kind::Pending,
                            now,
                            b,
                            Fingerprint::NONE,
                            payload,
                        )?;
                        c.expirations += 1;
                        PutPending::Stored
                    }
                    Kind::Pending => {
                        let c = &mut shard.counters;
                        self.overwrite(
                            c,
                            Op::PutPending,
                            rec,
                            Kind::Pending,
                            now,
                            b,
                            Fingerprint::NONE,
                            payload,
                        )?;
                        PutPending::Stored
                    }
                    Kind::InFlightPending => PutPending::InProgress {
                        deadline: Timestamp::from_millis(rec.header().b),
                    },
                    Kind::Completed => PutPending::Completed,
                    other => {
                        return Err(Error::WrongKind {
                            expected: RecordKind::Pending,
                            found: kind_of(other),
                        });
                    }
                }
            }
        };
        shard.note_reclaim_at(b);
        Ok(outcome)
    }

    pub(crate) fn take_pending(
        &self,
        key: Key<'_>,
        lease: Duration,
        settle: &Settle,
    ) -> Result<Take, Error> {
        self.check_key(key)?;
        let lease_ms = nonzero(lease, "the lease duration")?;
        let hash = self.hash(key);
        let now = self.now();
        let deadline = now.saturating_add(lease_ms);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let Ok(mut entry) = shard.table.find_entry(hash, eq_key(key)) else {
            return Ok(Take::NotFound);
        };
        if is_dead(entry.get(), now) {
            self.expire(&mut shard.counters, entry);
            return Ok(Take::NotFound);
        }
        let rec = entry.get_mut();
        let acquire = |c: &mut Counters, rec: &mut Record, takeover: bool| -> Result<Take, Error> {
            let token = self.next_seq(c, hash);
            self.restamp(
                c,
                Op::TakePending,
                rec,
                Kind::InFlightPending,
                token,
                deadline,
            )?;
            Ok(Take::Acquired {
                lease: Lease {
                    key: key.to_owned(),
                    hash: Some(hash),
                    token,
                    deadline: Timestamp::from_millis(deadline),
                    fingerprint: Fingerprint::NONE,
                    takeover,
                },
                payload: rec.value().to_vec(),
            })
        };
        let outcome = match rec.kind() {
            Kind::Pending => {
                shard.counters.acquired += 1;
                acquire(&mut shard.counters, rec, false)?
            }
            Kind::InFlightPending if rec.header().b > now => {
                shard.counters.in_progress += 1;
                Take::InProgress {
                    deadline: Timestamp::from_millis(rec.header().b),
                }
            }
            Kind::InFlightPending => {
                shard.counters.acquired += 1;
                shard.counters.takeovers += 1;
                acquire(&mut shard.counters, rec, true)?
            }
            Kind::Completed => {
                shard.counters.replayed += 1;
                Take::Completed(completed_of(rec))
            }
            other => {
                return Err(Error::WrongKind {
                    expected: RecordKind::Pending,
                    found: kind_of(other),
                });
            }
        };
        if let Take::Acquired { .. } = outcome {
            shard.note_reclaim_at(deadline.saturating_add(self.lease_retention_ms));
        }
        Ok(outcome)
    }

    /// Drops expired records from shard `i`. Holds only that shard's lock, and skips the shard
    /// without scanning when nothing in it can have expired yet.
    pub(crate) fn sweep_shard(&self, i: usize) -> usize {
        let now = self.now();
        let settle = Settle::default();
        let mut guard = self.lock_index(i, &settle);
        let shard = &mut *guard;
        if shard.next_reclaim > now {
            return 0;
        }
        let retention = self.lease_retention_ms;
        // Log the removals first (one record); if the log refuses, remove nothing.
        let table = &shard.table;
        let due = |r: &&Record| reclaim_at(r, retention) <= now;
        if table.iter().any(|r| due(&r)) {
            let logged = self.log(&mut shard.counters.last_seq, Op::Expire, |w| {
                for r in table.iter().filter(due) {
                    w.delete(r.key());
                }
            });
            if logged.is_err() {
                return 0;
            }
        }
        let (mut n, mut bytes, mut next) = (0u64, 0u64, u64::MAX);
        shard.table.retain(|r| {
            let at = reclaim_at(r, retention);
            if at <= now {
                n += 1;
                bytes += r.size() as u64;
                false
            } else {
                next = next.min(at);
                true
            }
        });
        shard.next_reclaim = next;
        shard.counters.expirations += n;
        self.unreserve(&mut shard.counters, n, bytes);
        n as usize
    }

    /// Replays one logged item (recovery). Limits are not applied: the data was accepted
    /// before. Returns the high bits of the token or version it carries (0 if none), so that
    /// new tokens are issued above every logged one.
    fn apply(&self, item: &Item<'_>) -> u64 {
        let key = item.key();
        let hash = self.hash(key);
        let idx = self.shard_index(hash);
        let retention = self.lease_retention_ms;
        let limited = self.limited;
        let mut guard = self.shards[idx].0.lock();
        let shard = &mut *guard;
        let entry = shard.table.find_entry(hash, eq_key(key));
        let (records, bytes): (i64, i64) = match (item, entry) {
            (Item::Delete { .. }, Ok(e)) => {
                let (rec, _) = e.remove();
                (-1, -(rec.size() as i64))
            }
            (Item::Delete { .. }, Err(_)) => (0, 0),
            (
                &Item::Put {
                    kind,
                    a,
                    b,
                    fingerprint,
                    value,
                    ..
                },
                found,
            ) => {
                let parts = NewRecord {
                    kind,
                    a,
                    b,
                    fingerprint,
                    key,
                    value,
                };
                let new = Record::new(parts);
                shard.next_reclaim = shard.next_reclaim.min(reclaim_at(&new, retention));
                match found {
                    Ok(mut e) => {
                        let old = std::mem::replace(e.get_mut(), new);
                        (0, e.get().size() as i64 - old.size() as i64)
                    }
                    Err(_) => {
                        let size = new.size() as i64;
                        shard.table.insert_unique(hash, new, |r| self.hash(r.key()));
                        (1, size)
                    }
                }
            }
        };
        shard.counters.add(records, bytes);
        if limited {
            self.used_records
                .fetch_add(records as u64, Ordering::Relaxed);
            self.used_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        match item {
            Item::Put {
                kind: Kind::InFlight | Kind::InFlightPending | Kind::Value,
                a,
                ..
            } => a >> 16,
            _ => 0,
        }
    }

    /// Writes a checkpoint if the log grew by `checkpoint_every` bytes since the last one.
    pub(crate) fn maybe_checkpoint(&self) {
        let (Some(wal), Some(_)) = (&self.wal, &self.checkpoints) else {
            return;
        };
        let due = {
            let (at_bytes, at_time) = *self.checkpointing.lock();
            let grown = wal.written().saturating_sub(at_bytes);
            grown >= self.checkpoint_every
                || (grown > 0 && at_time.elapsed() >= self.checkpoint_interval)
        };
        if due {
            // A failure here is reported by the next explicit checkpoint, and the log (which
            // still holds everything) keeps the data safe meanwhile.
            let _ = self.checkpoint();
        }
    }

    /// Writes the live records into the checkpoint database and deletes the log segments it
    /// covers. Callers are not stopped: shards are copied one at a time under their own locks.
    ///
    /// Correct for any interleaving with writers because log records are redo images: the
    /// checkpoint reflects at least every record up to `upto` (taken before the copy), and
    /// replaying records after `upto` over it — some of them already reflected — gives the
    /// same state as replaying them over the exact state at `upto`.
    pub(crate) fn checkpoint(&self) -> Result<CheckpointStats, Error> {
        let (Some(wal), Some(checkpoints)) = (&self.wal, &self.checkpoints) else {
            return Ok(CheckpointStats::default());
        };
        let mut last = self.checkpointing.lock();
        wal.check()?;
        let written = wal.written();
        let upto = wal.appended();
        let now = self.now();
        let retention = self.lease_retention_ms;
        let mut records = Vec::new();
        let mut token_high = 0;
        for shard in self.shards.iter() {
            let s = shard.0.lock();
            token_high = token_high.max(s.counters.seq);
            for r in s.table.iter() {
                // Expired records are not carried into checkpoints.
                if is_dead(r, now) || reclaim_at(r, retention) <= now {
                    continue;
                }
                let (mut k, mut v) = (Vec::new(), Vec::new());
                let h = r.header();
                crate::checkpoint::encode_key(r.key(), &mut k);
                crate::checkpoint::encode_value(
                    r.kind(),
                    h.a,
                    h.b,
                    h.fingerprint,
                    r.value(),
                    &mut v,
                );
                records.push((k, v));
            }
        }
        // Everything copied is durable in the log before the checkpoint can claim it.
        wal.wait(wal.appended())?;
        checkpoints
            .write(upto, token_high, &records)
            .map_err(|e| Error::Checkpoint {
                reason: e.to_string(),
            })?;
        // The segments wholly covered by the checkpoint go; the newest one always stays.
        let deleted =
            crate::wal::segments::remove_covered(self.storage.as_ref(), &self.wal_dir, upto)
                .map_err(|e| Error::Checkpoint {
                    reason: format!("removing log segments in {}: {e}", self.wal_dir.display()),
                })?;
        *last = (written, Instant::now());
        self.checkpoints_written.fetch_add(1, Ordering::Relaxed);
        Ok(CheckpointStats {
            records: records.len() as u64,
            covers_seq: upto,
            segments_deleted: deleted,
        })
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
            s.records += c.records;
            s.bytes += c.bytes;
        }
        s.checkpoints = self.checkpoints_written.load(Ordering::Relaxed);
        s
    }
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

    /// Starts work on `key`, or reports who has it. See [`Begin`] for the outcomes.
    ///
    /// An expired lease is taken over (the new lease says so); a different `fingerprint` on a
    /// key in use is a [`Begin::Mismatch`].
    pub fn begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Begin, Error> {
        let settle = Settle::default();
        let (outcome, _) = self.inner.begin(key, fingerprint, lease, false, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        Ok(outcome)
    }

    /// Like [`begin`](Self::begin), but if someone else holds the key, blocks until they
    /// complete or release it (or their lease expires) for at most `max_wait`, then answers as
    /// `begin` would. No polling: the holder's completion wakes the waiter.
    pub fn begin_wait(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        max_wait: Duration,
    ) -> Result<Begin, Error> {
        let until = Instant::now() + max_wait;
        loop {
            let settle = Settle::default();
            match self
                .inner
                .begin_round(key, fingerprint, lease, until, &settle)?
            {
                Round::Done(outcome) => {
                    self.inner.settle(&settle, self.durability)?;
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
    pub fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Timestamp, Error> {
        self.complete_with(lease, response, ttl, &[])
    }

    /// [`complete`](Self::complete) together with versioned writes on other keys, all or none:
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
    ///     store.cas(&Write::put_if_absent(balance.clone(), "100.00"))? else { panic!() };
    ///
    /// let Begin::Acquired(lease) =
    ///     store.begin(Key::new("payments", "p-1"), Fingerprint::of(b"12.50"), Duration::from_secs(10))?
    /// else { panic!() };
    /// // The debit and "payment p-1 processed" commit together.
    /// store.complete_with(&lease, b"ok", None, &[Write::set_if_version(balance.clone(), v, "87.50")])?;
    /// let Some(Snapshot::Value(now)) = store.get(balance.as_key())? else { panic!() };
    /// assert_eq!(now.value, b"87.50");
    /// # Ok::<(), idemkv::Error>(())
    /// ```
    pub fn complete_with(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
        writes: &[Write],
    ) -> Result<Timestamp, Error> {
        let settle = Settle::default();
        let expires = self.inner.complete(lease, response, ttl, writes, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        Ok(expires)
    }

    /// Abandons the lease: the next `begin` runs the work again. For a stored request
    /// (`take_pending`), the request goes back to waiting.
    pub fn release(&self, lease: Lease) -> Result<(), Error> {
        let settle = Settle::default();
        self.inner.release(&lease, &settle)?;
        self.inner.settle(&settle, self.durability)
    }

    /// Extends the lease to `extend` from now (a heartbeat for long handlers) and returns the
    /// new deadline. A lease that expired but was not taken over yet can still be renewed.
    pub fn renew(&self, lease: &mut Lease, extend: Duration) -> Result<Timestamp, Error> {
        let settle = Settle::default();
        let d = self.inner.renew(lease, extend, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        lease.deadline = d;
        Ok(d)
    }

    /// What `key` holds now, if anything (expired records are absent).
    pub fn get(&self, key: Key<'_>) -> Result<Option<Snapshot>, Error> {
        let settle = Settle::default();
        let found = self.inner.get(key, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        Ok(found)
    }

    /// Removes whatever `key` holds; returns whether there was something. A lease on it
    /// becomes stale, and waiters on it wake.
    pub fn remove(&self, key: Key<'_>) -> Result<bool, Error> {
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
    /// let CasOutcome::Applied { version: Some(v1) } = store.cas(&Write::put_if_absent(k.clone(), "17"))? else { panic!() };
    /// assert!(matches!(store.cas(&Write::put_if_absent(k.clone(), "18"))?, CasOutcome::Conflict { current: Some(v) } if v == v1));
    /// assert!(matches!(store.cas(&Write::set_if_version(k.clone(), v1, "18"))?, CasOutcome::Applied { .. }));
    /// # Ok::<(), idemkv::Error>(())
    /// ```
    pub fn cas(&self, write: &Write) -> Result<CasOutcome, Error> {
        let settle = Settle::default();
        let outcome = self.inner.cas(write, &settle)?;
        self.inner.settle(&settle, self.durability)?;
        Ok(outcome)
    }

    /// Stores a request `payload` under `key` to be processed once later (the PUT of the
    /// exactly-once protocol). Repeatable until the request is taken.
    pub fn put_pending(
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
    pub fn take_pending(&self, key: Key<'_>, lease: Duration) -> Result<Take, Error> {
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

    /// Writes a checkpoint now (see [`StoreBuilder::checkpoint_every`] for the automatic ones):
    /// the live records go into `checkpoint.redb`, and the log segments it covers are deleted.
    /// A no-op for a store in memory.
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
#[path = "store_tests.rs"]
mod tests;
