//! The same store on Redis (feature `redis`): several replicas of a service share one
//! idempotency state.
//!
//! [`RedisStore`] implements [`IdempotencyStore`] with the embedded store's semantics; every
//! operation is one Lua script, atomic on the server (see `scripts.rs` for the record layout).
//! Time is the Redis server's, so replicas' clocks do not matter; TTLs are Redis expiries.
//!
//! ```no_run
//! # async fn run() -> Result<(), idemkv::Error> {
//! use idemkv::{Fingerprint, IdempotencyStore, Key};
//! use std::time::Duration;
//!
//! let store = idemkv::redis::RedisStore::builder("redis://127.0.0.1:6379").connect().await?;
//! let key = Key::new("tenant-1/POST /orders", "3f1c7a52");
//! let begin = store.begin(key, Fingerprint::of(b"{}"), Duration::from_secs(30)).await?;
//! # Ok(()) }
//! ```
//!
//! **Key layout.** A record of key `(scope, id)` lives at
//! `<prefix>{<tag>}<scope length: 1 byte><scope><id>`. The hash tag is the id itself, or, when
//! the id contains `{…}`, the text between the first braces (Redis Cluster's own rule), so
//! records whose ids share a `{tag}` land in one slot. In cluster mode
//! ([`RedisStoreBuilder::cluster`]) a completion whose writes span slots is refused with
//! [`Error::InvalidBatch`] before anything is sent: never a partial write.
//!
//! Code map: this module holds the builder and the store's state; `ops` (the trait's
//! operations), `scripts` (the Lua and the record layout), `replies` (reading script replies),
//! `notifier` (pub/sub wake-ups), `cache` (completed records kept locally), `keys` (hash tags,
//! slots). The children read this module's items through `use super::*`.

mod cache;
mod keys;
mod notifier;
mod ops;
mod replies;
mod scripts;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::Notify;

use crate::backend::IdempotencyStore;
use crate::clock::Timestamp;
use crate::error::{Error, RecordKind};
use crate::key::{Fingerprint, Key};
use crate::limits::{DAY, Limits, cas_value, ms, nonzero};
use crate::model::{
    Begin, CasOp, CasOutcome, Completed, Lease, PutPending, Snapshot, Take, Versioned, Write,
};

use cache::Cache;
use keys::{hash_tag, slot, split_key};
use notifier::Notifier;
use replies::*;

/// Configures a [`RedisStore`]; from [`RedisStore::builder`].
#[derive(Clone, Debug)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    cluster: bool,
    default_ttl: Duration,
    pending_ttl: Duration,
    lease_retention: Duration,
    max_key_len: usize,
    max_value_len: usize,
    max_batch: usize,
    timeout: Duration,
    cache: Option<(usize, Duration)>,
}

impl RedisStoreBuilder {
    /// Keeps up to `entries` completed records in this process for at most `max_age`, so a
    /// replay of a recent request is answered without a round trip.
    ///
    /// Completed records never change until they expire or are removed by hand, so the only
    /// staleness is this: a record [`remove`](IdempotencyStore::remove)d through *another*
    /// process (or expired early by an operator) may still be replayed here for up to
    /// `max_age`. Expiry is checked against the record's `expires_at` (server time) with this
    /// machine's clock, so clock skew between them shifts it by the skew. Removal through
    /// this store drops the entry at once. Off by default.
    pub fn cache(mut self, entries: usize, max_age: Duration) -> Self {
        self.cache = (entries > 0 && !max_age.is_zero()).then_some((entries, max_age));
        self
    }

    /// Prefix of every key (default `idemkv:`); one Redis can hold several stores.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Refuse completion batches whose keys map to different Redis Cluster slots (default
    /// off: a single server, or Redis behind a proxy, accepts any batch).
    pub fn cluster(mut self, on: bool) -> Self {
        self.cluster = on;
        self
    }

    /// TTL of completed records (default 24 h).
    pub fn default_ttl(mut self, d: Duration) -> Self {
        self.default_ttl = d;
        self
    }

    /// TTL of pending requests and of released pending requests (default 24 h).
    pub fn pending_ttl(mut self, d: Duration) -> Self {
        self.pending_ttl = d;
        self
    }

    /// How long an expired lease is kept, so a late retry learns it is a takeover (24 h).
    pub fn lease_retention(mut self, d: Duration) -> Self {
        self.lease_retention = d;
        self
    }

    /// Longest key id accepted (default 255 bytes, as the embedded store).
    pub fn max_key_len(mut self, n: usize) -> Self {
        self.max_key_len = n;
        self
    }

    /// Largest value accepted (default 1 MiB).
    pub fn max_value_len(mut self, n: usize) -> Self {
        self.max_value_len = n;
        self
    }

    /// How long one command may take before it fails with [`Error::Unavailable`] (default
    /// 2 s). The connection reconnects on its own.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Connects (and fails with [`Error::Unavailable`] if the server cannot be reached).
    pub async fn connect(self) -> Result<RedisStore, Error> {
        for (d, what) in [
            (self.default_ttl, "the default ttl"),
            (self.pending_ttl, "the pending ttl"),
            (self.lease_retention, "the lease retention"),
        ] {
            nonzero(d, what)?;
        }
        let client = redis::Client::open(self.url.as_str()).map_err(|e| Error::InvalidConfig {
            reason: format!("redis url: {e}"),
        })?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(unavailable)?;
        let script = |body: &str| Script::new(&scripts::with_prelude(body));
        Ok(RedisStore {
            inner: Arc::new(Inner {
                health: replies::Health::default(),
                counts: Counts::default(),
                cache: self.cache.map(|(entries, max_age)| Cache {
                    entries,
                    max_age,
                    map: Mutex::new(HashMap::new()),
                }),
                conn,
                notifier: Notifier {
                    client,
                    sink: tokio::sync::Mutex::new(None),
                    waiters: Arc::default(),
                },
                scripts: Scripts {
                    begin: script(scripts::BEGIN),
                    complete: script(scripts::COMPLETE),
                    release: script(scripts::RELEASE),
                    renew: script(scripts::RENEW),
                    remove: script(scripts::REMOVE),
                    cas: script(scripts::CAS),
                    put_pending: script(scripts::PUT_PENDING),
                    take_pending: script(scripts::TAKE_PENDING),
                },
                cfg: self,
            }),
        })
    }
}

/// The idempotency store on Redis; see the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.cfg.prefix)
            .field("cluster", &self.inner.cfg.cluster)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    begin: Script,
    complete: Script,
    release: Script,
    renew: Script,
    remove: Script,
    cas: Script,
    put_pending: Script,
    take_pending: Script,
}

struct Inner {
    health: replies::Health,
    counts: Counts,
    cache: Option<Cache>,
    conn: ConnectionManager,
    notifier: Notifier,
    scripts: Scripts,
    cfg: RedisStoreBuilder,
}

/// This process's operations on the store, for [`RedisStore::stats`].
#[derive(Default)]
struct Counts {
    acquired: AtomicU64,
    replayed: AtomicU64,
    in_progress: AtomicU64,
    mismatches: AtomicU64,
    takeovers: AtomicU64,
    completions: AtomicU64,
    releases: AtomicU64,
    stale_leases: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl Counts {
    fn begin(&self, r: &Result<Begin, Error>) {
        match r {
            Ok(Begin::Acquired(l)) => {
                bump(&self.acquired);
                if l.is_takeover() {
                    bump(&self.takeovers);
                }
            }
            Ok(Begin::Completed(_)) => bump(&self.replayed),
            Ok(Begin::InProgress { .. }) => bump(&self.in_progress),
            Ok(Begin::Mismatch) => bump(&self.mismatches),
            Err(_) => {}
        }
    }

    /// A complete, release or renew: `done` counts a success, stale leases are counted apart.
    fn lease_op<T>(&self, done: Option<&AtomicU64>, r: &Result<T, Error>) {
        match r {
            Ok(_) => done.map_or((), bump),
            Err(Error::StaleLease { .. }) => bump(&self.stale_leases),
            Err(_) => {}
        }
    }
}

impl RedisStore {
    /// Counters of the operations this process ran on the store (every process keeps its own;
    /// sum them across replicas): acquired, replayed, in progress, mismatches, takeovers,
    /// completions, releases and stale leases. Sizes live in Redis (`INFO keyspace`), so
    /// `records`, `bytes` and the log fields are 0. Publish them with
    /// `idemkv::metrics::record_stats` (feature `metrics`).
    pub fn stats(&self) -> crate::Stats {
        let c = &self.inner.counts;
        let get = |a: &AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        crate::Stats {
            acquired: get(&c.acquired),
            replayed: get(&c.replayed),
            in_progress: get(&c.in_progress),
            mismatches: get(&c.mismatches),
            takeovers: get(&c.takeovers),
            completions: get(&c.completions),
            releases: get(&c.releases),
            stale_leases: get(&c.stale_leases),
            ..crate::Stats::default()
        }
    }

    /// A builder for a store at `url` (`redis://host:port/db`, `rediss://…`, `unix://…`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: "idemkv:".into(),
            cluster: false,
            default_ttl: DAY,
            pending_ttl: DAY,
            lease_retention: DAY,
            max_key_len: 255,
            max_value_len: 1 << 20,
            max_batch: 64,
            timeout: Duration::from_secs(2),
            cache: None,
        }
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    fn cfg(&self) -> &RedisStoreBuilder {
        &self.inner.cfg
    }

    /// The Redis key of `key`.
    pub fn redis_key(&self, key: Key<'_>) -> Vec<u8> {
        let prefix = self.cfg().prefix.as_bytes();
        let tag = hash_tag(key.id());
        let mut out =
            Vec::with_capacity(prefix.len() + tag.len() + 3 + key.scope().len() + key.id().len());
        out.extend_from_slice(prefix);
        out.push(b'{');
        out.extend_from_slice(tag);
        out.push(b'}');
        // The scope is at most 255 bytes (checked before any key is built).
        out.push(key.scope().len() as u8);
        out.extend_from_slice(key.scope());
        out.extend_from_slice(key.id());
        out
    }

    /// Every live record of `scope`, as `(id, snapshot)`. Walks the whole keyspace under the
    /// prefix with `SCAN` (O(keys)): for tools and examples, not request paths.
    pub async fn scan(&self, scope: &[u8]) -> Result<Vec<(Vec<u8>, Snapshot)>, Error> {
        let prefix = self.cfg().prefix.as_bytes();
        let mut pattern = prefix.to_vec();
        pattern.extend_from_slice(b"{*");
        let mut conn = self.conn();
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .observed(&self.inner.health)?;
            for k in keys {
                let Some(id) = split_key(&k[prefix.len()..], scope) else {
                    continue;
                };
                let fields: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .observed(&self.inner.health)?;
                if let Some(snap) = snapshot_of(&fields)? {
                    out.push((id.to_vec(), snap));
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(out);
            }
        }
    }

    fn channel(key: &[u8]) -> Vec<u8> {
        let mut c = b"__idemkv_done__:".to_vec();
        c.extend_from_slice(key);
        c
    }

    fn limits(&self) -> Limits {
        let cfg = self.cfg();
        Limits {
            max_key_len: cfg.max_key_len,
            max_value_len: cfg.max_value_len,
            max_batch: cfg.max_batch,
        }
    }

    fn check_key(&self, key: Key<'_>) -> Result<(), Error> {
        self.limits().check_key(key)
    }

    fn check_value(&self, v: &[u8]) -> Result<(), Error> {
        self.limits().check_value(v)
    }

    fn check_batch(&self, lease: &Lease, writes: &[Write]) -> Result<(), Error> {
        self.limits().check_batch(lease.key(), writes)?;
        if self.cfg().cluster {
            let slot = slot(hash_tag(lease.key().id()));
            if writes
                .iter()
                .any(|w| self::slot(hash_tag(w.key.as_key().id())) != slot)
            {
                return Err(Error::InvalidBatch {
                    reason: "the batch spans Redis Cluster slots: give the ids a common {tag}",
                });
            }
        }
        Ok(())
    }

    async fn begin_once(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Begin, Error> {
        self.check_key(key)?;
        let lease_ms = nonzero(lease, "the lease duration")?;
        let rk = self.redis_key(key);
        if let Some(done) = self.inner.cache.as_ref().and_then(|c| c.get(&rk)) {
            return Ok(if done.fingerprint == fingerprint {
                Begin::Completed(done)
            } else {
                Begin::Mismatch
            });
        }
        let reply: Vec<Value> = self
            .inner
            .scripts
            .begin
            .key(&rk)
            .arg(fingerprint.as_bytes().as_slice())
            .arg(lease_ms)
            .arg(ms(self.cfg().lease_retention))
            .invoke_async(&mut self.conn())
            .await
            .observed(&self.inner.health)?;
        match code(&reply)? {
            1 => Ok(Begin::Acquired(Lease::new(
                key.to_owned(),
                uint(&reply, 1)?,
                Timestamp::from_millis(uint(&reply, 2)?),
                fingerprint,
                uint(&reply, 3)? == 1,
            ))),
            0 => Ok(Begin::InProgress {
                deadline: Timestamp::from_millis(uint(&reply, 1)?),
            }),
            2 => {
                let done = Completed {
                    response: bytes(&reply, 1)?,
                    fingerprint,
                    completed_at: Timestamp::from_millis(uint(&reply, 2)?),
                    expires_at: Timestamp::from_millis(uint(&reply, 3)?),
                };
                if let Some(c) = &self.inner.cache {
                    c.put(rk, &done);
                }
                Ok(Begin::Completed(done))
            }
            3 => Ok(Begin::Mismatch),
            _ => Err(wrong_kind(RecordKind::Idempotency, &reply)),
        }
    }
}
