//! The one lease runner every adapter uses (the HTTP layer, `ExactlyOnce`, Kafka): it runs the
//! work of a key while holding the key's lease, renews the lease every third of its length,
//! and gives the key back if the work does not finish.
//!
//! Invariants:
//! - The work runs only while this holder's lease is believed live: a renewal that finds the
//!   lease taken over ends the run at once with [`Ran::Lost`] (the work is dropped: another
//!   holder is doing it, and its result is the one that will be recorded); a renewal that fails
//!   for another reason is retried at the next tick while the lease has time left, and ends
//!   the run with [`Ran::Lost`] when it has none.
//! - A [`Held`] lease is released when it is dropped without being handed back ([`Held::take`]):
//!   an error, a panic in the work, or the cancellation of the whole request all free the key
//!   at once instead of at the lease's deadline.
//! - Nothing here completes a key: the caller records the result with the lease it gets back,
//!   and the store's fencing token refuses a completion by a holder that lost the lease.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Error, IdempotencyStore, Lease};

/// A lease held by an adapter; released in the background if dropped while still held.
pub(crate) struct Held<St: IdempotencyStore + Clone> {
    store: St,
    lease: Lease,
    /// Whether dropping the guard releases the lease.
    armed: bool,
}

impl<St: IdempotencyStore + Clone> Held<St> {
    pub(crate) fn new(store: St, lease: Lease) -> Self {
        Held {
            store,
            lease,
            armed: true,
        }
    }

    /// The lease as it is now (renewals move its deadline).
    pub(crate) fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The lease, for completing or releasing it; the guard no longer releases it.
    pub(crate) fn take(mut self) -> Lease {
        self.armed = false;
        self.lease.duplicate()
    }

    /// Forgets the lease without releasing it (it was lost: releasing would be refused).
    fn forget(mut self) {
        self.armed = false;
    }
}

impl<St: IdempotencyStore + Clone> Drop for Held<St> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Outside a runtime (a blocking caller) the lease simply runs out at its deadline.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (store, lease) = (self.store.clone(), self.lease.duplicate());
            rt.spawn(async move {
                let _ = store.release(lease).await;
            });
        }
    }
}

/// How a leased run ended; `X` is what the cancel future gives.
pub(crate) enum Ran<T, St: IdempotencyStore + Clone, X = ()> {
    /// The work finished while the lease was held; here is the lease, to record the result.
    Done(T, Held<St>),
    /// The lease was lost while the work ran: taken over (`Error::StaleLease`, and no lease
    /// is handed back: there is nothing to release), or not renewed before it ran out (the
    /// renewal's error, and the lease, which the caller may release or drop). The work was
    /// dropped; nothing may be recorded.
    Lost(Error, Option<Held<St>>),
    /// `cancel` fired first: the work was dropped; the lease is handed back to be released
    /// (dropping it releases it in the background).
    Cancelled(Held<St>, X),
}

/// [`run`] with nothing to cancel it but dropping the whole future (an HTTP request): the
/// work's output and the held lease, or the error that lost the lease.
pub(crate) async fn run_to_end<St, F>(
    store: &St,
    held: Held<St>,
    lease: Duration,
    work: F,
) -> Result<(F::Output, Held<St>), Error>
where
    St: IdempotencyStore + Clone,
    F: Future,
{
    let never = std::future::pending::<std::convert::Infallible>();
    match run(store, held, lease, work, never).await {
        Ran::Done(out, held) => Ok((out, held)),
        Ran::Lost(e, _) => Err(e),
        Ran::Cancelled(_, never) => match never {},
    }
}

/// Runs `work` under `held`, renewing it by `lease` every `lease / 3`, until the work finishes,
/// the lease is lost, or `cancel` completes. A work that finishes at its first poll costs no
/// timer. Outside a Tokio runtime the work runs without renewal.
pub(crate) async fn run<St, F, C>(
    store: &St,
    mut held: Held<St>,
    lease: Duration,
    work: F,
    cancel: C,
) -> Ran<F::Output, St, C::Output>
where
    St: IdempotencyStore + Clone,
    F: Future,
    C: Future,
{
    let mut work = std::pin::pin!(work);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(work.as_mut().poll(cx)));
    if let std::task::Poll::Ready(out) = first.await {
        return Ran::Done(out, held);
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Ran::Done(work.await, held);
    }
    let every = (lease / 3).max(Duration::from_millis(1));
    let mut valid_until = Instant::now() + lease;
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cancel = std::pin::pin!(cancel);
    loop {
        tokio::select! {
            out = &mut work => return Ran::Done(out, held),
            x = &mut cancel => return Ran::Cancelled(held, x),
            _ = tick.tick() => {
                let asked = Instant::now();
                match store.renew(&mut held.lease, lease).await {
                    Ok(_) => valid_until = asked + lease,
                    Err(e @ Error::StaleLease { .. }) => {
                        tracing::warn!(target: "idemkv::lease", token = held.lease.token(), "lease lost to a takeover while the work ran; the work is dropped");
                        held.forget();
                        return Ran::Lost(e, None);
                    }
                    // Another try at the next tick, if the lease lasts until then.
                    Err(e) if Instant::now() + every >= valid_until => {
                        tracing::error!(target: "idemkv::lease", error = %e, "lease renewal failed until the lease ran out; the work is dropped");
                        return Ran::Lost(e, Some(held));
                    }
                    Err(e) => {
                        tracing::warn!(target: "idemkv::lease", error = %e, "lease renewal failed; retrying at the next tick");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Begin, Fingerprint, Key, Snapshot, Store};

    fn acquire(store: &Store, id: &str, lease: Duration) -> Lease {
        match store.blocking_begin(Key::new("runner", id), Fingerprint::NONE, lease) {
            Ok(Begin::Acquired(l)) => l,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn renews_while_the_work_runs_longer_than_the_lease() {
        let store = Store::in_memory();
        let lease = Duration::from_millis(90);
        let held = Held::new(store.clone(), acquire(&store, "long", lease));
        let work = tokio::time::sleep(lease * 4);
        match run(&store, held, lease, work, std::future::pending::<()>()).await {
            Ran::Done((), held) => {
                let l = held.take();
                store
                    .blocking_complete(&l, b"done", None)
                    .expect("still the holder");
            }
            _ => panic!("the lease was lost"),
        }
    }

    #[tokio::test]
    async fn a_takeover_ends_the_run_as_lost() {
        let store = Store::in_memory();
        let lease = Duration::from_millis(60);
        let l = acquire(&store, "taken", lease);
        let first_token = l.token();
        let held = Held::new(store.clone(), l);
        // Someone else ends this lease (here: removes the key and takes it afresh).
        let thief = {
            let store = store.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                store
                    .blocking_remove(Key::new("runner", "taken"))
                    .expect("remove");
                acquire(&store, "taken", Duration::from_secs(60))
            }
        };
        let thief = tokio::spawn(thief);
        let work = tokio::time::sleep(Duration::from_secs(5));
        let ran = run(&store, held, lease, work, std::future::pending::<()>()).await;
        assert!(matches!(ran, Ran::Lost(Error::StaleLease { .. }, None)));
        let new = thief.await.expect("thief");
        assert!(new.token() > first_token);
    }

    #[tokio::test]
    async fn cancel_and_drop_release_the_key_at_once() {
        let store = Store::in_memory();
        let lease = Duration::from_secs(60);
        let held = Held::new(store.clone(), acquire(&store, "cancel", lease));
        let ran = run(
            &store,
            held,
            lease,
            std::future::pending::<()>(),
            tokio::time::sleep(Duration::from_millis(5)),
        )
        .await;
        assert!(matches!(ran, Ran::Cancelled(_, ())));
        drop(ran);
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store
                .blocking_get(Key::new("runner", "cancel"))
                .expect("get"),
            None
        );

        // A dropped guard (the request's future dropped, or a panic) releases too.
        drop(Held::new(store.clone(), acquire(&store, "drop", lease)));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!matches!(
            store.blocking_get(Key::new("runner", "drop")).expect("get"),
            Some(Snapshot::InFlight { .. })
        ));
    }
}
