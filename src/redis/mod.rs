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
//! records whose ids share a `{tag}` land in one slot. On a cluster ([`RedisStore::cluster`])
//! a completion whose writes span slots is refused with [`Error::InvalidBatch`] before
//! anything is sent: never a partial write.
//!
//! **Redis Cluster.** [`RedisStore::cluster`] takes seed nodes and uses the redis crate's
//! cluster client: each script goes to the master of its key's slot; `MOVED`, `ASK` and
//! failovers are followed, and a script is sent again only when Redis proved it did not run
//! (a lost answer is [`Error::Unavailable`], never a second run that would answer for the
//! first). Waiters are woken through sharded pub/sub
//! (`SSUBSCRIBE`, Redis 7). Replication is asynchronous, so a failover can lose the last
//! writes a master acknowledged; [`RedisStoreBuilder::wait_for_replicas`] makes every
//! acknowledged change wait until replicas have it (`WAIT`). What each setting survives:
//!
//! | setting | a master's process dies, its replica takes over |
//! |---|---|
//! | default (no wait) | changes of the last moments may be lost: a completed request may run again, a lease may vanish and a retry run beside its holder |
//! | `wait_for_replicas(1, t)` | every change a caller was told of is on at least one replica, the one a failover promotes when it is the only one (with several, Redis promotes the most up to date) |
//!
//! Neither survives losing a master and all its replicas at once; Redis persistence
//! (`appendonly`, `appendfsync`) on the servers is what covers a power cut.
//!
//! ```no_run
//! # async fn run() -> Result<(), idemkv::Error> {
//! use std::time::Duration;
//!
//! let store = idemkv::redis::RedisStore::cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
//!     .wait_for_replicas(1, Duration::from_millis(50))
//!     .connect()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! **TLS** (feature `redis-tls`): `rediss://` URLs; [`RedisStoreBuilder::tls_root_cert`] for a
//! private CA and [`RedisStoreBuilder::tls_client_cert`] for mutual TLS.
//!
//! Code map: this module holds the store's state and its helpers; `builder` (the settings
//! and `connect`), `ops` (the trait's
//! operations), `scripts` (the Lua and the record layout), `replies` (reading script replies),
//! `notifier` (pub/sub wake-ups), `cache` (completed records kept locally), `keys` (hash tags,
//! slots), `conn` (one server or a cluster, and TLS). The children read this module's items
//! through `use super::*`.

mod builder;
mod cache;
mod call;
mod conn;
mod keys;
mod notifier;
mod ops;
mod replies;
mod scripts;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
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

pub use builder::RedisStoreBuilder;
use cache::Cache;
use call::Call;
use conn::{Conn, Tls, Topology};
pub use keys::colocated_id;

use builder::client_now;
use keys::{hash_tag, slot, split_key};
use notifier::Notifier;
use replies::*;

/// A record's notification channel is this, then the record's Redis key: completions and
/// releases publish there (the scripts name it from their key), waiters subscribe there.
/// Plain text: the scripts embed it in a Lua string.
const CHANNEL_PREFIX: &str = "__idemkv_done__:";

/// The idempotency store on Redis; see the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.cfg.prefix)
            .field("topology", &self.inner.cfg.topology)
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
    /// Reads, and with no replica wait, everything.
    conn: Conn,
    /// With a replica wait: the connections the scripts and their `WAIT`s take turns on.
    waits: Vec<Conn>,
    next_wait: AtomicUsize,
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

    /// A builder for a store at `url` (`redis://host:port/db`, `rediss://…` with feature
    /// `redis-tls`, `unix://…`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        Self::with_topology(Topology::Single(url.into()))
    }

    /// A builder for a store on a Redis Cluster, found through `nodes` (seed URLs,
    /// `redis://host:port`; any reachable one will do, the client learns the rest). See the
    /// [module docs](self) for the cluster's guarantees.
    pub fn cluster<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> RedisStoreBuilder {
        let mut b = Self::with_topology(Topology::Cluster(
            nodes.into_iter().map(Into::into).collect(),
        ));
        b.single_slot_batches = true;
        b
    }

    fn with_topology(topology: Topology) -> RedisStoreBuilder {
        RedisStoreBuilder {
            topology,
            tls: Tls::default(),
            prefix: "idemkv:".into(),
            single_slot_batches: false,
            replicas: None,
            wait_connections: 8,
            client_clock: None,
            default_ttl: DAY,
            pending_ttl: DAY,
            lease_retention: DAY,
            max_key_len: 255,
            max_value_len: 1 << 20,
            max_batch: 64,
            timeout: Duration::from_secs(2),
            cache: None,
            allow_eviction: false,
        }
    }

    fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    /// The connection a script goes out on: with a replica wait, the next of `waits` in
    /// turn (a `WAIT` blocks its connection); otherwise the one connection.
    fn script_conn(&self) -> Conn {
        let waits = &self.inner.waits;
        if waits.is_empty() {
            return self.conn();
        }
        let i = self
            .inner
            .next_wait
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        waits[i % waits.len()].clone()
    }

    /// A script invocation with the client clock's arguments appended (its last three
    /// ARGV, read by the script's prelude), when the store uses one.
    fn stamp<'a, 'b>(&self, inv: &'a mut Call<'b>) -> &'a mut Call<'b> {
        if let Some(skew) = self.cfg().client_clock {
            let (now, us) = client_now();
            inv.arg(now).arg(us).arg(ms(skew));
        }
        inv
    }

    /// Runs `call` on the master of its keys and reads its reply. With
    /// [`RedisStoreBuilder::wait_for_replicas`], a `WAIT` follows it in the same pipeline (so
    /// on the same node and connection, after it: see `call.rs`), whatever the script did: a
    /// caller is told nothing (a replay, a holder's deadline, a conflict's version) that a
    /// failover could take back. Too few replicas in time is [`Error::Unavailable`].
    async fn eval<T: redis::FromRedisValue>(&self, call: &Call<'_>) -> Result<T, Error> {
        let mut cmds = vec![call.evalsha()];
        let wait = self.cfg().replicas;
        if let Some((replicas, timeout)) = wait {
            let mut cmd = redis::cmd("WAIT");
            cmd.arg(replicas).arg(ms(timeout));
            cmds.push(cmd);
        }
        let health = &self.inner.health;
        let mut conn = self.script_conn();
        let mut loaded = false;
        loop {
            let mut replies = conn.send(&cmds).await.observed(health)?;
            if replies.len() != cmds.len() {
                return Err(protocol("a pipeline's reply count"));
            }
            let waited = wait.and_then(|_| replies.pop());
            let reply = replies.pop().ok_or_else(|| protocol("EVALSHA"))?;
            match reply {
                // The node does not have the script yet (a restart, a new node): load it, once.
                Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript) => {
                    if loaded {
                        return Err(redis::RedisError::from(e)).observed(health);
                    }
                    call.script.load_async(&mut conn).await.observed(health)?;
                    loaded = true;
                }
                Value::ServerError(e) => return Err(redis::RedisError::from(e)).observed(health),
                reply => {
                    if let (Some((replicas, timeout)), Some(waited)) = (wait, waited) {
                        enough_replicas(&waited, replicas, timeout)?;
                    }
                    return redis::from_redis_value(reply).map_err(|e| protocol(&e.to_string()));
                }
            }
        }
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
    /// prefix with `SCAN` (O(keys); on a cluster, on every master): for tools and examples,
    /// not request paths.
    pub async fn scan(&self, scope: &[u8]) -> Result<Vec<(Vec<u8>, Snapshot)>, Error> {
        let mut conn = self.conn();
        let mut out = Vec::new();
        for node in conn.masters().await.observed(&self.inner.health)? {
            let node = node.as_ref().map(|(h, p)| (h.as_str(), *p));
            self.scan_node(&mut conn, node, scope, &mut out).await?;
        }
        Ok(out)
    }

    async fn scan_node(
        &self,
        conn: &mut Conn,
        node: Option<(&str, u16)>,
        scope: &[u8],
        out: &mut Vec<(Vec<u8>, Snapshot)>,
    ) -> Result<(), Error> {
        let prefix = self.cfg().prefix.as_bytes();
        let mut pattern = prefix.to_vec();
        pattern.extend_from_slice(b"{*");
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let reply = conn.on_node(node, cmd).await.observed(&self.inner.health)?;
            let (next, keys): (u64, Vec<Vec<u8>>) =
                redis::from_redis_value(reply).map_err(|e| protocol(&e.to_string()))?;
            for k in keys {
                let Some(id) = split_key(&k[prefix.len()..], scope) else {
                    continue;
                };
                let fields: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
                    .arg(&k)
                    .query_async(conn)
                    .await
                    .observed(&self.inner.health)?;
                if let Some(snap) = snapshot_of(&fields)? {
                    out.push((id.to_vec(), snap));
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }

    fn channel(key: &[u8]) -> Vec<u8> {
        let mut c = CHANNEL_PREFIX.as_bytes().to_vec();
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
        if self.cfg().single_slot_batches {
            // The slots Redis computes from the keys as sent (`{tag}` as we build it).
            let slot_of = |k: Key<'_>| slot(hash_tag(&self.redis_key(k)));
            let slot = slot_of(lease.key());
            if writes.iter().any(|w| slot_of(w.key.as_key()) != slot) {
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
            .eval(
                self.stamp(
                    Call::new(&self.inner.scripts.begin)
                        .key(&rk)
                        .arg(fingerprint.as_bytes().as_slice())
                        .arg(lease_ms)
                        .arg(ms(self.cfg().lease_retention)),
                ),
            )
            .await?;
        match code(&reply)? {
            1 => {
                let lease = Lease::new(
                    key.to_owned(),
                    uint(&reply, 1)?,
                    Timestamp::from_millis(uint(&reply, 2)?),
                    fingerprint,
                    uint(&reply, 3)? == 1,
                );
                Ok(Begin::Acquired(lease))
            }
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
