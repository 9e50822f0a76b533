//! `RedisStore` on a real Redis Cluster of the test's own (three masters, a replica each, on
//! loopback; `tests/support/redis.rs`): waiters woken through sharded pub/sub on the key's
//! shard, batches kept in one slot, listings over every master, and a master SIGKILLed under
//! load: every operation either succeeds or fails with `Error::Unavailable`, every
//! acknowledged change survives the failover (`wait_for_replicas`), and the store works again
//! once the replica has taken over. The conformance suite runs on a cluster too
//! (`tests/conformance.rs`), and so does the two-replica HTTP test (`tests/redis_replicas.rs`).
//!
//! Required under `CI=true` (the support module fails the run if `redis-server` is missing).
#![cfg(all(feature = "redis", not(loom)))]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use idemkv::redis::{RedisStore, colocated_id};
use idemkv::{Begin, Error, Fingerprint, IdempotencyStore, Key, OwnedKey, Snapshot, Write};

#[path = "support/child.rs"]
mod child;
#[path = "support/redis.rs"]
mod redis_support;
use redis_support::Cluster;

const FP: Fingerprint = Fingerprint::from_bytes([3; 16]);

async fn acquire(s: &RedisStore, key: Key<'_>, lease: Duration) -> idemkv::Lease {
    match s.begin(key, FP, lease).await.unwrap() {
        Begin::Acquired(l) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_batches_and_listings_on_a_cluster() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let store = RedisStore::cluster(cluster.urls()).connect().await.unwrap();

    // 1. A waiter subscribes on the shard that owns the key, and the completion wakes it: the
    //    lease (30 s) outlives the wait (10 s), so only the notification can end it Completed.
    let key = OwnedKey::new("wait", "order-17");
    let lease = acquire(&store, key.as_key(), Duration::from_secs(30)).await;
    let waiter = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move {
            store
                .begin_wait(
                    key.as_key(),
                    FP,
                    Duration::from_secs(30),
                    Duration::from_secs(10),
                )
                .await
        })
    };
    let mut channel = b"__idemkv_done__:".to_vec();
    channel.extend_from_slice(&store.redis_key(key.as_key()));
    let channel = String::from_utf8(channel).unwrap();
    let shard = cluster.master_of(channel.as_bytes());
    let until = Instant::now() + Duration::from_secs(5);
    while !Cluster::cli(shard, &["pubsub", "shardchannels"]).contains(&channel) {
        assert!(
            Instant::now() < until,
            "the waiter never subscribed to {channel} on its shard (:{shard})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.complete(&lease, b"done", None, &[]).await.unwrap();
    match waiter.await.unwrap().unwrap() {
        Begin::Completed(c) => assert_eq!(c.response, b"done"),
        other => panic!("the waiter was not woken by the completion: {other:?}"),
    }

    // 2. A batch whose keys span slots is refused before anything is sent; a colocated id
    //    (`<id>{<tag>}`) lands in the request's slot and commits with it.
    let req = Key::new("orders", "retry-key-1");
    let lease = acquire(&store, req, Duration::from_secs(30)).await;
    let apart = OwnedKey::new("orders", "o-1");
    let refused = store
        .complete(
            &lease,
            b"r",
            None,
            &[Write::put_if_absent(apart.clone(), "x")],
        )
        .await;
    assert!(
        matches!(refused, Err(Error::InvalidBatch { .. })),
        "{refused:?}"
    );
    assert_eq!(store.get(apart.as_key()).await.unwrap(), None);
    let together = OwnedKey::new("orders", colocated_id("o-1", "retry-key-1").unwrap());
    store
        .complete(
            &lease,
            b"r",
            None,
            &[Write::put_if_absent(together.clone(), "x")],
        )
        .await
        .unwrap();
    assert!(matches!(
        store.get(together.as_key()).await.unwrap(),
        Some(Snapshot::Value(_))
    ));

    // 3. A listing walks every master: 30 values, spread over the three shards.
    let mut shards = std::collections::HashSet::new();
    for i in 0..30 {
        let k = OwnedKey::new("listed", format!("v-{i}"));
        shards.insert(cluster.master_of(&store.redis_key(k.as_key())));
        assert!(matches!(
            store.cas(&Write::put_if_absent(k, "1")).await.unwrap(),
            idemkv::CasOutcome::Applied { .. }
        ));
    }
    assert_eq!(shards.len(), 3, "the keys cover every shard");
    let mut ids: Vec<String> = store
        .scan(b"listed")
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| String::from_utf8(id).unwrap())
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..30).map(|i| format!("v-{i}")).collect();
    want.sort();
    assert_eq!(ids, want);

    // 4. `connect` asks every master whether it may evict keys: one that may is named.
    let (evicting, _) = masters(&cluster)[1].clone();
    for (name, value) in [("maxmemory", "1gb"), ("maxmemory-policy", "allkeys-lru")] {
        assert_eq!(
            Cluster::cli(evicting, &["config", "set", name, value]).trim(),
            "OK"
        );
    }
    let reason =
        redis_support::refused_for_eviction(RedisStore::cluster(cluster.urls()), "the cluster")
            .await;
    assert!(reason.contains(&format!(":{evicting} ")), "{reason}");
}

/// The cluster once it is whole again (`Cluster::wait_ok`, off the runtime's threads).
async fn settled(cluster: Cluster) -> Cluster {
    tokio::task::spawn_blocking(move || {
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    })
    .await
    .unwrap()
}

/// What one worker saw for one key.
#[derive(Debug)]
struct Outcome {
    key: OwnedKey,
    /// `begin` acquired (and, with the replica wait, the lease is on a replica).
    leased: bool,
    /// `complete` acknowledged.
    completed: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_fails_over_without_losing_acknowledged_changes() {
    let Some(mut cluster) = Cluster::start(3) else {
        return;
    };
    let store = RedisStore::cluster(cluster.urls())
        .wait_for_replicas(1, Duration::from_millis(500))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let lease_time = Duration::from_secs(1);
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (store, stop) = (store.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = OwnedKey::new("load", format!("w{w}-{n}"));
                n += 1;
                let mut o = Outcome {
                    key: key.clone(),
                    leased: false,
                    completed: false,
                };
                match store.begin(key.as_key(), FP, lease_time).await {
                    Ok(Begin::Acquired(lease)) => {
                        o.leased = true;
                        match store.complete(&lease, key.as_key().id(), None, &[]).await {
                            Ok(_) => o.completed = true,
                            Err(Error::Unavailable { .. }) => {}
                            Err(e) => panic!("complete of {key:?}: {e:?}"),
                        }
                    }
                    Ok(other) => panic!("a fresh key {key:?} answered {other:?}"),
                    Err(Error::Unavailable { .. }) => {}
                    Err(e) => panic!("begin of {key:?}: {e:?}"),
                }
                seen.push(o);
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The master of one of the load's slots.
    let victim = cluster.master_of(&store.redis_key(Key::new("load", "w0-0")));
    cluster.kill(victim);
    let killed_at = Instant::now();
    // The replica takes over (node timeout 1 s, then an election).
    let cluster = settled(cluster).await;
    eprintln!(
        "cluster_state:ok again {:?} after the kill",
        killed_at.elapsed()
    );
    // The promoted master has no replica yet: its changes cannot be replicated, so they fail
    // with Unavailable (never acknowledged unreplicated). Then the killed server comes back,
    // rejoins as its replica, and the shard is whole again.
    let mut cluster = cluster;
    let moved = cluster.master_of(&store.redis_key(Key::new("load", "w0-0")));
    assert_ne!(moved, victim, "the killed master's slots moved");
    // Keys in the moved slot (same tag). The client may first need a command or two to learn
    // the new master (also Unavailable); then the replica wait itself refuses. Each attempt
    // writes a fresh key: an attempt refused after its write reached the master (say, its
    // WAIT went out on the old topology) leaves the key there unacknowledged, so the same key
    // again would answer Conflict, which is a read and acknowledges nothing.
    let mut refused = None;
    for attempt in 0..10 {
        let probe = OwnedKey::new("load", format!("{{w0-0}}probe-{attempt}"));
        let sent = Instant::now();
        let answer = store.cas(&Write::put_if_absent(probe, "x")).await;
        eprintln!("probe {attempt}: answered after {:?}", sent.elapsed());
        match answer {
            Err(Error::Unavailable { reason, .. }) if reason.contains("replicas") => {
                refused = Some(reason);
                break;
            }
            Err(Error::Unavailable { reason, .. }) => {
                eprintln!("probe {attempt}: unavailable ({reason}), trying again");
            }
            other => panic!("a change on a shard without replicas was acknowledged: {other:?}"),
        }
    }
    eprintln!("on the shard without a replica: {refused:?}");
    assert!(refused.is_some(), "the replica wait never refused");
    cluster.restart(victim);
    let cluster = settled(cluster).await;
    eprintln!(
        "the killed server is back as a replica {:?} after the kill",
        killed_at.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap());
    }
    let failed = outcomes.iter().filter(|o| !o.completed).count();
    eprintln!(
        "{} operations, {failed} not acknowledged (failed with Unavailable)",
        outcomes.len()
    );
    assert!(
        outcomes.iter().filter(|o| o.completed).count() > 20,
        "the load ran: {outcomes:?}"
    );

    // After the failover the store works: fresh keys succeed (the client may need a command
    // or two to learn the new master).
    let until = Instant::now() + Duration::from_secs(15);
    let mut streak = 0;
    let mut i = 0;
    while streak < 20 {
        assert!(
            Instant::now() < until,
            "the store did not work again after the failover:\n{}",
            cluster.outputs()
        );
        let key = OwnedKey::new("after", format!("k-{i}"));
        i += 1;
        let ok = match store.begin(key.as_key(), FP, lease_time).await {
            Ok(Begin::Acquired(l)) => store.complete(&l, b"ok", None, &[]).await.is_ok(),
            _ => false,
        };
        streak = if ok { streak + 1 } else { 0 };
    }

    // Every acknowledged completion survived the failover, with its response; a lease that
    // was acknowledged but not completed is still there (in flight, or a takeover once it
    // expired): never gone, so a retry never runs as fresh beside its holder.
    tokio::time::sleep(lease_time).await;
    for o in &outcomes {
        let snap = store.get(o.key.as_key()).await.unwrap();
        if o.completed {
            match snap {
                Some(Snapshot::Completed(c)) => assert_eq!(c.response, o.key.as_key().id()),
                other => panic!("acknowledged completion of {:?} lost: {other:?}", o.key),
            }
        } else if o.leased {
            match store.begin(o.key.as_key(), FP, lease_time).await.unwrap() {
                Begin::Completed(c) => assert_eq!(c.response, o.key.as_key().id()),
                Begin::Acquired(l) => assert!(
                    l.is_takeover(),
                    "the acknowledged lease of {:?} was lost in the failover",
                    o.key
                ),
                other => panic!("{other:?}"),
            }
        }
    }
    drop(cluster);
}

/// `key` is completed with `response`: a `begin` replays it.
async fn replays(store: &RedisStore, key: Key<'_>, response: &[u8], when: &str) {
    match store.begin(key, FP, Duration::from_secs(30)).await.unwrap() {
        Begin::Completed(c) => assert_eq!(c.response, response, "{key:?} {when}"),
        other => panic!("{key:?} must replay {when}: {other:?}"),
    }
}

/// A plain connection to one node (no cluster routing), for looking at a node's own keys.
async fn node(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Whether the node on `port` holds `key` itself. `ASKING` first: a node importing the slot
/// then answers for the keys it already has. A node migrating the slot answers `ASK` for a key
/// it no longer has, or never had.
async fn holds(port: u16, key: &[u8]) -> bool {
    let answer: redis::RedisResult<((), i64)> = redis::pipe()
        .cmd("ASKING")
        .cmd("EXISTS")
        .arg(key)
        .query_async(&mut node(port).await)
        .await;
    match answer {
        Ok((_, n)) => n == 1,
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Ask) => false,
        Err(e) => panic!("EXISTS on :{port}: {e}"),
    }
}

/// `CLUSTER SETSLOT slot how id` on the node on `port`.
fn set_slot(port: u16, slot: u16, how: &str, id: &str) {
    let answer = Cluster::cli(port, &["cluster", "setslot", &slot.to_string(), how, id]);
    assert_eq!(answer.trim(), "OK", "setslot {slot} {how} {id} on :{port}");
}

/// The masters' ports and node ids.
fn masters(cluster: &Cluster) -> Vec<(u16, String)> {
    let nodes = Cluster::cli(cluster.nodes[0].port, &["cluster", "nodes"]);
    nodes
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let master = f.get(2)?.contains("master") && !f[2].contains("fail");
            let port = f[1].split('@').next()?.rsplit_once(':')?.1.parse().ok()?;
            master.then(|| (port, f[0].to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_master_mid_use_is_followed_through_ask_and_moved() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let store = RedisStore::cluster(cluster.urls()).connect().await.unwrap();
    let lease = Duration::from_secs(30);
    // Records in one slot (the tag `mig`): a completed request; requests whose leases are
    // taken before the move and completed while the slot moves (still on the old master), or
    // released then, or completed after it; and one begun while the slot moves.
    let id = |name: &str| colocated_id(name, "mig").unwrap();
    let (fresh_id, held_id, during_id, dropped_id) =
        (id("fresh"), id("held"), id("during"), id("dropped"));
    let done = Key::new("orders", "mig");
    let held = Key::new("orders", &held_id);
    let fresh = Key::new("orders", &fresh_id);
    let during = Key::new("orders", &during_id);
    let dropped = Key::new("orders", &dropped_id);
    let l = acquire(&store, done, lease).await;
    store.complete(&l, b"before", None, &[]).await.unwrap();
    let held_lease = acquire(&store, held, lease).await;
    let during_lease = acquire(&store, during, lease).await;
    let dropped_lease = acquire(&store, dropped, lease).await;

    let raw = store.redis_key(done);
    let source = cluster.master_of(&raw);
    let slot: u16 = Cluster::cli(
        source,
        &["cluster", "keyslot", &String::from_utf8_lossy(&raw)],
    )
    .trim()
    .parse()
    .unwrap();
    let masters = masters(&cluster);
    assert_eq!(masters.len(), 3, "{masters:?}");
    let source_id = masters
        .iter()
        .find(|(p, _)| *p == source)
        .unwrap()
        .1
        .clone();
    let (target, target_id) = masters.iter().find(|(p, _)| *p != source).unwrap().clone();

    // 1. The slot is migrating: the keys still on the source are served there, a key the
    //    source does not have goes to the target (the source answers `ASK`).
    set_slot(target, slot, "importing", &source_id);
    set_slot(source, slot, "migrating", &target_id);
    replays(&store, done, b"before", "mid-migration").await;
    // A completion and a release of records still on the source. (Each publishes on the
    // record's channel: a channel declared as a script key made Redis refuse them, TRYAGAIN,
    // for as long as the slot was migrating.)
    store
        .complete(&during_lease, b"mid-move", None, &[])
        .await
        .unwrap();
    store.release(dropped_lease).await.unwrap();
    assert!(holds(source, &store.redis_key(during)).await);
    assert_eq!(store.get(dropped).await.unwrap(), None);
    let fresh_lease = acquire(&store, fresh, lease).await;
    assert!(
        holds(target, &store.redis_key(fresh)).await,
        "the lease begun mid-migration is not on the target: no ASK was followed"
    );
    assert!(!holds(source, &store.redis_key(fresh)).await);
    store
        .complete(&fresh_lease, b"during", None, &[])
        .await
        .unwrap();
    match store.get(fresh).await.unwrap() {
        Some(Snapshot::Completed(c)) => assert_eq!(c.response, b"during"),
        other => panic!("{other:?}"),
    }

    // 2. The slot's keys move, then the slot (every master is told).
    let mut src = node(source).await;
    loop {
        let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query_async(&mut src)
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(target)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut src)
            .await
            .unwrap();
    }
    for (port, _) in &masters {
        set_slot(*port, slot, "node", &target_id);
    }
    assert_eq!(cluster.master_of(&raw), target);

    // 3. After the move the source answers `MOVED`: every record is found where it went, and
    //    the lease taken before the move completes after it.
    replays(&store, done, b"before", "after the move").await;
    store
        .complete(&held_lease, b"after", None, &[])
        .await
        .unwrap();
    for (key, response) in [
        (held, &b"after"[..]),
        (fresh, &b"during"[..]),
        (during, &b"mid-move"[..]),
    ] {
        replays(&store, key, response, "after the move").await;
        assert!(holds(target, &store.redis_key(key)).await);
    }
}
