//! Waking waiters by pub/sub: completion channels per key, one shared pub/sub connection per
//! store, opened on first use and again after it fails.
//!
//! Invariant: a waiter subscribes before it looks at the key again, so a completion published
//! in between is not missed; the last waiter of a channel unsubscribes under the same lock
//! that a new waiter registers under.

use super::*;

/// Subscriptions to completion channels, shared by all waiters of one store: one pub/sub
/// connection, opened on first use and again after it fails.
pub(super) struct Notifier {
    pub(super) client: redis::Client,
    pub(super) sink: tokio::sync::Mutex<Option<redis::aio::PubSubSink>>,
    pub(super) waiters: Arc<Mutex<Waiters>>,
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

    pub(super) async fn connect(&self) -> Option<redis::aio::PubSubSink> {
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
