//! Waking waiters by pub/sub: completion channels per key, one shared pub/sub connection per
//! store, opened on first use and again after it fails.
//!
//! On one server the scripts `PUBLISH` and waiters `SUBSCRIBE`. On a cluster they use sharded
//! pub/sub (`SPUBLISH`/`SSUBSCRIBE`, Redis 7): a key's channel is in the key's slot, so the
//! message stays on the shard that owns the key, and the cluster client subscribes on that
//! shard's master (again after a failover moves it).
//!
//! Invariant: a waiter subscribes before it looks at the key again, so a completion published
//! in between is not missed; the last waiter of a channel unsubscribes under the same lock
//! that a new waiter registers under. A lost subscription (a dropped connection, a slot that
//! moved) wakes every waiter, and each looks again.

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind};

use super::*;

/// Subscriptions to completion channels, shared by all waiters of one store: one pub/sub
/// connection, opened on first use and again after it fails.
pub(super) struct Notifier {
    pub(super) source: Source,
    pub(super) sink: tokio::sync::Mutex<Option<Sink>>,
    pub(super) waiters: Arc<Mutex<Waiters>>,
}

/// What a pub/sub connection is opened from. One per store, built once and never moved on
/// a request's path, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Source {
    Single(redis::Client),
    /// Built with RESP3 and a push sender that wakes the waiters (`cluster_pushes`).
    Cluster(ClusterClient),
}

/// An open pub/sub connection.
pub(super) enum Sink {
    Single(redis::aio::PubSubSink),
    Cluster(ClusterConnection),
}

impl Sink {
    async fn subscribe(&mut self, channel: &[u8]) -> redis::RedisResult<()> {
        match self {
            Sink::Single(s) => s.subscribe(channel).await,
            Sink::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &[u8]) -> redis::RedisResult<()> {
        match self {
            Sink::Single(s) => s.unsubscribe(channel).await,
            Sink::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }
}

/// The cluster client's push handler: a shard message wakes its channel's waiters; a lost
/// connection wakes everyone, a subscription the server dropped (its slot moved) its waiters.
pub(super) fn cluster_pushes(
    waiters: std::sync::Weak<Mutex<Waiters>>,
) -> impl Fn(PushInfo) -> Result<(), ()> + Send + Sync + 'static {
    move |push: PushInfo| {
        let Some(waiters) = waiters.upgrade() else {
            return Err(());
        };
        let waiters = waiters.lock();
        match push.kind {
            // A shard message, or the server ending a subscription that still has waiters (its
            // slot moved; our own unsubscribes come after the channel has left the map).
            PushKind::SMessage | PushKind::SUnsubscribe => {
                if let Some(Value::BulkString(channel)) = push.data.first()
                    && let Some((_, n)) = waiters.get(channel)
                {
                    n.notify_waiters();
                }
            }
            PushKind::Disconnection => {
                for (_, n) in waiters.values() {
                    n.notify_waiters();
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Per channel: how many waiters, and the signal they wait on.
pub(super) type Waiters = HashMap<Vec<u8>, (usize, Arc<Notify>)>;

pub(super) struct Watch {
    pub(super) channel: Vec<u8>,
    pub(super) notify: Arc<Notify>,
}

impl Notifier {
    /// Registers interest in `channel` and subscribes to it; `None` if pub/sub is unavailable
    /// (the caller then looks again on a short timer).
    pub(super) async fn watch(&self, channel: &[u8]) -> Option<Watch> {
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

    pub(super) async fn unwatch(&self, watch: Option<Watch>) {
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

    pub(super) async fn connect(&self) -> Option<Sink> {
        let client = match &self.source {
            Source::Single(client) => client,
            Source::Cluster(cluster) => {
                let mut conn = Sink::Cluster(cluster.get_async_connection().await.ok()?);
                let waiters: Vec<Vec<u8>> = self.waiters.lock().keys().cloned().collect();
                for ch in waiters {
                    conn.subscribe(&ch).await.ok()?;
                }
                return Some(conn);
            }
        };
        let pubsub = client.get_async_pubsub().await.ok()?;
        let (sink, mut stream) = pubsub.split();
        let waiters: Vec<Vec<u8>> = self.waiters.lock().keys().cloned().collect();
        let mut sink = sink;
        for ch in waiters {
            sink.subscribe(&ch).await.ok()?;
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
        Some(Sink::Single(sink))
    }
}
