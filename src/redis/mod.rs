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
//! cluster client: each script goes to the master of its key's slot, and `MOVED`, `ASK` and
//! failovers are followed by the client. Waiters are woken through sharded pub/sub
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
//! Code map: this module holds the builder and the store's state; `ops` (the trait's
//! operations), `scripts` (the Lua and the record layout), `replies` (reading script replies),
//! `notifier` (pub/sub wake-ups), `cache` (completed records kept locally), `keys` (hash tags,
//! slots), `conn` (one server or a cluster, and TLS). The children read this module's items
//! through `use super::*`.

mod cache;
mod conn;
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
use conn::{Conn, Tls, Topology};
use keys::{hash_tag, slot, split_key};
use notifier::Notifier;
use replies::*;

/// `id` with the hash tag of `anchor` appended (`<id>{<tag>}`), so that a record under it lands
/// in the same Redis Cluster slot as a record under `anchor`, and the two can be written in
/// one completion batch. `None` when that cannot be done: `id` has a `{` of its own, or
/// `anchor`'s tag has a `}` (an anchor like `a}b` with no `{…}` is its own tag).
///
/// ```
/// let order = idemkv::redis::colocated_id("7d3f", "9b1c-retry-key").unwrap();
/// assert_eq!(order, "7d3f{9b1c-retry-key}");
/// assert_eq!(idemkv::redis::colocated_id("7d3f", "pay{o-17}").unwrap(), "7d3f{o-17}");
/// assert_eq!(idemkv::redis::colocated_id("x{y", "k"), None);
/// ```
pub fn colocated_id(id: &str, anchor: &str) -> Option<String> {
    let tag = hash_tag(anchor.as_bytes());
    if id.contains('{') || tag.contains(&b'}') {
        return None;
    }
    // The tag is bounded by ASCII braces (or is the whole anchor), so it is UTF-8.
    let tag = std::str::from_utf8(tag).ok()?;
    Some(format!("{id}{{{tag}}}"))
}

/// This process's clock: ms and µs since the epoch.
fn client_now() -> (u64, u64) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_millis() as u64, d.as_micros() as u64)
}

/// With a client clock: refuses to start when this clock and the server's differ by more
/// than `max_skew` (the server's `TIME` is compared with the middle of its round trip).
async fn check_skew(conn: &Conn, max_skew: Duration) -> Result<(), Error> {
    let mut c = conn.clone();
    let before = client_now().1;
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut c)
        .await
        .map_err(unavailable)?;
    let after = client_now().1;
    let server = secs * 1_000_000 + micros;
    let mid = before / 2 + after / 2;
    let skew = Duration::from_micros(server.abs_diff(mid));
    if skew > max_skew {
        return Err(Error::InvalidConfig {
            reason: format!(
                "this clock and the Redis server's differ by {skew:?}, more than the client clock's bound of {max_skew:?}"
            ),
        });
    }
    Ok(())
}

/// Configures a [`RedisStore`]; from [`RedisStore::builder`].
#[derive(Clone, Debug)]
pub struct RedisStoreBuilder {
    topology: Topology,
    tls: Tls,
    prefix: String,
    single_slot_batches: bool,
    replicas: Option<(u32, Duration)>,
    client_clock: Option<Duration>,
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

    /// Refuse completion batches whose keys map to different Redis Cluster slots, on a
    /// single URL too: for a proxy in front of a cluster. Always on for a store made by
    /// [`RedisStore::cluster`]; off by default for one server, which accepts any batch.
    pub fn single_slot_batches(mut self, on: bool) -> Self {
        self.single_slot_batches = on;
        self
    }

    /// After every change a caller is told of (an acquired lease, a renewal, a completion and
    /// its batch, a release, a compare-and-set, a removal, a pending request stored or taken),
    /// wait until `replicas` replicas of the master have it (`WAIT replicas timeout`), so a
    /// failover does not lose it (see the [module docs](self) for what each setting
    /// survives). If fewer have it within `timeout`, the operation fails with
    /// [`Error::Unavailable`]; the change was made on the master and may or may not survive,
    /// so the caller treats the outcome as unknown and retries (a retry of a completed request
    /// replays it). Costs a replication round trip per change, and `WAIT` holds the master's
    /// connection meanwhile. `timeout` must be shorter than [`timeout`](Self::timeout).
    /// `replicas == 0` turns it off (the default).
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// Scripts take the time from this process's clock instead of calling the server's
    /// `TIME`, which costs a third of a begin's server time (see DESIGN.md, "What was
    /// measured"). Every process sharing the store must then keep its clock within
    /// `max_skew` of the others (NTP does, by milliseconds): a lease is taken over only once
    /// it is past its deadline by more than `max_skew`, so a process whose clock runs ahead
    /// by up to that much never takes over a live holder; TTLs shift by the skew. `connect`
    /// compares this clock with the server's once and refuses to start (with
    /// [`Error::InvalidConfig`]) when they differ by more than `max_skew`. Leases should be
    /// well above `max_skew`. Off by default (server time: no assumption about clocks).
    pub fn client_clock(mut self, max_skew: Duration) -> Self {
        self.client_clock = Some(max_skew);
        self
    }

    /// Trust the CA certificate(s) in `pem` for `rediss://` servers, instead of the system's
    /// roots (feature `redis-tls`).
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root_cert = Some(pem.into());
        self
    }

    /// Present this client certificate and key (PEM) to `rediss://` servers: mutual TLS
    /// (feature `redis-tls`).
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub fn tls_client_cert(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client = Some((cert_pem.into(), key_pem.into()));
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
        if let Some((_, wait)) = self.replicas
            && wait >= self.timeout
        {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the replica wait ({wait:?}) must be shorter than the command timeout ({:?})",
                    self.timeout
                ),
            });
        }
        let bad_url = |e: redis::RedisError| Error::InvalidConfig {
            reason: format!("redis url: {e}"),
        };
        conn::install_tls_provider();
        let waiters: Arc<Mutex<notifier::Waiters>> = Arc::default();
        let (conn, source, publish) = match &self.topology {
            Topology::Single(url) => {
                let client = self.tls.client(url).map_err(bad_url)?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(2);
                let conn = ConnectionManager::new_with_config(client.clone(), config)
                    .await
                    .map_err(unavailable)?;
                (
                    Conn::Single(conn),
                    notifier::Source::Single(client),
                    "PUBLISH",
                )
            }
            Topology::Cluster(nodes) => {
                if nodes.is_empty() {
                    return Err(Error::InvalidConfig {
                        reason: "a Redis Cluster needs at least one seed node".into(),
                    });
                }
                // Commands: retried through `MOVED`, `ASK` and failovers for at most the
                // configured timeout in all (the default retry budget is much longer).
                let client = self
                    .tls
                    .cluster_builder(nodes)
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .overall_response_timeout(Some(self.timeout))
                    .build()
                    .map_err(bad_url)?;
                let conn = client.get_async_connection().await.map_err(unavailable)?;
                // Pub/sub: RESP3 pushes (sharded subscriptions need them) into the waiters.
                let pubsub = self
                    .tls
                    .cluster_builder(nodes)
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(notifier::cluster_pushes(Arc::downgrade(&waiters)))
                    .build()
                    .map_err(bad_url)?;
                (
                    Conn::Cluster(conn),
                    notifier::Source::Cluster(pubsub),
                    "SPUBLISH",
                )
            }
        };
        if let Some(skew) = self.client_clock {
            check_skew(&conn, skew).await?;
        }
        let client_clock = self.client_clock.is_some();
        let script = |body: &str| Script::new(&scripts::with_prelude(body, publish, client_clock));
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
                    source,
                    sink: tokio::sync::Mutex::new(None),
                    waiters,
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
    conn: Conn,
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
            client_clock: None,
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

    fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    /// A script invocation with the client clock's arguments appended (its last three
    /// ARGV, read by the script's prelude), when the store uses one.
    fn stamp<'a, 'b>(
        &self,
        inv: &'a mut redis::ScriptInvocation<'b>,
    ) -> &'a mut redis::ScriptInvocation<'b> {
        if let Some(skew) = self.cfg().client_clock {
            let (now, us) = client_now();
            inv.arg(now).arg(us).arg(ms(skew));
        }
        inv
    }

    /// With [`RedisStoreBuilder::wait_for_replicas`]: waits until the replicas of the master
    /// that owns `rk` have every write this store's connection sent it.
    async fn replicated(&self, rk: &[u8]) -> Result<(), Error> {
        let Some((replicas, timeout)) = self.cfg().replicas else {
            return Ok(());
        };
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(ms(timeout));
        let got = self
            .conn()
            .on_slot_master(slot(hash_tag(rk)), cmd)
            .await
            .observed(&self.inner.health)?;
        match int_of(&got) {
            Some(n) if n >= i64::from(replicas) => Ok(()),
            Some(n) => Err(Error::Unavailable {
                reason: format!(
                    "the change reached {n} of {replicas} replicas within {timeout:?}: it may not survive a failover"
                ),
                source: None,
            }),
            None => Err(protocol("WAIT")),
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
            .stamp(
                self.inner
                    .scripts
                    .begin
                    .prepare_invoke()
                    .key(&rk)
                    .arg(fingerprint.as_bytes().as_slice())
                    .arg(lease_ms)
                    .arg(ms(self.cfg().lease_retention)),
            )
            .invoke_async(&mut self.conn())
            .await
            .observed(&self.inner.health)?;
        match code(&reply)? {
            1 => {
                let lease = Lease::new(
                    key.to_owned(),
                    uint(&reply, 1)?,
                    Timestamp::from_millis(uint(&reply, 2)?),
                    fingerprint,
                    uint(&reply, 3)? == 1,
                );
                self.replicated(&rk).await?;
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
