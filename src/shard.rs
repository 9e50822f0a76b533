//! One shard: a Swiss table of thin record pointers, the waiters on its keys, and its counters.
//! Everything here is touched only under the shard's lock.
//!
//! Invariant: everything here is touched only under the shard's lock; `is_dead` and
//! `reclaim_at` are the only two functions that decide expiry.

use hashbrown::HashTable;

use crate::key::Key;
use crate::record::{Kind, Record};
use crate::sync::Arc;
use crate::wait::Signal;

/// Counters kept per shard, under its lock, so counting costs no atomic operation.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counters {
    /// Records in the shard.
    pub(crate) records: u64,
    /// Bytes accounted in the shard.
    pub(crate) bytes: u64,
    /// The shard's token/version counter (see `Inner::next_seq`).
    pub(crate) seq: u64,
    /// Sequence number of the last log record of a change in this shard (0: none). Anything
    /// read from the shard is durable once this is.
    pub(crate) last_seq: u64,
    pub(crate) acquired: u64,
    pub(crate) replayed: u64,
    pub(crate) in_progress: u64,
    pub(crate) mismatches: u64,
    pub(crate) takeovers: u64,
    pub(crate) expirations: u64,
    pub(crate) completions: u64,
    pub(crate) releases: u64,
    /// Records held by a lease (expired ones not yet taken over or reclaimed included).
    pub(crate) in_flight: u64,
}

impl Counters {
    /// Applies a change in records and bytes (which the caller has admitted to the limits).
    pub(crate) fn add(&mut self, records: i64, bytes: i64) {
        self.records = self.records.wrapping_add_signed(records);
        self.bytes = self.bytes.wrapping_add_signed(bytes);
    }
}

#[derive(Debug, Default)]
pub(crate) struct Shard {
    pub(crate) table: HashTable<Record>,
    /// Callers waiting for a key to leave the in-flight state, by the key's hash. Usually empty.
    pub(crate) waiters: Vec<(u64, Arc<Signal>)>,
    pub(crate) counters: Counters,
    /// No record in this shard can be reclaimed before this time (ms): lets the sweeper skip
    /// the shard without scanning it.
    pub(crate) next_reclaim: u64,
}

/// What a change to a shard's table also updates: its counters and its next reclaim time.
/// Borrowed beside the table (see [`Shard::parts`]), so a change can hold an entry of the
/// table and update both.
pub(crate) struct Book<'s> {
    pub(crate) counters: &'s mut Counters,
    pub(crate) next_reclaim: &'s mut u64,
}

impl Shard {
    /// The table and the book, borrowed apart.
    pub(crate) fn parts(&mut self) -> (&mut HashTable<Record>, Book<'_>) {
        (
            &mut self.table,
            Book {
                counters: &mut self.counters,
                next_reclaim: &mut self.next_reclaim,
            },
        )
    }

    pub(crate) fn new() -> Self {
        Shard {
            next_reclaim: u64::MAX,
            ..Shard::default()
        }
    }

    /// Registers a waiter for the key with `hash`.
    pub(crate) fn add_waiter(&mut self, hash: u64) -> Arc<Signal> {
        let s = Signal::new();
        self.waiters.push((hash, Arc::clone(&s)));
        s
    }

    /// Forgets a waiter that gave up.
    pub(crate) fn remove_waiter(&mut self, signal: &Arc<Signal>) {
        self.waiters.retain(|(_, s)| !Arc::ptr_eq(s, signal));
    }

    /// Wakes everyone waiting on the key with `hash` (and, rarely, on another key with the same
    /// hash: such a waiter looks again and waits again).
    pub(crate) fn wake(&mut self, hash: u64) {
        if self.waiters.is_empty() {
            return;
        }
        self.waiters.retain(|(h, s)| {
            if *h == hash {
                s.fire();
                false
            } else {
                true
            }
        });
    }
}

/// Whether a record has expired and must be treated as absent. In-flight records never expire
/// this way: an expired lease stays visible so that the next `begin` can say it took over.
pub(crate) fn is_dead(rec: &Record, now: u64) -> bool {
    match rec.kind() {
        Kind::Completed | Kind::Pending | Kind::Value => rec.header().b <= now,
        Kind::InFlight | Kind::InFlightPending => false,
    }
}

/// When the sweeper may drop a record: at expiry, or for a lease, `retention` ms after its
/// deadline (until then a retry learns that it takes over an abandoned attempt).
pub(crate) fn reclaim_at(rec: &Record, lease_retention_ms: u64) -> u64 {
    match rec.kind() {
        Kind::Completed | Kind::Pending | Kind::Value => rec.header().b,
        Kind::InFlight | Kind::InFlightPending => rec.header().b.saturating_add(lease_retention_ms),
    }
}

pub(crate) fn eq_key(key: Key<'_>) -> impl Fn(&Record) -> bool + '_ {
    move |r: &Record| r.matches(key)
}
