//! The one place the crate takes its synchronisation primitives from.
//!
//! Invariant: the shard locks, waiter signals and atomics of the lease protocol come from here,
//! so the loom models exercise the real code.
//!
//! Under `cfg(loom)` every lock, condition variable, atomic and `Arc` the lease protocol touches
//! comes from loom, so the loom tests explore all interleavings of the real code. Under
//! `cfg(shuttle)` they come from shuttle, whose schedulers pick one interleaving per run (the
//! race fuzz targets drive the choice from the fuzz input). Otherwise they are `parking_lot`'s
//! and `std`'s. The wrappers give all three the same small API.
//!
//! Under either model checker there is no time: a condition-variable wait lasts until it is
//! notified, so a lost wake-up is a deadlock the checker reports instead of a slow timeout.

#[cfg(not(any(loom, shuttle)))]
mod imp {
    pub(crate) use std::sync::Arc;
    pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A mutex without poisoning.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(parking_lot::Mutex<T>);
    pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(parking_lot::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock()
        }
    }

    /// A condition variable paired with [`Mutex`].
    #[derive(Debug, Default)]
    pub(crate) struct Condvar(parking_lot::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Condvar(parking_lot::Condvar::new())
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
        /// Waits until notified or `timeout` passes; spurious wake-ups are possible.
        pub(crate) fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, timeout: Duration) {
            let _ = self.0.wait_for(guard, timeout);
        }
    }
}

#[cfg(any(loom, shuttle))]
mod imp {
    // loom wins if both are set; shuttle's `Arc` is std's (it needs no modelling there).
    #[cfg(loom)]
    use loom::sync as checker;
    #[cfg(all(shuttle, not(loom)))]
    use shuttle::sync as checker;

    pub(crate) use checker::Arc;
    pub(crate) use checker::atomic::{AtomicU64, Ordering};
    use std::ops::{Deref, DerefMut};
    use std::time::Duration;

    #[derive(Debug)]
    pub(crate) struct Mutex<T>(checker::Mutex<T>);

    /// Holds the checker's guard in an `Option` so that [`Condvar::wait_for`] can hand it over
    /// and take it back, matching parking_lot's `&mut guard` signature.
    pub(crate) struct MutexGuard<'a, T>(Option<checker::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(checker::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().unwrap_or_else(|e| e.into_inner())))
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            match &self.0 {
                Some(g) => g,
                None => unreachable!("guard is only absent inside Condvar::wait_for"),
            }
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            match &mut self.0 {
                Some(g) => g,
                None => unreachable!("guard is only absent inside Condvar::wait_for"),
            }
        }
    }

    #[derive(Debug)]
    pub(crate) struct Condvar(checker::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Condvar(checker::Condvar::new())
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
        /// No time under a checker: the wait lasts until a notification, so a lost wake-up
        /// shows up as a deadlock that the checker reports.
        pub(crate) fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, _timeout: Duration) {
            if let Some(g) = guard.0.take() {
                guard.0 = Some(self.0.wait(g).unwrap_or_else(|e| e.into_inner()));
            }
        }
    }
}

pub(crate) use imp::*;

/// Whether waits are bounded by time. Under a model checker they are not (see the module
/// docs): a wait ends only when it is notified.
pub(crate) const WAITS_TIME_OUT: bool = !cfg!(any(loom, shuttle));
