//! A one-shot wake-up that both blocking and async waiters can use.
//!
//! Invariant: a signal is registered under the same shard lock that saw the key in flight, and
//! fired under it: no lost wake-up.
//!
//! A caller that finds a key in flight registers a [`Signal`] in the key's shard *while it
//! still holds the shard lock* it used to see the key in flight; whoever completes, releases or
//! removes the key fires every signal registered for it under the same lock. So a wake-up can
//! never fall between "saw it in flight" and "started waiting".

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::sync::{Arc, Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    fired: bool,
    wakers: Vec<Waker>,
}

/// A one-shot event.
#[derive(Debug)]
pub(crate) struct Signal {
    state: Mutex<State>,
    cv: Condvar,
}

impl Signal {
    pub(crate) fn new() -> Arc<Signal> {
        Arc::new(Signal {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        })
    }

    /// Fires the signal: wakes blocked and async waiters, now and later.
    pub(crate) fn fire(&self) {
        let wakers = {
            let mut s = self.state.lock();
            s.fired = true;
            std::mem::take(&mut s.wakers)
        };
        self.cv.notify_all();
        for w in wakers {
            w.wake();
        }
    }

    /// Blocks until fired or `timeout` passes; returns whether it fired. Under a model checker
    /// the timeout is ignored: only the signal ends the wait.
    pub(crate) fn wait_blocking(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.state.lock();
        while !s.fired {
            let now = std::time::Instant::now();
            if crate::sync::WAITS_TIME_OUT && now >= deadline {
                break;
            }
            self.cv.wait_for(&mut s, deadline - now);
        }
        s.fired
    }

    /// A future that is ready once the signal fires.
    pub(crate) fn fired(this: &Arc<Self>) -> Fired {
        Fired(Arc::clone(this))
    }
}

/// Future returned by [`Signal::fired`].
pub(crate) struct Fired(Arc<Signal>);

impl Future for Fired {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.0.state.lock();
        if s.fired {
            return Poll::Ready(());
        }
        if !s.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            s.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(all(test, not(any(loom, shuttle))))]
mod tests {
    use super::*;

    #[test]
    fn blocking_wait_times_out_then_sees_fire() {
        let s = Signal::new();
        assert!(!s.wait_blocking(Duration::from_millis(5)));
        let s2 = Arc::clone(&s);
        let t = std::thread::spawn(move || s2.wait_blocking(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(10));
        s.fire();
        assert!(t.join().expect("join"));
        assert!(s.wait_blocking(Duration::ZERO));
    }

    #[tokio::test]
    async fn async_wait_wakes() {
        let s = Signal::new();
        let s2 = Arc::clone(&s);
        let h = tokio::spawn(async move { Signal::fired(&s2).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.fire();
        tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("woken")
            .expect("task");
    }
}
