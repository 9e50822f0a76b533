//! The builder of a [`RedisStore`]: its settings, and `connect`, which checks them, opens the
//! connection (one server or a cluster), and loads the scripts for that topology and clock.

use super::*;

/// This process's clock: ms and µs since the epoch.
pub(super) fn client_now() -> (u64, u64) {
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

/// What a server's `INFO memory` says about evicting keys: its `maxmemory` (0: no limit) and
/// its `maxmemory_policy`; `None` if the text does not say.
fn eviction_of(info: &str) -> Option<(u64, &str)> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
    };
    Some((
        field("maxmemory")?.parse().ok()?,
        field("maxmemory_policy")?,
    ))
}

/// Refuses a server (on a cluster: any master) that may evict keys, unless `allowed` (then it
/// is logged): with `maxmemory` set and a policy other than `noeviction`, Redis drops keys
/// under memory pressure. Every record has an expiry, so even the `volatile-*` policies pick
/// them. An evicted lease or completed record is a key that runs again. A server that does
/// not answer `INFO` (an ACL without it, a proxy) cannot be checked: that is logged too.
async fn check_eviction(conn: &Conn, allowed: bool) -> Result<(), Error> {
    let mut c = conn.clone();
    let nodes = c.masters().await.map_err(unavailable)?;
    for node in nodes {
        let at = node.as_ref().map_or_else(
            || "the Redis server".to_owned(),
            |(h, p)| format!("{h}:{p}"),
        );
        let reply = c
            .on_node(
                node.as_ref().map(|(h, p)| (h.as_str(), *p)),
                redis::cmd("INFO").arg("memory").clone(),
            )
            .await;
        let info = match reply {
            Ok(v) => redis::from_redis_value::<String>(v).ok(),
            // Refused (`NOPERM` from an ACL, a proxy that does not know `INFO`): not checked.
            Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => None,
            Err(e) => return Err(unavailable(e)),
        };
        match info.as_deref().and_then(eviction_of) {
            Some((limit, policy)) if limit > 0 && policy != "noeviction" => {
                let why = format!(
                    "{at} may evict keys (maxmemory {limit} bytes, maxmemory-policy {policy}): an evicted lease or recorded response lets a retry run again. Set maxmemory-policy noeviction (a full server then refuses writes, which the store reports as errors), or accept the risk with RedisStoreBuilder::allow_eviction(true)"
                );
                if !allowed {
                    return Err(Error::InvalidConfig { reason: why });
                }
                tracing::warn!(target: "idemkv::redis", reason = %why, "eviction allowed");
            }
            Some(_) => {}
            None => {
                tracing::warn!(target: "idemkv::redis", server = %at, "could not read INFO memory; whether the server evicts keys was not checked");
            }
        }
    }
    Ok(())
}

/// Configures a [`RedisStore`]; from [`RedisStore::builder`].
#[derive(Clone, Debug)]
pub struct RedisStoreBuilder {
    pub(super) topology: Topology,
    pub(super) tls: Tls,
    pub(super) prefix: String,
    pub(super) single_slot_batches: bool,
    pub(super) replicas: Option<(u32, Duration)>,
    pub(super) wait_connections: usize,
    pub(super) client_clock: Option<Duration>,
    pub(super) default_ttl: Duration,
    pub(super) pending_ttl: Duration,
    pub(super) lease_retention: Duration,
    pub(super) max_key_len: usize,
    pub(super) max_value_len: usize,
    pub(super) max_batch: usize,
    pub(super) timeout: Duration,
    pub(super) cache: Option<(usize, Duration)>,
    pub(super) allow_eviction: bool,
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
    /// failover does not lose it (see the [module docs](super) for what each setting
    /// survives). If fewer have it within `timeout`, the operation fails with
    /// [`Error::Unavailable`]; the change was made on the master and may or may not survive,
    /// so the caller treats the outcome as unknown and retries (a retry of a completed request
    /// replays it). The `WAIT` follows every script, in one pipeline with it (same node, same
    /// connection), so a replay or a conflict is only reported once replicated too. Costs a
    /// replication round trip per call; a `WAIT` blocks its connection meanwhile, so scripts
    /// take turns over [`wait_connections`](Self::wait_connections) connections.
    /// `timeout` must be shorter than [`timeout`](Self::timeout).
    /// `replicas == 0` turns it off (the default).
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// With [`wait_for_replicas`](Self::wait_for_replicas): how many connections (to each
    /// node, on a cluster) carry the changes and their `WAIT`s; 8 by default. A `WAIT` holds
    /// the connection it runs on until the replicas answer (Redis reads nothing more from a
    /// blocked client), so with one connection every change behind it would wait too; with
    /// `n`, up to `n` waits run side by side. Reads keep a connection of their own.
    /// `n == 0` is refused by `connect` ([`Error::InvalidConfig`]).
    pub fn wait_connections(mut self, n: usize) -> Self {
        self.wait_connections = n;
        self
    }

    /// The connections made besides the one for reads.
    fn extra_connections(&self) -> usize {
        if self.replicas.is_some() {
            self.wait_connections
        } else {
            0
        }
    }

    /// Connect to a server that may evict keys under memory pressure (default: refuse).
    ///
    /// `connect` reads `INFO memory` from the server (on a cluster: from every master) and
    /// refuses, with [`Error::InvalidConfig`], one with `maxmemory` set and a
    /// `maxmemory-policy` other than `noeviction`. Every record carries an expiry, so the
    /// `volatile-*` policies pick them as readily as the `allkeys-*` ones. An evicted lease
    /// lets a second attempt run while the first still does; an evicted completed record lets
    /// a retry run again. With this set, such a server is accepted and a warning is logged.
    /// The check is made once, at `connect`: a later `CONFIG SET` is not seen.
    pub fn allow_eviction(mut self, yes: bool) -> Self {
        self.allow_eviction = yes;
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
        if self.replicas.is_some() && self.wait_connections == 0 {
            return Err(Error::InvalidConfig {
                reason: "wait_connections must be at least 1".into(),
            });
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
        let (mut conns, source, publish) = match &self.topology {
            Topology::Single(url) => {
                let client = self.tls.client(url).map_err(bad_url)?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(2);
                let mut conns = Vec::with_capacity(1 + self.extra_connections());
                for _ in 0..=self.extra_connections() {
                    let c = ConnectionManager::new_with_config(client.clone(), config.clone())
                        .await
                        .map_err(unavailable)?;
                    conns.push(Conn::Single(c));
                }
                (conns, notifier::Source::Single(client), "PUBLISH")
            }
            Topology::Cluster(nodes) => {
                if nodes.is_empty() {
                    return Err(Error::InvalidConfig {
                        reason: "a Redis Cluster needs at least one seed node".into(),
                    });
                }
                // Commands: the client's own retries are off (it would resend a script whose
                // answer was lost, and the second run would answer for the first); `call.rs`
                // follows redirects and resends what provably did not run, within the timeout.
                let client = self
                    .tls
                    .cluster_builder(nodes, self.timeout)
                    .retries(0)
                    .overall_response_timeout(Some(self.timeout))
                    .build()
                    .map_err(bad_url)?;
                let mut conns = Vec::with_capacity(1 + self.extra_connections());
                for _ in 0..=self.extra_connections() {
                    let c = client.get_async_connection().await.map_err(unavailable)?;
                    conns.push(Conn::Cluster(c, self.timeout));
                }
                // Pub/sub: RESP3 pushes (sharded subscriptions need them) into the waiters.
                let pubsub = self
                    .tls
                    .cluster_builder(nodes, self.timeout)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(notifier::cluster_pushes(Arc::downgrade(&waiters)))
                    .build()
                    .map_err(bad_url)?;
                (conns, notifier::Source::Cluster(pubsub), "SPUBLISH")
            }
        };
        // The first connection is the one for reads; the others (with a replica wait) carry
        // the scripts and their `WAIT`s.
        let waits = conns.split_off(1);
        let conn = conns.pop().ok_or_else(|| Error::InvalidConfig {
            reason: "no connection was made".into(),
        })?;
        if let Some(skew) = self.client_clock {
            check_skew(&conn, skew).await?;
        }
        check_eviction(&conn, self.allow_eviction).await?;
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
                waits,
                next_wait: AtomicUsize::new(0),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_settings_are_read_from_info_memory() {
        let info = "# Memory\r\nused_memory:1024\r\nmaxmemory:104857600\r\nmaxmemory_human:100.00M\r\nmaxmemory_policy:allkeys-lru\r\n";
        assert_eq!(eviction_of(info), Some((104_857_600, "allkeys-lru")));
        let unlimited = "maxmemory:0\nmaxmemory_policy:volatile-lru\n";
        assert_eq!(eviction_of(unlimited), Some((0, "volatile-lru")));
        // `maxmemory_human` must not be read as `maxmemory`, nor a missing field guessed.
        assert_eq!(
            eviction_of("maxmemory_human:1M\nmaxmemory_policy:noeviction"),
            None
        );
        assert_eq!(eviction_of("maxmemory:10\n"), None);
        assert_eq!(
            eviction_of("maxmemory:ten\nmaxmemory_policy:noeviction"),
            None
        );
    }

    /// Settings that cannot work are refused before anything is sent (port 1: nothing
    /// listens there, so reaching the server would be an `Unavailable`, not this).
    #[tokio::test]
    async fn a_replica_wait_needs_a_connection_and_a_wait_shorter_than_the_timeout() {
        let refused = |r: Result<RedisStore, Error>| match r {
            Err(Error::InvalidConfig { reason }) => reason,
            Err(other) => panic!("expected InvalidConfig, got {other:?}"),
            Ok(_) => panic!("expected InvalidConfig, got a store"),
        };
        let base = || RedisStore::builder("redis://127.0.0.1:1");
        let none = base()
            .wait_for_replicas(1, Duration::from_millis(50))
            .wait_connections(0)
            .connect()
            .await;
        assert!(refused(none).contains("wait_connections"));
        let long = base()
            .wait_for_replicas(1, Duration::from_secs(3))
            .timeout(Duration::from_secs(2))
            .connect()
            .await;
        assert!(refused(long).contains("shorter"));
    }
}
