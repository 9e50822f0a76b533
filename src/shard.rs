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

/// Makes room for one more record in a full `table` (a no-op otherwise), so that the insert
/// that follows never grows the table itself. `hash_of` must be the function the table is
/// keyed by.
///
/// Why not let hashbrown grow it: its rehash computes each record's hash inside the loop that
/// moves it, and a record does not keep its hash, so every step waits for one cache miss on a
/// record (read in the table's hash order, which is random in memory): 85 % of a growth's
/// samples sat on that one load, and growth was 13 % of a run of fresh keys. Here the records
/// are first moved out in bucket order (no record read), then hashed in a loop of independent
/// iterations, where the processor overlaps many of those misses, then inserted by their
/// known hashes into a table sized for them (no hash is computed again).
#[inline]
pub(crate) fn make_room(table: &mut HashTable<Record>, hash_of: impl Fn(&Record) -> u64) {
    if table.len() < table.capacity() {
        return;
    }
    // Twice the records: the same doubling of buckets as hashbrown's own growth. A table whose
    // room went to tombstones (removals) is rebuilt at the same size or smaller instead.
    grow(table, (table.len() * 2).max(3), hash_of);
}

/// Rebuilds `table` with room for `capacity` records (at least its own).
#[cold]
#[inline(never)]
fn grow(table: &mut HashTable<Record>, capacity: usize, hash_of: impl Fn(&Record) -> u64) {
    let records: Vec<Record> = std::mem::take(table).into_iter().collect();
    // Records are prefetched this many ahead of the one being hashed: enough to keep several
    // misses in flight, few enough that they are still cached when their turn comes.
    const AHEAD: usize = 16;
    let hashes: Vec<u64> = (0..records.len())
        .map(|i| {
            if let Some(r) = records.get(i + AHEAD) {
                r.prefetch();
            }
            hash_of(&records[i])
        })
        .collect();
    let mut bigger = HashTable::with_capacity(capacity);
    for (record, hash) in records.into_iter().zip(hashes) {
        // Sized above: the hasher is never called.
        bigger.insert_unique(hash, record, &hash_of);
    }
    *table = bigger;
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;
    use crate::key::Fingerprint;
    use crate::record::NewRecord;

    fn record(id: &str) -> Record {
        Record::new(NewRecord {
            kind: Kind::Completed,
            a: 1,
            b: u64::MAX,
            fingerprint: Fingerprint::from_bytes([0; 16]),
            key: Key::new("s", id),
            value: id.as_bytes(),
        })
    }

    /// Inserts `id` the way the store does: room first, then an insert that must not grow.
    fn insert(table: &mut HashTable<Record>, hasher: &impl BuildHasher, id: &str) {
        let hash_of = |r: &Record| hasher.hash_one(r.key());
        let hash = hasher.hash_one(Key::new("s", id));
        make_room(table, hash_of);
        assert!(table.len() < table.capacity(), "make_room left no room");
        // hashbrown calls the hasher only to move records into a larger table.
        table.insert_unique(hash, record(id), |_| {
            panic!("the insert grew the table: make_room made too little room")
        });
    }

    fn find<'t>(
        table: &'t HashTable<Record>,
        hasher: &impl BuildHasher,
        id: &str,
    ) -> Option<&'t Record> {
        let key = Key::new("s", id);
        table.find(hasher.hash_one(key), eq_key(key))
    }

    #[test]
    fn growth_keeps_every_record_findable_and_doubles_the_table() {
        let hasher = foldhash::fast::RandomState::default();
        let mut table = HashTable::new();
        let mut capacities = vec![];
        for i in 0..10_000 {
            insert(&mut table, &hasher, &i.to_string());
            if capacities.last() != Some(&table.capacity()) {
                capacities.push(table.capacity());
            }
        }
        assert_eq!(table.len(), 10_000);
        for i in 0..10_000 {
            let id = i.to_string();
            let r = find(&table, &hasher, &id).expect("every record is found after growth");
            assert_eq!(r.value(), id.as_bytes());
        }
        assert!(find(&table, &hasher, "10000").is_none());
        // Each growth at least doubles the room (as hashbrown's own does), so 10,000 inserts
        // take about log2(10,000) growths, not one per insert.
        for pair in capacities.windows(2) {
            assert!(
                pair[1] >= 2 * pair[0] - 1,
                "grew from {} to {}",
                pair[0],
                pair[1]
            );
        }
        assert!(capacities.len() <= 14, "{capacities:?}");
    }

    #[test]
    fn a_table_full_of_removals_is_rebuilt_not_grown() {
        let hasher = foldhash::fast::RandomState::default();
        let mut table = HashTable::new();
        for i in 0..1000 {
            insert(&mut table, &hasher, &i.to_string());
        }
        let high = table.capacity();
        // Insert and remove forever with 1000 records live: the room the removals leave as
        // tombstones is reclaimed by rebuilding, so the table never outgrows its size.
        for i in 1000..50_000 {
            insert(&mut table, &hasher, &i.to_string());
            let old = (i - 1000).to_string();
            let key = Key::new("s", &old);
            let Ok(entry) = table.find_entry(hasher.hash_one(key), eq_key(key)) else {
                panic!("record {old} lost");
            };
            entry.remove();
            assert!(
                table.capacity() <= 2 * high,
                "{} > 2 x {high}",
                table.capacity()
            );
        }
        assert_eq!(table.len(), 1000);
        for i in 49_000..50_000 {
            assert!(find(&table, &hasher, &i.to_string()).is_some());
        }
    }
}
