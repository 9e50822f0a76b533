//! Time, injected: the store never reads the system clock directly, so tests advance a
//! [`ManualClock`] instead of sleeping.
//!
//! Invariant: every timestamp the store compares (expiry, lease deadlines) comes from one
//! injected `Clock`, in milliseconds.

use std::fmt;
use std::time::Duration;

use crate::sync::{Arc, AtomicU64, Ordering};

/// A point in time, in milliseconds since the Unix epoch.
///
/// Milliseconds are the resolution of every deadline in idemkv (leases, TTLs), the same as
/// Redis' `PX`, so the embedded and Redis backends agree on what "expired" means.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const ZERO: Timestamp = Timestamp(0);
    /// The far future: used for "never expires".
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    /// A timestamp from milliseconds since the Unix epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + d`, rounded up to the next millisecond, saturating at [`Timestamp::MAX`].
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_to_millis_ceil(d)))
    }

    /// How long from `earlier` until `self`; zero if `self` is not later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Whole milliseconds in `d`, rounded up, so that a non-zero duration is never zero.
pub(crate) fn duration_to_millis_ceil(d: Duration) -> u64 {
    let ms = d.as_millis();
    let ms = if !d.subsec_nanos().is_multiple_of(1_000_000) {
        ms + 1
    } else {
        ms
    };
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// A source of the current time.
///
/// Implementations must be cheap (the store reads the clock once per operation) and should be
/// monotonic; if the clock steps backwards, leases and records simply live longer.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
///
/// On Linux it reads `CLOCK_REALTIME_COARSE`: the time of the last timer tick, about 5 ns a
/// read instead of about 35 ns, at a resolution of one tick (1–4 ms). Deadlines are whole
/// milliseconds and leases last seconds, so the coarseness is invisible to callers; it is
/// visible in the hot path, which reads the clock once per operation.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[cfg(target_os = "linux")]
    fn now(&self) -> Timestamp {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        let ms = (t.tv_sec as u64).saturating_mul(1000) + (t.tv_nsec as u64) / 1_000_000;
        Timestamp(ms)
    }

    #[cfg(not(target_os = "linux"))]
    fn now(&self) -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

/// A clock that only moves when told to; clones share the same time.
///
/// ```
/// use idemkv::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new(1_000);
/// clock.advance(Duration::from_secs(2));
/// assert_eq!(clock.now().as_millis(), 3_000);
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock that reads `start_ms` milliseconds since the Unix epoch.
    pub fn new(start_ms: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(start_ms)))
    }

    /// Moves the clock forward by `d` (rounded up to whole milliseconds).
    pub fn advance(&self, d: Duration) {
        self.0
            .fetch_add(duration_to_millis_ceil(d), Ordering::SeqCst);
    }

    /// Sets the clock to `ms` milliseconds since the Unix epoch.
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_to_milliseconds() {
        assert_eq!(duration_to_millis_ceil(Duration::from_micros(1)), 1);
        assert_eq!(duration_to_millis_ceil(Duration::from_millis(5)), 5);
        assert_eq!(duration_to_millis_ceil(Duration::from_micros(5_001)), 6);
        assert_eq!(duration_to_millis_ceil(Duration::MAX), u64::MAX);
        assert_eq!(
            Timestamp::MAX.saturating_add(Duration::from_secs(1)),
            Timestamp::MAX
        );
    }

    #[test]
    fn manual_clock_is_shared_by_clones() {
        let a = ManualClock::new(10);
        let b = a.clone();
        b.advance(Duration::from_millis(5));
        assert_eq!(a.now(), Timestamp::from_millis(15));
        a.set(3);
        assert_eq!(b.now().as_millis(), 3);
    }

    #[test]
    fn system_clock_agrees_with_std_within_a_tick() {
        let std_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let ours = SystemClock.now().as_millis();
        assert!(ours > 1_577_836_800_000);
        assert!(
            ours.abs_diff(std_ms) < 50,
            "coarse clock {ours} vs std {std_ms}"
        );
    }
}
