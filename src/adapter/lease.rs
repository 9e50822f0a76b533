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
                held = match renew_tick(store, held, lease, every, &mut valid_until).await {
                    Ok(held) => held,
                    Err((e, held)) => return Ran::Lost(e, held),
                };
            }
        }
    }
}

/// One renewal tick of [`run`]: renews `held` by `lease` and moves `valid_until` (how long the
/// lease is known to last) on success. `Err` ends the run: the lease was taken over
/// (`StaleLease`, nothing handed back: there is nothing to release), or renewals failed until
/// the lease has less than one more tick (`every`) left (the error and the lease). A failure
/// with time left is logged and the lease handed back, for another try at the next tick.
pub(crate) async fn renew_tick<St>(
    store: &St,
    mut held: Held<St>,
    lease: Duration,
    every: Duration,
    valid_until: &mut Instant,
) -> Result<Held<St>, (Error, Option<Held<St>>)>
where
    St: IdempotencyStore + Clone,
{
    let asked = Instant::now();
    match store.renew(&mut held.lease, lease).await {
        Ok(_) => {
            *valid_until = asked + lease;
            Ok(held)
        }
        Err(e @ Error::StaleLease { .. }) => {
            tracing::warn!(target: "idemkv::lease", token = held.lease.token(), "lease lost to a takeover while the work ran; the work is dropped");
            held.forget();
            Err((e, None))
        }
        Err(e) if Instant::now() + every >= *valid_until => {
            tracing::error!(target: "idemkv::lease", error = %e, "lease renewal failed until the lease ran out; the work is dropped");
            Err((e, Some(held)))
        }
        Err(e) => {
            tracing::warn!(target: "idemkv::lease", error = %e, "lease renewal failed; retrying at the next tick");
            Ok(held)
        }
    }
}

#[cfg(all(test, not(loom)))]
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

/// loom models of the runner's protocol with the store: every interleaving of a renewal tick
/// (the real [`renew_tick`]) with a takeover, a cancel (the release a cancelled run makes) and
/// a completion, over the real store code (its locks come from loom, see `src/sync.rs`).
///
/// `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --lib loom`
#[cfg(all(test, loom))]
mod loom {
    use super::*;
    use crate::{Begin, Fingerprint, Key, ManualClock, Snapshot, Store};
    use ::loom::thread;

    const LEASE: Duration = Duration::from_secs(10);

    fn setup() -> (ManualClock, Store, Held<Store>) {
        let clock = ManualClock::new(0);
        let store = Store::builder()
            .shards(1)
            .sweep_interval(None)
            .clock(clock.clone())
            .build()
            .expect("store");
        let Ok(Begin::Acquired(l)) = store.blocking_begin(key(), Fingerprint::NONE, LEASE) else {
            panic!("first begin")
        };
        let held = Held::new(store.clone(), l);
        (clock, store, held)
    }

    fn key() -> Key<'static> {
        Key::new("runner", "k")
    }

    /// One tick of the runner, as `run` makes it (an in-memory store's renewal never waits).
    fn tick(store: &Store, held: Held<Store>) -> Result<Held<Store>, (Error, Option<Held<Store>>)> {
        let mut valid_until = Instant::now() + LEASE;
        crate::adapter::ready(renew_tick(store, held, LEASE, LEASE / 3, &mut valid_until))
    }

    /// Another caller: once the lease has run out, it begins the key (a takeover if the runner
    /// has not renewed) and completes it. Whether it wrote.
    fn thief(store: Store, clock: ManualClock) -> thread::JoinHandle<bool> {
        thread::spawn(move || {
            clock.advance(LEASE);
            match store.blocking_begin(key(), Fingerprint::NONE, LEASE) {
                Ok(Begin::Acquired(new)) => {
                    assert!(new.is_takeover(), "the key was never released");
                    store.blocking_complete(&new, b"thief", None).is_ok()
                }
                Ok(Begin::InProgress { .. }) => false,
                Ok(Begin::Completed(c)) => {
                    assert_eq!(c.response, b"runner");
                    false
                }
                other => panic!("{other:?}"),
            }
        })
    }

    fn response(store: &Store) -> Vec<u8> {
        match store.blocking_get(key()) {
            Ok(Some(Snapshot::Completed(c))) => c.response,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_renewal_racing_a_takeover_leaves_one_writer() {
        ::loom::model(|| {
            let (clock, store, held) = setup();
            let thief = thief(store.clone(), clock);
            let runner_won = match tick(&store, held) {
                Ok(held) => match store.blocking_complete(&held.take(), b"runner", None) {
                    Ok(_) => true,
                    Err(Error::StaleLease { .. }) => false,
                    Err(e) => panic!("{e}"),
                },
                // Taken over: the run ends, and nothing is handed back to release.
                Err((Error::StaleLease { .. }, None)) => false,
                Err((e, _)) => panic!("{e}"),
            };
            let thief_won = thief.join().expect("join");
            assert!(
                runner_won ^ thief_won,
                "runner={runner_won} thief={thief_won}"
            );
            let want: &[u8] = if runner_won { b"runner" } else { b"thief" };
            assert_eq!(response(&store), want);
        });
    }

    #[test]
    fn a_cancel_racing_a_takeover_never_frees_the_new_holder() {
        ::loom::model(|| {
            let (clock, store, held) = setup();
            let (s2, c2) = (store.clone(), clock);
            let thief = thread::spawn(move || {
                c2.advance(LEASE);
                match s2.blocking_begin(key(), Fingerprint::NONE, LEASE) {
                    Ok(Begin::Acquired(new)) => Some(new.token()),
                    Ok(Begin::InProgress { .. }) => None,
                    other => panic!("{other:?}"),
                }
            });
            // The run is cancelled after a tick: the runner releases what it holds.
            let released = match tick(&store, held) {
                Ok(held) => store.blocking_release(held.take()).is_ok(),
                Err((Error::StaleLease { .. }, None)) => false,
                Err((e, _)) => panic!("{e}"),
            };
            let thief = thief.join().expect("join");
            match (thief, store.blocking_get(key()).expect("get")) {
                // The thief holds the key: the runner's stale release must not have freed it.
                (Some(token), Some(Snapshot::InFlight { token: t, .. })) => assert_eq!(t, token),
                (Some(token), other) => panic!("thief's lease {token} is gone: {other:?}"),
                // The thief came while the renewed lease held; the release then freed the key.
                (None, now) => {
                    assert!(released);
                    assert_eq!(now, None);
                }
            }
        });
    }

    #[test]
    fn a_late_renewal_never_undoes_the_completion() {
        ::loom::model(|| {
            let (_clock, store, held) = setup();
            // A renewal tick still under way when the work's completion is recorded (the
            // same attempt: a copy of its lease).
            let late = Held::new(store.clone(), held.lease().duplicate());
            let s2 = store.clone();
            let renewer = thread::spawn(move || match tick(&s2, late) {
                Ok(h) => {
                    h.forget();
                    true
                }
                Err((Error::StaleLease { .. }, None)) => false,
                Err((e, _)) => panic!("{e}"),
            });
            let expires = store
                .blocking_complete(&held.take(), b"runner", None)
                .expect("the holder completes");
            let _ = renewer.join().expect("join");
            match store.blocking_get(key()) {
                Ok(Some(Snapshot::Completed(c))) => {
                    assert_eq!(c.response, b"runner");
                    assert_eq!(
                        c.expires_at, expires,
                        "a renewal moved the completed record"
                    );
                }
                other => panic!("the completion was undone: {other:?}"),
            }
        });
    }
}
