//! The processor's configuration: [`ProcessorBuilder`], its defaults, and `build`, which
//! checks the settings, derives the producer's config from the consumer's, and creates the
//! clients.
//!
//! Invariant: a processor that `build` returns has valid topics, instance id, scope and
//! bounds; nothing is checked again while it runs.

use super::*;

/// What a processor is configured with, read by every part.
pub(super) struct Config {
    pub(super) topics: Vec<String>,
    pub(super) key_sources: Vec<KeySource>,
    pub(super) lease: Duration,
    pub(super) wait_for_holder: Duration,
    pub(super) lease_sync: LeaseSync,
    pub(super) result_ttl: Option<Duration>,
    pub(super) max_attempts: u32,
    pub(super) retry_backoff: Duration,
    pub(super) max_backoff: Duration,
    pub(super) dead_letter: Option<String>,
    pub(super) queue: usize,
    pub(super) revoke_timeout: Duration,
    pub(super) shutdown_timeout: Duration,
    pub(super) reply_timeout: Duration,
    pub(super) echo: EchoPolicy,
    pub(super) follow_up_topic: Option<String>,
    pub(super) http_timeout: Duration,
    pub(super) tokens: Option<String>,
}

/// Configures a [`KafkaProcessor`]; from [`KafkaProcessor::builder`].
pub struct ProcessorBuilder<St> {
    store: St,
    consumer: ClientConfig,
    producer: Option<ClientConfig>,
    scope: Option<String>,
    hooks: Option<Arc<dyn ClientHooks>>,
    cfg: Config,
}

impl<St> std::fmt::Debug for ProcessorBuilder<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorBuilder")
            .field("topics", &self.cfg.topics)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl<St: IdempotencyStore + Clone> ProcessorBuilder<St> {
    /// Topics to subscribe to (at least one).
    pub fn topics<I, T>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.cfg.topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// The store scope of this processor's keys. Default: `kafka:` and the `group.id`, so two
    /// consumer groups reading one topic each process every message.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Where idempotency keys come from (default [`KeySource::defaults`]).
    pub fn key_sources(mut self, sources: Vec<KeySource>) -> Self {
        self.cfg.key_sources = sources;
        self
    }

    /// The lease taken while a handler runs; renewed every third of it (default 30 s). A
    /// crashed consumer's message is taken over this long after its last renewal.
    pub fn lease(mut self, d: Duration) -> Self {
        self.cfg.lease = d;
        self
    }

    /// How long one wait for another holder of the same key lasts before checking again for
    /// shutdown (default 5 s; the partition waits as long as the holder lives).
    pub fn wait_for_holder(mut self, d: Duration) -> Self {
        self.cfg.wait_for_holder = d;
        self
    }

    /// When a message's lease must be durable (default [`LeaseSync::Deferred`]: with
    /// `Durability::Immediate` a message waits for one `fdatasync`, its completion's, which
    /// covers the lease). A crash before the lease reached the disk loses only the lease: the
    /// redelivered message runs as fresh. What the handler's effects depend on is durable
    /// before they happen either way: the outbox commits with the completion, and a call's
    /// record is synced before its PUT (which syncs the lease before it, the log being synced
    /// in order).
    pub fn lease_sync(mut self, sync: LeaseSync) -> Self {
        self.cfg.lease_sync = sync;
        self
    }

    /// How long results are kept (default: the store's default TTL).
    pub fn result_ttl(mut self, d: Duration) -> Self {
        self.cfg.result_ttl = Some(d);
        self
    }

    /// Attempts before a message that keeps asking to be retried is dead-lettered (default 5,
    /// counted across restarts).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.cfg.max_attempts = n;
        self
    }

    /// First backoff between attempts; it doubles up to `max` (default 100 ms and 5 s).
    pub fn retry_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.cfg.retry_backoff = first;
        self.cfg.max_backoff = max;
        self
    }

    /// Which `x-echo-set-header` names a request may have set on its reply, and how many: the
    /// HTTP layer's rules ([`EchoPolicy`], default: custom names only, at most 16 and 4 KiB).
    /// A refused request gets a failure reply and its handler does not run.
    pub fn echo_policy(mut self, policy: EchoPolicy) -> Self {
        self.cfg.echo = policy;
        self
    }

    /// Dead-letter topic for messages whose attempts are exhausted. Without one they are
    /// recorded as final failures instead.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.cfg.dead_letter = Some(topic.into());
        self
    }

    /// Messages the polling thread holds back while partition tasks are behind (default
    /// 1024); past it, fetching waits. Each task also queues up to 8 batches of up to 64.
    pub fn queue_per_partition(mut self, n: usize) -> Self {
        self.cfg.queue = n;
        self
    }

    /// How long in-flight work may take to finish when its partition is revoked (default
    /// 10 s); after that the handler is cancelled and its lease released.
    pub fn revoke_timeout(mut self, d: Duration) -> Self {
        self.cfg.revoke_timeout = d;
        self
    }

    /// The same, for a graceful shutdown (default 30 s).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.cfg.shutdown_timeout = d;
        self
    }

    /// The topic of the follow-up messages of exactly-once HTTP calls
    /// ([`Incoming::invoke_http`]); the processor consumes it too. Without one, `invoke_http`
    /// is refused. Only messages on this topic are taken as follow-ups.
    pub fn follow_up_topic(mut self, topic: impl Into<String>) -> Self {
        self.cfg.follow_up_topic = Some(topic.into());
        self
    }

    /// Token-based deduplication (opt-in, for idemkv-to-idemkv links over a shared store): a
    /// message is processed only while its token exists under `scope` (its sender created it
    /// with [`Outgoing::with_token`](crate::outbox::Outgoing::with_token), or by putting a value
    /// at `(scope, idempotency key)` before producing it), and its result deletes the token in
    /// the same batch. The result itself is not kept (it expires at once), so the store holds
    /// tokens of messages in flight, not a record per message for the result TTL. A message
    /// without a token (a redelivery of one already processed, or one sent without) is skipped
    /// without a reply: this mode is for event streams, not request-reply.
    pub fn require_tokens(mut self, scope: impl Into<String>) -> Self {
        self.cfg.tokens = Some(scope.into());
        self
    }

    /// How long one HTTP exchange of an exactly-once call may take, connecting included
    /// (default 10 s); a timeout is retried with backoff.
    pub fn http_timeout(mut self, d: Duration) -> Self {
        self.cfg.http_timeout = d;
        self
    }

    /// Statistics and client errors of the consumer, to `hooks` (see [`ClientHooks`]).
    pub fn client_hooks(mut self, hooks: impl ClientHooks) -> Self {
        self.hooks = Some(Arc::new(hooks));
        self
    }

    /// Static group membership: this consumer is the group member `instance_id`
    /// (`group.instance.id`) across restarts. A restarted process with the same id gets its
    /// partitions back at once, without a rebalance and without waiting out the dead
    /// process's session (`session.timeout.ms`); the other members keep theirs meanwhile.
    /// Give each process of a group its own stable id (a host name, a pod's ordinal, a data
    /// directory). The other side: a member that stops for good keeps its partitions
    /// unprocessed until its session times out, so pair it with a session of a few seconds
    /// to tens of seconds. Without it (the default) membership is dynamic: every restart
    /// rebalances, and a member killed without leaving holds its partitions until its
    /// session ends. Only ASCII letters, digits, `.`, `_` and `-`, at most 249 bytes, as
    /// Kafka requires; [`build`](Self::build) refuses others.
    pub fn static_membership(mut self, instance_id: impl Into<String>) -> Self {
        self.consumer.set("group.instance.id", instance_id.into());
        self
    }

    /// Producer configuration for replies and dead letters. Default: the consumer's
    /// `bootstrap.servers` (and security settings) with `enable.idempotence=true`.
    pub fn producer_config(mut self, config: ClientConfig) -> Self {
        self.producer = Some(config);
        self
    }

    /// Creates the clients and subscribes. Overrides two consumer properties:
    /// `enable.auto.offset.store=false` (offsets are stored only after a result is recorded)
    /// and `enable.auto.commit=true` (stored offsets are committed in the background).
    pub fn build(self) -> Result<KafkaProcessor<St>, KafkaError> {
        let ProcessorBuilder {
            store,
            mut consumer,
            producer,
            scope,
            hooks,
            cfg,
        } = self;
        if cfg.topics.is_empty() {
            return Err(KafkaError::Config("no topics to consume".into()));
        }
        let group = consumer
            .get("group.id")
            .map(str::to_owned)
            .ok_or_else(|| KafkaError::Config("the consumer config needs a group.id".into()))?;
        if let Some(id) = consumer.get("group.instance.id")
            && !valid_topic(id)
        {
            return Err(KafkaError::Config(format!(
                "group.instance.id {id:?}: only ASCII letters, digits, '.', '_' and '-', at most 249 bytes"
            )));
        }
        let scope = scope.unwrap_or_else(|| format!("kafka:{group}"));
        let attempts_scope = format!("{scope}#attempts");
        let outbox_scope = format!("{scope}#outbox");
        let calls_scope = format!("{scope}#calls");
        let mut cfg = cfg;
        if let Some(t) = &cfg.follow_up_topic {
            if !valid_topic(t) {
                return Err(KafkaError::Config(format!(
                    "{t:?} is not a valid topic name"
                )));
            }
            if !cfg.topics.contains(t) {
                cfg.topics.push(t.clone());
            }
        }
        let caller = HttpCaller::new(cfg.http_timeout, (cfg.retry_backoff, cfg.max_backoff));
        if attempts_scope.len() > crate::MAX_SCOPE_LEN {
            return Err(KafkaError::Config(format!(
                "scope {scope:?} is too long (at most {} bytes)",
                crate::MAX_SCOPE_LEN - "#attempts".len()
            )));
        }
        if cfg.lease < Duration::from_millis(30) {
            return Err(KafkaError::Config(
                "the lease must be at least 30 ms".into(),
            ));
        }
        if cfg.max_attempts == 0 || cfg.queue == 0 || cfg.key_sources.is_empty() {
            return Err(KafkaError::Config(
                "max_attempts, queue_per_partition and key_sources must not be zero or empty"
                    .into(),
            ));
        }
        let producer_config = producer.unwrap_or_else(|| {
            let mut p = ClientConfig::new();
            // `config_map` hides secrets' values, so it only lists the keys to copy.
            for k in consumer.config_map().keys() {
                let copied = *k == "bootstrap.servers"
                    || ["security.", "sasl.", "ssl."]
                        .iter()
                        .any(|pre| k.starts_with(pre));
                if let (true, Some(v)) = (copied, consumer.get(k)) {
                    p.set(*k, v);
                }
            }
            p.set("enable.idempotence", "true").set("linger.ms", "1");
            p
        });
        let producer: FutureProducer = producer_config.create()?;
        consumer
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true");
        // Per-partition lag for the metrics, unless the caller chose an interval.
        if cfg!(feature = "metrics") && consumer.get("statistics.interval.ms").is_none() {
            consumer.set("statistics.interval.ms", "5000");
        }
        let partitions = Arc::new(Partitions::default());
        let context = Ctx {
            partitions: partitions.clone(),
            revoke_timeout: cfg.revoke_timeout,
            hooks,
        };
        let consumer: BaseConsumer<Ctx> = consumer.create_with_context(context)?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(KafkaProcessor {
            shared: Arc::new(Shared {
                store,
                producer,
                scope,
                attempts_scope,
                outbox_scope,
                calls_scope,
                caller,
                cfg,
                stats: Counters::default(),
                stop: StopFlag::default(),
                fatal: Mutex::new(None),
                recycler: message::Recycler::default(),
            }),
            consumer: Arc::new(consumer),
        })
    }
}

impl KafkaProcessor<()> {
    /// Starts configuring a processor over `store`. `consumer` must name `bootstrap.servers`
    /// and `group.id`.
    pub fn builder<St: IdempotencyStore + Clone>(
        store: St,
        consumer: ClientConfig,
    ) -> ProcessorBuilder<St> {
        ProcessorBuilder {
            store,
            consumer,
            producer: None,
            scope: None,
            hooks: None,
            cfg: Config {
                topics: Vec::new(),
                key_sources: KeySource::defaults(),
                lease: Duration::from_secs(30),
                wait_for_holder: Duration::from_secs(5),
                lease_sync: LeaseSync::Deferred,
                result_ttl: None,
                max_attempts: 5,
                retry_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                dead_letter: None,
                queue: 1024,
                revoke_timeout: Duration::from_secs(10),
                shutdown_timeout: Duration::from_secs(30),
                reply_timeout: Duration::from_secs(30),
                echo: EchoPolicy::default(),
                follow_up_topic: None,
                http_timeout: Duration::from_secs(10),
                tokens: None,
            },
        }
    }
}
