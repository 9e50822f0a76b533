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

mod scripts;

use std::collections::HashMap;
use std::sync::Arc;
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
    cache: Option<Cache>,
    conn: ConnectionManager,
    notifier: Notifier,
    scripts: Scripts,
    cfg: RedisStoreBuilder,
}

impl RedisStore {
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
                .map_err(unavailable)?;
            for k in keys {
                let Some(id) = split_key(&k[prefix.len()..], scope) else {
                    continue;
                };
                let fields: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
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
            .map_err(unavailable)?;
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

impl IdempotencyStore for RedisStore {
    async fn begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Begin, Error> {
        self.begin_once(key, fingerprint, lease).await
    }

    async fn begin_wait(
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

    async fn complete(
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
        let mut inv = self.inner.scripts.complete.prepare_invoke();
        inv.key(&rk).key(Self::channel(&rk));
        for w in writes {
            inv.key(self.redis_key(w.key.as_key()));
        }
        inv.arg(lease.token()).arg(response).arg(ttl_ms);
        for w in writes {
            let (op, version, value) = cas_args(&w.op);
            inv.arg(op).arg(version).arg(value).arg(w.ttl.map_or(0, ms));
        }
        let reply: Vec<Value> = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        match code(&reply)? {
            1 => Ok(Timestamp::from_millis(uint(&reply, 1)?)),
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

    async fn release(&self, lease: Lease) -> Result<(), Error> {
        let rk = self.redis_key(lease.key());
        let reply: i64 = self
            .inner
            .scripts
            .release
            .key(&rk)
            .key(Self::channel(&rk))
            .arg(lease.token())
            .arg(ms(self.cfg().pending_ttl))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        match reply {
            1 => Ok(()),
            _ => Err(Error::StaleLease {
                token: lease.token(),
            }),
        }
    }

    async fn renew(&self, lease: &mut Lease, extend: Duration) -> Result<Timestamp, Error> {
        let extend_ms = nonzero(extend, "the lease extension")?;
        let rk = self.redis_key(lease.key());
        let reply: i64 = self
            .inner
            .scripts
            .renew
            .key(&rk)
            .arg(lease.token())
            .arg(extend_ms)
            .arg(ms(self.cfg().lease_retention))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if reply < 0 {
            return Err(Error::StaleLease {
                token: lease.token(),
            });
        }
        let deadline = Timestamp::from_millis(reply as u64);
        lease.set_deadline(deadline);
        Ok(deadline)
    }

    async fn get(&self, key: Key<'_>) -> Result<Option<Snapshot>, Error> {
        self.check_key(key)?;
        let fields: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(self.redis_key(key))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        snapshot_of(&fields)
    }

    async fn remove(&self, key: Key<'_>) -> Result<bool, Error> {
        self.check_key(key)?;
        let rk = self.redis_key(key);
        if let Some(c) = &self.inner.cache {
            c.map.lock().remove(&rk);
        }
        let n: i64 = self
            .inner
            .scripts
            .remove
            .key(&rk)
            .key(Self::channel(&rk))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
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
        let reply: Vec<Value> = self
            .inner
            .scripts
            .cas
            .key(self.redis_key(key))
            .arg(op)
            .arg(version)
            .arg(value)
            .arg(write.ttl.map_or(0, ms))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        match code(&reply)? {
            1 => Ok(CasOutcome::Applied {
                version: opt_uint(&reply, 1)?,
            }),
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
        let reply: Vec<Value> = self
            .inner
            .scripts
            .put_pending
            .key(self.redis_key(key))
            .arg(payload)
            .arg(ttl_ms)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
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
        let reply: Vec<Value> = self
            .inner
            .scripts
            .take_pending
            .key(self.redis_key(key))
            .arg(lease_ms)
            .arg(ms(self.cfg().lease_retention))
            .arg(Fingerprint::NONE.as_bytes().as_slice())
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        match code(&reply)? {
            0 => Ok(Take::NotFound),
            1 => Ok(Take::Acquired {
                lease: Lease::new(
                    key.to_owned(),
                    uint(&reply, 1)?,
                    Timestamp::from_millis(uint(&reply, 2)?),
                    Fingerprint::NONE,
                    uint(&reply, 3)? == 1,
                ),
                payload: bytes(&reply, 4)?,
            }),
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

/// Recently seen completed records, by Redis key (see [`RedisStoreBuilder::cache`]).
struct Cache {
    entries: usize,
    max_age: Duration,
    map: Mutex<HashMap<Vec<u8>, (Instant, Completed)>>,
}

impl Cache {
    fn get(&self, key: &[u8]) -> Option<Completed> {
        let mut map = self.map.lock();
        let (at, done) = map.get(key)?;
        let now_ms = crate::clock::Clock::now(&crate::clock::SystemClock).as_millis();
        if at.elapsed() > self.max_age || done.expires_at.as_millis() <= now_ms {
            map.remove(key);
            return None;
        }
        Some(done.clone())
    }

    fn put(&self, key: Vec<u8>, done: &Completed) {
        let mut map = self.map.lock();
        if map.len() >= self.entries {
            // Full: drop what is too old; if that frees nothing, start over (a cache miss
            // only costs a round trip).
            let max_age = self.max_age;
            map.retain(|_, (at, _)| at.elapsed() <= max_age);
            if map.len() >= self.entries {
                map.clear();
            }
        }
        map.insert(key, (Instant::now(), done.clone()));
    }
}

/// Subscriptions to completion channels, shared by all waiters of one store: one pub/sub
/// connection, opened on first use and again after it fails.
struct Notifier {
    client: redis::Client,
    sink: tokio::sync::Mutex<Option<redis::aio::PubSubSink>>,
    waiters: Arc<Mutex<Waiters>>,
}

/// Per channel: how many waiters, and the signal they wait on.
type Waiters = HashMap<Vec<u8>, (usize, Arc<Notify>)>;

struct Watch {
    channel: Vec<u8>,
    notify: Arc<Notify>,
}

impl Notifier {
    /// Registers interest in `channel` and subscribes to it; `None` if pub/sub is unavailable
    /// (the caller then looks again on a short timer).
    async fn watch(&self, channel: &[u8]) -> Option<Watch> {
        let (first, notify) = {
            let mut w = self.waiters.lock();
            let e = w
                .entry(channel.to_vec())
                .or_insert_with(|| (0, Arc::new(Notify::new())));
            e.0 += 1;
            (e.0 == 1, e.1.clone())
        };
        let watch = Watch {
            channel: channel.to_vec(),
            notify,
        };
        let mut sink = self.sink.lock().await;
        if sink.is_none() {
            *sink = self.connect().await;
        }
        let ok = match sink.as_mut() {
            Some(s) if first => s.subscribe(channel).await.is_ok(),
            Some(_) => true,
            None => false,
        };
        if !ok {
            *sink = None;
            drop(sink);
            self.unwatch(Some(watch)).await;
            return None;
        }
        Some(watch)
    }

    async fn unwatch(&self, watch: Option<Watch>) {
        let Some(watch) = watch else { return };
        // The sink lock is taken first and held through the unsubscribe: a waiter that
        // registers meanwhile finds the count at zero and subscribes again only after we have
        // unsubscribed, so its subscription is never undone by ours.
        let mut sink = self.sink.lock().await;
        let last = {
            let mut w = self.waiters.lock();
            match w.get_mut(&watch.channel) {
                Some(e) if e.0 > 1 => {
                    e.0 -= 1;
                    false
                }
                Some(_) => {
                    w.remove(&watch.channel);
                    true
                }
                None => false,
            }
        };
        if let (true, Some(s)) = (last, sink.as_mut()) {
            let _ = s.unsubscribe(&watch.channel).await;
        }
    }

    async fn connect(&self) -> Option<redis::aio::PubSubSink> {
        let pubsub = self.client.get_async_pubsub().await.ok()?;
        let (sink, mut stream) = pubsub.split();
        let waiters: Vec<Vec<u8>> = self.waiters.lock().keys().cloned().collect();
        let mut sink = sink;
        for ch in waiters {
            sink.subscribe(ch).await.ok()?;
        }
        // The notifier lives as long as the store; the task ends with the connection.
        let weak = Arc::downgrade(&self.waiters);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(msg) = stream.next().await {
                let Some(waiters) = weak.upgrade() else { break };
                let Ok(channel) = msg.get_channel::<Vec<u8>>() else {
                    continue;
                };
                if let Some((_, n)) = waiters.lock().get(&channel) {
                    n.notify_waiters();
                }
            }
            // The connection is gone: wake everyone so they look again.
            if let Some(waiters) = weak.upgrade() {
                for (_, n) in waiters.lock().values() {
                    n.notify_waiters();
                }
            }
        });
        Some(sink)
    }
}

fn unavailable(e: redis::RedisError) -> Error {
    Error::Unavailable {
        reason: e.to_string(),
        source: Some(crate::error::Cause::new(e)),
    }
}

fn protocol(what: &str) -> Error {
    Error::Unavailable {
        reason: format!("unexpected reply from Redis: {what}"),
        source: None,
    }
}

/// A versioned write as the scripts take it: op (`a` put if absent, `s` set if version, `d`
/// delete if version), the expected version, the new value.
fn cas_args(op: &CasOp) -> (&'static str, u64, &[u8]) {
    match op {
        CasOp::PutIfAbsent(v) => ("a", 0, v),
        CasOp::SetIfVersion { version, value } => ("s", *version, value),
        CasOp::DeleteIfVersion { version } => ("d", *version, &[]),
    }
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn code(reply: &[Value]) -> Result<i64, Error> {
    reply
        .first()
        .and_then(int_of)
        .ok_or_else(|| protocol("no status"))
}

fn uint(reply: &[Value], i: usize) -> Result<u64, Error> {
    reply
        .get(i)
        .and_then(int_of)
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| protocol("expected a number"))
}

fn opt_uint(reply: &[Value], i: usize) -> Result<Option<u64>, Error> {
    let v = reply
        .get(i)
        .and_then(int_of)
        .ok_or_else(|| protocol("expected a number"))?;
    Ok(u64::try_from(v).ok())
}

fn bytes(reply: &[Value], i: usize) -> Result<Vec<u8>, Error> {
    match reply.get(i) {
        Some(Value::BulkString(b)) => Ok(b.clone()),
        Some(Value::SimpleString(s)) => Ok(s.clone().into_bytes()),
        Some(Value::Nil) | None => Ok(Vec::new()),
        Some(_) => Err(protocol("expected bytes")),
    }
}

fn kind_from(k: &[u8]) -> RecordKind {
    match k {
        b"v" => RecordKind::Value,
        b"p" | b"ip" => RecordKind::Pending,
        _ => RecordKind::Idempotency,
    }
}

fn wrong_kind(expected: RecordKind, reply: &[Value]) -> Error {
    match bytes(reply, 1) {
        Ok(k) => Error::WrongKind {
            expected,
            found: kind_from(&k),
        },
        Err(e) => e,
    }
}

fn fingerprint_of(b: &[u8]) -> Fingerprint {
    <[u8; 16]>::try_from(b).map_or(Fingerprint::NONE, Fingerprint::from_bytes)
}

fn snapshot_of(f: &HashMap<String, Vec<u8>>) -> Result<Option<Snapshot>, Error> {
    let Some(kind) = f.get("k") else {
        return Ok(None);
    };
    let num = |name: &str| -> Result<u64, Error> {
        f.get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| protocol("a record field is missing"))
    };
    let raw = |name: &str| f.get(name).cloned().unwrap_or_default();
    Ok(Some(match kind.as_slice() {
        b"i" | b"ip" => Snapshot::InFlight {
            token: num("t")?,
            deadline: Timestamp::from_millis(num("d")?),
            fingerprint: fingerprint_of(&raw("f")),
            pending: kind.as_slice() == b"ip",
        },
        b"c" => Snapshot::Completed(Completed {
            response: raw("r"),
            fingerprint: fingerprint_of(&raw("f")),
            completed_at: Timestamp::from_millis(num("ca")?),
            expires_at: Timestamp::from_millis(num("ea")?),
        }),
        b"p" => Snapshot::Pending {
            payload: raw("r"),
            expires_at: Timestamp::from_millis(num("ea")?),
        },
        b"v" => Snapshot::Value(Versioned {
            version: num("t")?,
            value: raw("r"),
            expires_at: match num("ea")? {
                0 => None,
                at => Some(Timestamp::from_millis(at)),
            },
        }),
        _ => return Err(protocol("unknown record kind")),
    }))
}

/// The id of a key (after the prefix: `{tag}`, scope length, scope, id) if its scope is
/// `scope`. The tag is the id or a part of it, so it has no `}` of its own unless it is the
/// whole id; the length byte settles where the scope starts.
fn split_key<'a>(rest: &'a [u8], scope: &[u8]) -> Option<&'a [u8]> {
    let rest = rest.strip_prefix(b"{")?;
    // Try every `}`: an id used whole as its own tag may contain braces.
    for (i, _) in rest.iter().enumerate().filter(|(_, b)| **b == b'}') {
        let after = &rest[i + 1..];
        let (&len, body) = after.split_first()?;
        let len = usize::from(len);
        if body.len() > len && &body[..len] == scope {
            let id = &body[len..];
            if hash_tag(id) == &rest[..i] {
                return Some(id);
            }
        }
    }
    None
}

/// Redis Cluster's hash tag rule: the bytes between the first `{` and the next `}`, if not
/// empty; otherwise the whole id.
fn hash_tag(id: &[u8]) -> &[u8] {
    let Some(open) = id.iter().position(|&b| b == b'{') else {
        return id;
    };
    match id[open + 1..].iter().position(|&b| b == b'}') {
        Some(len) if len > 0 => &id[open + 1..open + 1 + len],
        _ => id,
    }
}

/// The cluster slot of a tag: CRC16/XMODEM mod 16384 (what Redis Cluster computes; our keys
/// always carry an explicit `{tag}`).
fn slot(tag: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_and_slots() {
        assert_eq!(hash_tag(b"order-17"), b"order-17");
        assert_eq!(hash_tag(b"pay{order-17}"), b"order-17");
        assert_eq!(hash_tag(b"{}x"), b"{}x");
        assert_eq!(hash_tag(b"a{b"), b"a{b");
        // Values from the Redis Cluster specification (CLUSTER KEYSLOT).
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"foo"), 12182);
    }

    #[test]
    fn keys_split_back_into_scope_and_id() {
        let key = |scope: &[u8], id: &[u8]| {
            let mut k = b"{".to_vec();
            k.extend_from_slice(hash_tag(id));
            k.push(b'}');
            k.push(scope.len() as u8);
            k.extend_from_slice(scope);
            k.extend_from_slice(id);
            k
        };
        for (scope, id) in [
            (&b"orders"[..], &b"o-1"[..]),
            (b"orders", b"pay{o-1}x"),
            (b"s}", b"a}b"),
            (b"", b"{}"),
        ] {
            assert_eq!(
                split_key(&key(scope, id), scope),
                Some(id),
                "{scope:?} {id:?}"
            );
            assert_eq!(split_key(&key(scope, id), b"other"), None);
        }
    }
}
