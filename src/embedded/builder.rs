//! Configuring and opening a store: the builder's settings and their checks, and `open` —
//! the directory lock, the checkpoint load, the log replay, then the writer.
//!
//! Invariant: a store opened on a directory has replayed everything durable before it answers
//! its first call, and holds the directory's lock until the last clone is dropped.

use std::time::{Duration, Instant};

use super::Store;
use super::engine::{Inner, Padded};
use super::maintenance;
use crate::checkpoint::Checkpoints;
use crate::clock::{Clock, SystemClock, duration_to_millis_ceil};
use crate::error::Error;
use crate::key::{MAX_ID_LEN, MAX_SCOPE_LEN};
use crate::limits::DAY;
use crate::shard::Shard;
use crate::sync::{Arc, AtomicU64, Mutex};
use crate::wal::io::{LogStorage, OsStorage};
use crate::wal::recovery::{LogError, OnCorruption};
use crate::wal::{Durability, Wal};

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another store (in this or another process) has the directory open.
    #[error(
        "{path} is in use by another idemkv store{} (its LOCK file is held); close that one first",
        holder.map(|p| format!(", process {p}")).unwrap_or_default()
    )]
    Locked {
        /// The directory.
        path: std::path::PathBuf,
        /// The process holding it, as it wrote itself into the LOCK file.
        holder: Option<u32>,
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

/// Log bytes per live record assumed when sizing the index before a replay: about what one
/// begin and its completion of a short key and response take (a log of renewals or rewrites
/// of few keys over-sizes it, and the tables are shrunk after the replay).
const LOG_BYTES_PER_RECORD_GUESS: u64 = 160;

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
    /// `None` runs no sweeper (call [`Store::sweep_expired`] yourself). Checkpoints of a
    /// durable store are written on their own schedule either way.
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
    ///     let Begin::Acquired(lease) = store.blocking_begin(key, fp, Duration::from_secs(30))? else { panic!() };
    ///     store.blocking_complete(&lease, b"created", None)?; // durable when this returns
    /// }
    /// let store = Store::builder().open(&dir)?; // after a restart (or a crash)
    /// assert!(matches!(store.blocking_begin(key, fp, Duration::from_secs(30))?, Begin::Completed(c) if c.response == b"created"));
    /// # drop(store); std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(self, dir: impl AsRef<std::path::Path>) -> Result<Store, OpenError> {
        let dir = dir.as_ref();
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
        take_lock(&lock, dir, false)?;
        write_holder(&lock);
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir).map_err(io(&wal_dir))?;
        // 1. The last checkpoint, 2. the log written since.
        let checkpoints = Checkpoints::open(dir.join("checkpoint.redb"))?;
        let mut max_token = 0u64;
        let loaded = checkpoints.load(
            |n| inner.reserve_records(n),
            |item| {
                max_token = max_token.max(inner.apply(item));
            },
        )?;
        let report = self.replay_log(&inner, &wal_dir, &loaded, max_token, true)?;
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
        log_recovery(&report);
        inner.recovery = Some(report);
        inner.checkpoints = Some(checkpoints);
        inner.wal_dir = wal_dir;
        inner.checkpoint_every = self.checkpoint_every;
        // The next checkpoint reads the log from where the loaded one ends.
        inner.checkpointing.get_mut().seq = loaded.seq;
        Ok(self.finish(inner))
    }

    /// Reads `dir` into an in-memory copy without changing a byte of it: a shared lock on
    /// LOCK (so no store opens it meanwhile; refused with `Locked` while one has it open),
    /// the checkpoint in redb's read-only mode, the log replayed with nothing cut or removed.
    /// The copy's report says what an open would cut and remove. `verify` uses
    /// `OnCorruption::Fail`, so damage is an error naming file and offset.
    #[cfg_attr(loom, allow(dead_code))] // its one user, `tools`, is not built under loom
    pub(crate) fn read_only_copy(
        mut self,
        dir: &std::path::Path,
    ) -> Result<(Store, Option<crate::checkpoint::Loaded>), OpenError> {
        let lock_path = dir.join("LOCK");
        let lock = std::fs::File::open(&lock_path).map_err(io(&lock_path))?;
        take_lock(&lock, dir, true)?;
        self.durability = Durability::None;
        self.sweep_interval = None;
        let inner = self.make_inner()?;
        let mut max_token = 0u64;
        let loaded = crate::checkpoint::load_read_only(&dir.join("checkpoint.redb"), |item| {
            max_token = max_token.max(inner.apply(item));
        })?;
        let report = self.replay_log(
            &inner,
            &dir.join("wal"),
            &loaded.unwrap_or_default(),
            max_token,
            false,
        )?;
        let mut inner = inner;
        inner.recovery = Some(report);
        drop(lock);
        Ok((self.finish(inner), loaded))
    }

    /// Recovery's second half, for `open` and `read_only_copy`: replays the log written after
    /// the checkpoint `loaded` (whose records are applied already; `max_token` is the highest
    /// they carry), cutting and removing what recovery removes only if `modify`, and issues
    /// new tokens above every one seen. A directory without a log (read-only) replays nothing.
    fn replay_log(
        &self,
        inner: &Inner,
        wal_dir: &std::path::Path,
        loaded: &crate::checkpoint::Loaded,
        max_token: u64,
        modify: bool,
    ) -> Result<crate::RecoveryReport, OpenError> {
        let mut max_token = max_token.max(loaded.token_high);
        // The index is sized once for what the log may hold (a guess from its size; the
        // tables are shrunk to fit afterwards), instead of growing step by step.
        if let Ok(list) = crate::wal::segments::list(wal_dir) {
            let bytes: u64 = list
                .iter()
                .filter_map(|(_, p)| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum();
            inner.reserve_records(bytes / LOG_BYTES_PER_RECORD_GUESS);
        }
        let mut report = if modify || wal_dir.exists() {
            crate::wal::recovery::replay(
                wal_dir,
                loaded.seq,
                self.on_corruption,
                self.storage.as_ref(),
                modify,
                |rec| {
                    for item in &rec.items {
                        max_token = max_token.max(inner.apply(item));
                    }
                },
            )?
        } else {
            crate::RecoveryReport::default()
        };
        inner.shrink_tables();
        report.checkpoint_seq = loaded.seq;
        report.checkpoint_records = loaded.records;
        for shard in inner.shards.iter() {
            let mut s = shard.0.lock();
            s.counters.seq = s.counters.seq.max(max_token);
        }
        Ok(report)
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
            checkpointing: parking_lot::Mutex::new(maintenance::LastCheckpoint {
                written: 0,
                at: Instant::now(),
                seq: 0,
            }),
            checkpoints_written: AtomicU64::new(0),
            stale_leases: AtomicU64::new(0),
        })
    }

    fn finish(&self, inner: Inner) -> Store {
        let inner = Arc::new(inner);
        let sweeper = maintenance::start(&inner, self.sweep_interval);
        Store {
            inner,
            durability: None,
            lease_sync: crate::wal::LeaseSync::Synced,
            _sweeper: sweeper.map(std::sync::Arc::new),
        }
    }
}

/// What recovery cut or dropped, for operators: a torn tail (never acknowledged) at `warn`,
/// dropped damage (acknowledged records lost on purpose) at `error`.
fn log_recovery(report: &crate::RecoveryReport) {
    if let Some(t) = &report.torn_tail {
        tracing::warn!(
            target: "idemkv::recovery",
            path = %t.path.display(),
            offset = t.offset,
            bytes = t.bytes,
            "cut the log's torn tail (a write a crash interrupted; never acknowledged)"
        );
    }
    if let Some(d) = &report.dropped {
        tracing::error!(
            target: "idemkv::recovery",
            path = %d.path.display(),
            offset = d.offset,
            reason = %d.reason,
            removed_segments = d.removed_segments.len(),
            "dropped damaged log records and everything after them (OnCorruption::DropDamaged)"
        );
    }
    for path in &report.empty_segments_removed {
        tracing::info!(target: "idemkv::recovery", path = %path.display(), "removed a log segment that held no batch");
    }
    tracing::info!(
        target: "idemkv::recovery",
        segments = report.segments,
        records = report.records,
        checkpoint_records = report.checkpoint_records,
        "store opened"
    );
}

/// Writes this process's id into the LOCK file it now holds, for `Locked { holder }` and the
/// `idemkv` command. Best effort: the lock itself is the flock, not the contents.
fn write_holder(lock: &std::fs::File) {
    use std::io::Write as _;
    let mut f = lock;
    if lock.set_len(0).is_ok() {
        let _ = write!(f, "{}", std::process::id());
    }
}

/// The process id a LOCK file names, if it names one.
pub(crate) fn read_holder(lock_path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(lock_path).ok()?.trim().parse().ok()
}

/// `OpenError::Io` for `path`, as a `map_err` argument.
fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> OpenError {
    let path = path.to_path_buf();
    move |source| OpenError::Io { path, source }
}

/// Takes `dir`'s LOCK (`shared` for a reader), or says who holds it.
fn take_lock(lock: &std::fs::File, dir: &std::path::Path, shared: bool) -> Result<(), OpenError> {
    let lock_path = dir.join("LOCK");
    let taken = if shared {
        lock.try_lock_shared()
    } else {
        lock.try_lock()
    };
    match taken {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Locked {
            path: dir.to_path_buf(),
            holder: read_holder(&lock_path),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(&lock_path)(e)),
    }
}
