//! The Kafka adapter against librdkafka's mock cluster, over real TCP on 127.0.0.1.
#![cfg(all(feature = "kafka", not(loom)))]
#![allow(clippy::unwrap_used)]

#[cfg(feature = "redis")]
#[path = "support/child.rs"]
mod child;
#[cfg(feature = "redis")]
#[path = "support/redis.rs"]
mod redis_support;

#[path = "support/kafka.rs"]
mod kafka_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemkv::kafka::{
    ATTEMPTS, ERROR, HandlerError, Incoming, KafkaError, KafkaProcessor, ORIGIN, Outcome,
    ProcessorStats, REPLAYED, Request, Requester,
};
use idemkv::{IdempotencyStore, Key, Snapshot, Store};
use kafka_support::{Cluster, Got, read, send};
use parking_lot::Mutex;
use rdkafka::ClientConfig;

/// Polls `done` every 10 ms for up to 20 s.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

type Runs = Arc<Mutex<HashMap<String, u32>>>;

fn key_of(msg: &Incoming) -> String {
    String::from_utf8_lossy(msg.idempotency_key()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_run_once_with_correlated_and_echoed_replies() {
    duplicates_on(Store::in_memory(), "g").await;
}

/// The same on the Redis backend (`tests/support/redis.rs`; required under `CI=true`).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_run_once_on_redis() {
    let Some(url) = redis_support::url() else {
        return;
    };
    let store = idemkv::redis::RedisStore::builder(url)
        .connect()
        .await
        .unwrap();
    // A group (and so a scope) of its own: the server outlives this run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let group = format!("g-{}-{nanos}", std::process::id());
    duplicates_on(store, &group).await;
}

async fn duplicates_on<St: IdempotencyStore + Clone>(store: St, group: &str) {
    let cluster = Cluster::new(2);
    let p = cluster.producer();
    for copy in 0..3 {
        for k in 0..10 {
            let (key, id, trace) = (
                format!("k{k}"),
                format!("r-{k}-{copy}"),
                format!("X-Trace: t-{k}-{copy}"),
            );
            let headers = [
                ("idempotency-key", key.as_str()),
                ("reply-to", "replies"),
                ("x-request-id", id.as_str()),
                ("x-echo-set-header", trace.as_str()),
            ];
            send(&p, &key, &format!("order {k}"), &headers).await;
        }
    }
    // A refused echo header, and a key reused with another payload.
    send(
        &p,
        "bad",
        "x",
        &[
            ("idempotency-key", "bad"),
            ("reply-to", "replies"),
            ("x-request-id", "r-bad"),
            ("x-echo-set-header", "Content-Length: 5"),
        ],
    )
    .await;
    send(
        &p,
        "k0",
        "another order",
        &[
            ("idempotency-key", "k0"),
            ("reply-to", "replies"),
            ("x-request-id", "r-mismatch"),
        ],
    )
    .await;

    let runs: Runs = Arc::default();
    let processor = KafkaProcessor::builder(store.clone(), cluster.consumer(group))
        .topics(["requests"])
        .build()
        .unwrap();
    let handle = processor.handle();
    let counted = runs.clone();
    let running = tokio::spawn(processor.run(move |msg: Incoming| {
        let runs = counted.clone();
        async move {
            let key = key_of(&msg);
            *runs.lock().entry(key.clone()).or_default() += 1;
            Ok(Outcome::reply(format!("done {key}")).header("X-Handler", "ran"))
        }
    }));

    let replies = read(&cluster, "replies", 32, Duration::from_secs(20)).await;
    handle.shutdown();
    let stats = running.await.unwrap().unwrap();
    assert_eq!(replies.len(), 32, "{replies:#?}");
    let runs = runs.lock().clone();
    assert_eq!(runs.len(), 10, "{runs:?}");
    assert!(runs.values().all(|&n| n == 1), "{runs:?}");

    let mut by_key: HashMap<Vec<u8>, Vec<&Got>> = HashMap::new();
    for r in &replies {
        by_key.entry(r.key.clone().unwrap()).or_default().push(r);
    }
    for k in 0..10 {
        let key = format!("k{k}");
        let group = &by_key[key.as_bytes()];
        let ok: Vec<&&Got> = group.iter().filter(|r| r.header(ERROR).is_none()).collect();
        assert_eq!(ok.len(), 3, "{key}: {group:#?}");
        assert!(
            ok.iter()
                .all(|r| r.payload == format!("done {key}").as_bytes())
        );
        assert!(ok.iter().all(|r| r.header("x-handler") == Some("ran")));
        let replayed = ok
            .iter()
            .filter(|r| r.header(REPLAYED) == Some("true"))
            .count();
        assert_eq!(replayed, 2, "{key}: one fresh reply, two replays");
        for r in &ok {
            // Each reply carries its own request's correlation id and echo header.
            let id = r.header("x-request-id").unwrap();
            let copy = id.rsplit('-').next().unwrap();
            assert_eq!(id, format!("r-{k}-{copy}"));
            assert_eq!(r.header("x-trace"), Some(format!("t-{k}-{copy}").as_str()));
        }
    }
    let bad = &by_key[b"bad".as_slice()][0];
    assert!(
        bad.header(ERROR)
            .unwrap()
            .to_ascii_lowercase()
            .contains("content-length"),
        "{bad:?}"
    );
    assert_eq!(bad.header("x-request-id"), Some("r-bad"));
    assert!(!runs.contains_key("bad"));
    let mismatch = replies
        .iter()
        .find(|r| r.header("x-request-id") == Some("r-mismatch"))
        .unwrap();
    assert!(
        mismatch
            .header(ERROR)
            .unwrap()
            .contains("different payload")
    );
    assert_eq!(stats.processed, 10);
    assert_eq!(stats.replayed, 20);
    assert_eq!(stats.rejected, 2);
    assert_eq!(stats.replies, 32);
    // Results live in the store under the group's scope.
    let scope = format!("kafka:{group}");
    assert!(matches!(
        IdempotencyStore::get(&store, Key::new(&scope, "k3"))
            .await
            .unwrap(),
        Some(Snapshot::Completed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_failures_and_dead_letters_keep_the_partition_moving() {
    let cluster = Cluster::new(1);
    let p = cluster.producer();
    for key in ["poison", "flaky", "final", "after", "final"] {
        let id = format!("r-{key}");
        send(
            &p,
            key,
            "{}",
            &[("reply-to", "replies"), ("x-request-id", &id)],
        )
        .await;
    }
    let store = Store::in_memory();
    let runs: Runs = Arc::default();
    let processor = KafkaProcessor::builder(store.clone(), cluster.consumer("g"))
        .topics(["requests"])
        .max_attempts(3)
        .retry_backoff(Duration::from_millis(5), Duration::from_millis(20))
        .dead_letter_topic("dead")
        .build()
        .unwrap();
    let handle = processor.handle();
    let counted = runs.clone();
    let running = tokio::spawn(processor.run(move |msg: Incoming| {
        let runs = counted.clone();
        async move {
            let key = key_of(&msg);
            *runs.lock().entry(key.clone()).or_default() += 1;
            match key.as_str() {
                "poison" => Err(HandlerError::retry("boom")),
                "flaky" if msg.attempt() < 3 => Err(HandlerError::retry("not yet")),
                "final" => Err(HandlerError::fail("card declined")),
                _ => Ok(Outcome::reply(format!(
                    "{key} on attempt {}",
                    msg.attempt()
                ))),
            }
        }
    }));
    let replies = read(&cluster, "replies", 5, Duration::from_secs(20)).await;
    let dead = read(&cluster, "dead", 1, Duration::from_secs(5)).await;
    handle.shutdown();
    let stats = running.await.unwrap().unwrap();

    assert_eq!(replies.len(), 5, "{replies:#?}");
    let reply = |id: &'static str| {
        replies
            .iter()
            .filter(move |r| r.header("x-request-id") == Some(id))
    };
    let poison: Vec<_> = reply("r-poison").collect();
    assert!(
        poison[0].header(ERROR).unwrap().contains("dead-lettered"),
        "{poison:?}"
    );
    assert_eq!(
        reply("r-flaky").next().unwrap().payload,
        b"flaky on attempt 3"
    );
    assert_eq!(
        reply("r-after").next().unwrap().payload,
        b"after on attempt 1"
    );
    let finals: Vec<_> = reply("r-final").collect();
    assert_eq!(finals.len(), 2);
    assert!(
        finals
            .iter()
            .all(|r| r.header(ERROR) == Some("card declined"))
    );
    assert_eq!(
        finals
            .iter()
            .filter(|r| r.header(REPLAYED) == Some("true"))
            .count(),
        1
    );

    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].key.as_deref(), Some(b"poison".as_slice()));
    assert!(dead[0].header(ERROR).unwrap().contains("boom"));
    assert_eq!(dead[0].header(ATTEMPTS), Some("3"));
    assert_eq!(dead[0].header(ORIGIN), Some("requests/0/0"));
    assert_eq!(
        dead[0].header("x-request-id"),
        Some("r-poison"),
        "original headers kept"
    );

    let runs = runs.lock().clone();
    assert_eq!(
        (runs["poison"], runs["flaky"], runs["final"], runs["after"]),
        (3, 3, 1, 1)
    );
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.retried, 5, "3 for poison, 2 for flaky");
    // Attempt counters are gone once a message is done; a dead-lettered key is forgotten so
    // a re-drive from the dead-letter topic runs afresh.
    for key in ["poison", "flaky"] {
        assert_eq!(
            store
                .blocking_get(Key::new("kafka:g#attempts", key))
                .unwrap(),
            None,
            "{key}"
        );
    }
    assert_eq!(
        store.blocking_get(Key::new("kafka:g", "poison")).unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_never_runs_a_key_twice_or_concurrently() {
    let cluster = Cluster::new(4);
    let p = cluster.producer();
    let store = Store::in_memory();
    let runs: Runs = Arc::default();
    let active: Arc<Mutex<HashSet<String>>> = Arc::default();
    let overlaps = Arc::new(Mutex::new(Vec::<String>::new()));
    let start = |name: &'static str| {
        let processor = KafkaProcessor::builder(store.clone(), cluster.consumer("group"))
            .topics(["requests"])
            .revoke_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let handle = processor.handle();
        let (runs, active, overlaps) = (runs.clone(), active.clone(), overlaps.clone());
        let task = tokio::spawn(processor.run(move |msg: Incoming| {
            let (runs, active, overlaps) = (runs.clone(), active.clone(), overlaps.clone());
            async move {
                let key = key_of(&msg);
                if !active.lock().insert(key.clone()) {
                    overlaps.lock().push(key.clone());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                *runs.lock().entry(key.clone()).or_default() += 1;
                active.lock().remove(&key);
                Ok(Outcome::reply(name))
            }
        }));
        (handle, task)
    };
    let total =
        |stats: &[ProcessorStats]| -> u64 { stats.iter().map(|s| s.processed + s.replayed).sum() };
    // Each key twice: once in the first half, once (a producer duplicate) in the second.
    for k in 0..100 {
        send(&p, &format!("k{k}"), "x", &[]).await;
    }
    let (a, task_a) = start("a");
    wait_until("a to start", || total(&[a.stats()]) >= 20).await;
    let (b, task_b) = start("b");
    for k in 0..100 {
        send(&p, &format!("k{k}"), "x", &[]).await;
    }
    wait_until("all 200 messages", || total(&[a.stats(), b.stats()]) >= 200).await;
    a.shutdown();
    let stats_a = task_a.await.unwrap().unwrap();
    for k in 0..20 {
        send(&p, &format!("k{k}"), "x", &[]).await;
    }
    wait_until("b to take over", || {
        b.stats().replayed + stats_a.replayed >= 120
    })
    .await;
    b.shutdown();
    let stats_b = task_b.await.unwrap().unwrap();

    let runs = runs.lock().clone();
    assert_eq!(runs.len(), 100);
    assert!(runs.values().all(|&n| n == 1), "{runs:?}");
    assert!(overlaps.lock().is_empty(), "{:?}", overlaps.lock());
    assert!(
        stats_a.processed + stats_a.replayed > 0 && stats_b.processed + stats_b.replayed > 0,
        "{stats_a:?} {stats_b:?}"
    );
    assert_eq!(stats_a.processed + stats_b.processed, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_work_or_releases_it() {
    let cluster = Cluster::new(1);
    let p = cluster.producer();
    let store = Store::in_memory();
    let runs: Runs = Arc::default();
    let started = Arc::new(tokio::sync::Notify::new());
    let build = |timeout: Duration| {
        KafkaProcessor::builder(store.clone(), cluster.consumer("g"))
            .topics(["requests"])
            .shutdown_timeout(timeout)
            .build()
            .unwrap()
    };
    let handler = |runs: Runs, started: Arc<tokio::sync::Notify>| {
        move |msg: Incoming| {
            let (runs, started) = (runs.clone(), started.clone());
            async move {
                let key = key_of(&msg);
                *runs.lock().entry(key.clone()).or_default() += 1;
                started.notify_one();
                let work = match key.as_str() {
                    "slow" => 300,
                    "stuck" => 60_000,
                    _ => 0,
                };
                tokio::time::sleep(Duration::from_millis(work)).await;
                Ok(Outcome::done())
            }
        }
    };

    // 1. Shut down while a 300 ms handler runs: it finishes and is recorded.
    send(&p, "slow", "x", &[]).await;
    let processor = build(Duration::from_secs(5));
    let handle = processor.handle();
    let task = tokio::spawn(processor.run(handler(runs.clone(), started.clone())));
    started.notified().await;
    handle.shutdown();
    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.processed, 1);
    assert!(matches!(
        store.blocking_get(Key::new("kafka:g", "slow")).unwrap(),
        Some(Snapshot::Completed(_))
    ));

    // 2. Shut down while a handler is stuck past the timeout: cancelled, lease released.
    send(&p, "stuck", "x", &[]).await;
    let processor = build(Duration::from_millis(50));
    let handle = processor.handle();
    let task = tokio::spawn(processor.run(handler(runs.clone(), started.clone())));
    started.notified().await;
    handle.shutdown();
    let stats = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(stats.processed, 0);
    assert_eq!(
        store.blocking_get(Key::new("kafka:g", "stuck")).unwrap(),
        None,
        "the lease was released"
    );

    // 3. The next member of the group resumes after the committed offset: "slow" is not
    //    redelivered, "stuck" is, and runs again (its first run was never recorded).
    let processor = KafkaProcessor::builder(store.clone(), cluster.consumer("g"))
        .topics(["requests"])
        .build()
        .unwrap();
    let handle = processor.handle();
    let quick: Runs = Arc::default();
    let seen = quick.clone();
    let task = tokio::spawn(processor.run(move |msg: Incoming| {
        let seen = seen.clone();
        async move {
            *seen.lock().entry(key_of(&msg)).or_default() += 1;
            Ok(Outcome::done())
        }
    }));
    send(&p, "marker", "x", &[]).await;
    wait_until("the marker", || quick.lock().contains_key("marker")).await;
    handle.shutdown();
    let stats = task.await.unwrap().unwrap();
    let quick = quick.lock().clone();
    assert_eq!(quick.get("stuck"), Some(&1), "{quick:?}");
    assert_eq!(quick.get("slow"), None, "{quick:?}");
    assert_eq!(
        stats.replayed, 0,
        "the committed offset covered the finished message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requester_matches_replies_and_times_out() {
    let cluster = Cluster::new(2);
    let requester = Requester::new(&cluster.client(), "replies").await.unwrap();
    // Nobody consumes the requests yet.
    let err = requester
        .request(
            "requests",
            Request::new("hello"),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, KafkaError::Timeout(_)), "{err}");

    let processor = KafkaProcessor::builder(Store::in_memory(), cluster.consumer("g"))
        .topics(["requests"])
        .build()
        .unwrap();
    let handle = processor.handle();
    let task = tokio::spawn(processor.run(|msg: Incoming| async move {
        Ok(Outcome::reply(
            [b"echo: ".as_slice(), msg.payload().unwrap_or_default()].concat(),
        ))
    }));
    let mut handles = Vec::new();
    let requester = Arc::new(requester);
    for i in 0..20 {
        let requester = requester.clone();
        handles.push(tokio::spawn(async move {
            let body = format!("m{i}");
            let reply = requester
                .request(
                    "requests",
                    Request::new(body.clone())
                        .key(format!("k{i}"))
                        .idempotency_key(format!("idem-{i}")),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            assert_eq!(reply.payload, format!("echo: {body}").as_bytes());
            assert!(!reply.is_replayed());
            let again = requester
                .request(
                    "requests",
                    Request::new(body.clone())
                        .key(format!("k{i}"))
                        .idempotency_key(format!("idem-{i}")),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            assert!(again.is_replayed());
            assert_eq!(again.payload, reply.payload);
            assert_ne!(again.request_id(), reply.request_id());
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    handle.shutdown();
    let stats = task.await.unwrap().unwrap();
    // The first, unanswered request is processed once the processor starts, too.
    assert_eq!(stats.processed, 21);
    assert_eq!(stats.replayed, 20);
}

/// The user's client hooks see the consumer's statistics and its client errors; a bad
/// `group.instance.id` is refused at build time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hooks_and_static_membership() {
    use idemkv::kafka::ClientHooks;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Clone, Default)]
    struct Seen {
        stats: Arc<AtomicUsize>,
        errors: Arc<Mutex<Vec<String>>>,
    }
    impl ClientHooks for Seen {
        fn statistics(&self, _: &rdkafka::Statistics) {
            self.stats.fetch_add(1, Ordering::Relaxed);
        }
        fn error(&self, error: &rdkafka::error::KafkaError, reason: &str) {
            self.errors.lock().push(format!("{error}: {reason}"));
        }
    }

    let cluster = Cluster::new(1);
    let seen = Seen::default();
    let mut consumer = cluster.consumer("hooks");
    consumer.set("statistics.interval.ms", "100");
    let processor = KafkaProcessor::builder(Store::in_memory(), consumer)
        .topics(["requests"])
        .static_membership("hooks-member-1")
        .client_hooks(seen.clone())
        .build()
        .unwrap();
    let handle = processor.handle();
    let task = tokio::spawn(processor.run(|_: Incoming| async { Ok(Outcome::done()) }));
    wait_until("statistics reach the hook", || {
        seen.stats.load(Ordering::Relaxed) >= 2
    })
    .await;
    handle.shutdown();
    task.await.unwrap().unwrap();

    // A consumer whose broker is not there: the client errors reach the hook.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let errors = Seen::default();
    let mut consumer = ClientConfig::new();
    consumer
        .set("bootstrap.servers", format!("127.0.0.1:{port}"))
        .set("group.id", "nobody")
        .set("reconnect.backoff.max.ms", "100");
    let processor = KafkaProcessor::builder(Store::in_memory(), consumer)
        .topics(["requests"])
        .client_hooks(errors.clone())
        .build()
        .unwrap();
    let handle = processor.handle();
    let task = tokio::spawn(processor.run(|_: Incoming| async { Ok(Outcome::done()) }));
    wait_until("a client error reaches the hook", || {
        !errors.errors.lock().is_empty()
    })
    .await;
    handle.shutdown();
    task.await.unwrap().unwrap();
    eprintln!("client errors seen: {:?}", errors.errors.lock());

    for bad in ["", "has space", "slash/id", &"x".repeat(250)] {
        let r = KafkaProcessor::builder(Store::in_memory(), cluster.consumer("g"))
            .topics(["requests"])
            .static_membership(bad)
            .build();
        assert!(matches!(r, Err(KafkaError::Config(_))), "{bad:?}");
    }
}

/// A managed cluster's settings (SASL/SCRAM over TLS, the usual for hosted Kafka): accepted
/// with the `kafka-ssl` feature, refused with a typed error without it (librdkafka is then
/// built without OpenSSL). Nothing connects: the clients are only created.
#[test]
fn secure_cluster_settings_need_the_ssl_feature() {
    let mut consumer = ClientConfig::new();
    consumer
        .set("bootstrap.servers", "127.0.0.1:1")
        .set("group.id", "secure")
        .set("security.protocol", "sasl_ssl")
        .set("sasl.mechanisms", "SCRAM-SHA-512")
        .set("sasl.username", "svc-orders")
        .set("sasl.password", "not-a-secret");
    let built = KafkaProcessor::builder(Store::in_memory(), consumer.clone())
        .topics(["requests"])
        .build();
    if cfg!(feature = "kafka-ssl") {
        assert!(built.is_ok(), "{:?}", built.err());
    } else {
        let Err(err) = built else {
            panic!("accepted without OpenSSL")
        };
        assert!(err.to_string().contains("ssl"), "{err}");
    }
    // Kerberos needs Cyrus SASL (`kafka-gssapi`).
    consumer
        .set("sasl.mechanisms", "GSSAPI")
        .set("sasl.kerberos.service.name", "kafka")
        .set("sasl.kerberos.principal", "orders@EXAMPLE.COM")
        .set("sasl.kerberos.keytab", "/etc/orders.keytab");
    let built = KafkaProcessor::builder(Store::in_memory(), consumer.clone())
        .topics(["requests"])
        .build();
    assert_eq!(
        built.is_ok(),
        cfg!(feature = "kafka-gssapi"),
        "{:?}",
        built.err()
    );
    // OAUTHBEARER through librdkafka's own OIDC client (`kafka-oidc`: libcurl).
    consumer
        .set("sasl.mechanisms", "OAUTHBEARER")
        .set("sasl.oauthbearer.method", "oidc")
        .set("sasl.oauthbearer.client.id", "orders")
        .set("sasl.oauthbearer.client.secret", "not-a-secret")
        .set(
            "sasl.oauthbearer.token.endpoint.url",
            "https://127.0.0.1:1/token",
        );
    let built = KafkaProcessor::builder(Store::in_memory(), consumer)
        .topics(["requests"])
        .build();
    assert_eq!(
        built.is_ok(),
        cfg!(feature = "kafka-oidc"),
        "{:?}",
        built.err()
    );
}
