//! The one mutation path. Every change to a record — by `begin`, `complete` and its batch,
//! `release`, `renew`, `cas`, the pending-request operations, `remove`, the sweeper, an
//! expiry found on access — and every item recovery replays, is a [`Change`] (a redo image of
//! one key) applied by the same code:
//!
//! 1. **account**: the records and bytes it adds or frees, against the store-wide limits (a
//!    live change that would exceed one is refused here, changing nothing); the shard's own
//!    counters follow in step 3;
//! 2. **log**: one log record holding the change (or the whole batch) — unless replaying;
//! 3. **apply**: the table, the shard's counters, and the shard's next reclaim time, which is
//!    derived from the record written.
//!
//! [`Inner::commit`] does this for one key at a slot its caller has already found (so the hot
//! path looks a key up once); [`Inner::commit_many`] for a batch over several locked shards, as
//! one log record. Recovery calls `commit` with no operation: limits are not checked (the data
//! was accepted before) and nothing is logged.
//!
//! Invariant: a change that fails (a limit, a poisoned log) leaves the record, the counters and
//! the limits exactly as they were; one that succeeds was logged before it was applied.

use hashbrown::hash_table::Entry;

use super::engine::{Inner, ShardGuard};
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::record::{Kind, NewRecord, Record};
use crate::shard::{Book, eq_key, reclaim_at};
use crate::sync::Ordering;
use crate::wal::format::{Item, Op, RecordWriter};

/// The new state of one key.
#[derive(Clone, Copy, Debug)]
pub(super) enum Change<'a> {
    /// The key holds this record from now on (fresh, or replacing what it held).
    Put {
        kind: Kind,
        a: u64,
        b: u64,
        fingerprint: Fingerprint,
        value: &'a [u8],
    },
    /// The key's record keeps its value and fingerprint; its kind and header fields change (a
    /// takeover, a renewal, a release, a take). Nothing happens at a vacant key.
    Restamp { kind: Kind, a: u64, b: u64 },
    /// The key holds nothing from now on.
    Delete,
}

/// The record a slot holds, if any.
#[inline]
pub(super) fn held<'s>(slot: &'s Entry<'_, Record>) -> Option<&'s Record> {
    match slot {
        Entry::Occupied(o) => Some(o.get()),
        Entry::Vacant(_) => None,
    }
}

/// Records and bytes a change adds (positive) or frees (negative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Delta {
    records: i64,
    bytes: i64,
}

impl std::ops::AddAssign for Delta {
    fn add_assign(&mut self, o: Delta) {
        self.records += o.records;
        self.bytes += o.bytes;
    }
}

impl Change<'_> {
    /// What the change does to the store's size at a key that holds `old`.
    pub(super) fn delta(&self, key: Key<'_>, old: Option<&Record>) -> Delta {
        self.delta_sized(key, old.map(Record::size))
    }

    /// [`delta`](Self::delta), given only the size of what the key holds.
    pub(super) fn delta_sized(&self, key: Key<'_>, old: Option<usize>) -> Delta {
        let (records, bytes) = old.map_or((0, 0), |size| (1, size as i64));
        match self {
            Change::Put { value, .. } => Delta {
                records: 1 - records,
                bytes: Record::size_for(key, value.len()) as i64 - bytes,
            },
            Change::Restamp { .. } => Delta::default(),
            Change::Delete => Delta {
                records: -records,
                bytes: -bytes,
            },
        }
    }

    /// The change as a log item: a redo image of the key (a restamp logs the whole record).
    fn encode(&self, w: &mut RecordWriter<'_>, key: Key<'_>, old: Option<&Record>) {
        match *self {
            Change::Put {
                kind,
                a,
                b,
                fingerprint,
                value,
            } => w.put_parts(key, kind, a, b, fingerprint, value),
            Change::Restamp { kind, a, b } => {
                if let Some(r) = old {
                    w.put_parts(key, kind, a, b, r.header().fingerprint, r.value());
                }
            }
            Change::Delete => w.delete(key),
        }
    }

    /// The change a logged item describes (recovery).
    fn of_item<'a>(item: &Item<'a>) -> Change<'a> {
        match *item {
            Item::Put {
                kind,
                a,
                b,
                fingerprint,
                value,
                ..
            } => Change::Put {
                kind,
                a,
                b,
                fingerprint,
                value,
            },
            Item::Delete { .. } => Change::Delete,
        }
    }
}

impl Inner {
    /// The slot of `key` for `change`: a put may need a vacant one (reserving room), the others
    /// only act on what is there.
    fn slot_for<'t>(
        &self,
        table: &'t mut hashbrown::HashTable<Record>,
        hash: u64,
        key: Key<'_>,
        change: &Change<'_>,
    ) -> Option<Entry<'t, Record>> {
        match change {
            Change::Put { .. } => Some(self.entry(table, hash, key)),
            Change::Restamp { .. } | Change::Delete => table
                .find_entry(hash, eq_key(key))
                .ok()
                .map(Entry::Occupied),
        }
    }

    /// Admits `records` more records and `bytes` more bytes to the store-wide totals, or
    /// fails leaving them as they were. The totals are kept (in atomics) only when a limit is
    /// configured: without one, accounting costs no atomic operation.
    #[inline]
    fn admit(&self, records: u64, bytes: u64) -> Result<(), Error> {
        if !self.limited {
            return Ok(());
        }
        if records > 0 {
            let before = self.used_records.fetch_add(records, Ordering::Relaxed);
            if before.saturating_add(records) > self.max_records {
                self.used_records.fetch_sub(records, Ordering::Relaxed);
                return Err(Error::RecordLimit {
                    max: self.max_records,
                });
            }
        }
        if bytes > 0 {
            let before = self.used_bytes.fetch_add(bytes, Ordering::Relaxed);
            if before.saturating_add(bytes) > self.max_bytes {
                self.used_bytes.fetch_sub(bytes, Ordering::Relaxed);
                self.used_records.fetch_sub(records, Ordering::Relaxed);
                return Err(Error::ByteLimit {
                    needed: bytes,
                    max: self.max_bytes,
                });
            }
        }
        Ok(())
    }
    /// Returns records and bytes to the store-wide totals.
    #[inline]
    fn give_back(&self, records: u64, bytes: u64) {
        if self.limited {
            self.used_records.fetch_sub(records, Ordering::Relaxed);
            self.used_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Step 1: accounts `d` to the store-wide totals. `check`: refuse (changing nothing) if a
    /// limit would be exceeded; otherwise (replay) just count. Costs nothing without limits.
    #[inline]
    fn account(&self, d: Delta, check: bool) -> Result<(), Error> {
        if !self.limited {
            return Ok(());
        }
        if check {
            self.admit(d.records.max(0) as u64, d.bytes.max(0) as u64)?;
            self.give_back((-d.records).max(0) as u64, (-d.bytes).max(0) as u64);
        } else {
            self.add_used(d);
        }
        Ok(())
    }

    /// Undoes [`account`](Self::account) of `d` (the log refused the change).
    fn unaccount(&self, d: Delta) {
        if self.limited {
            self.add_used(Delta {
                records: -d.records,
                bytes: -d.bytes,
            });
        }
    }

    fn add_used(&self, d: Delta) {
        self.used_records
            .fetch_add(d.records as u64, Ordering::Relaxed);
        self.used_bytes.fetch_add(d.bytes as u64, Ordering::Relaxed);
    }

    /// Step 3: applies an accounted (and, live, logged) change at `slot`; cannot fail.
    #[inline]
    fn apply_at(
        &self,
        book: &mut Book<'_>,
        slot: Entry<'_, Record>,
        key: Key<'_>,
        change: Change<'_>,
        d: Delta,
    ) {
        let leased = |k: Kind| matches!(k, Kind::InFlight | Kind::InFlightPending);
        let was_leased = matches!(&slot, Entry::Occupied(o) if leased(o.get().kind()));
        let now_leased = match (&slot, &change) {
            (_, Change::Put { kind, .. }) | (Entry::Occupied(_), Change::Restamp { kind, .. }) => {
                leased(*kind)
            }
            _ => false,
        };
        let written = match (slot, change) {
            (
                Entry::Vacant(v),
                Change::Put {
                    kind,
                    a,
                    b,
                    fingerprint,
                    value,
                },
            ) => {
                let rec = Record::new(NewRecord {
                    kind,
                    a,
                    b,
                    fingerprint,
                    key,
                    value,
                });
                let at = reclaim_at(&rec, self.lease_retention_ms);
                v.insert(rec);
                Some(at)
            }
            (
                Entry::Occupied(mut o),
                Change::Put {
                    kind,
                    a,
                    b,
                    fingerprint,
                    value,
                },
            ) => {
                let rec = o.get_mut();
                rec.set_value(value);
                rec.set_kind(kind);
                let h = rec.header_mut();
                (h.a, h.b, h.fingerprint) = (a, b, fingerprint);
                Some(reclaim_at(rec, self.lease_retention_ms))
            }
            (Entry::Occupied(mut o), Change::Restamp { kind, a, b }) => {
                let rec = o.get_mut();
                rec.set_kind(kind);
                let h = rec.header_mut();
                (h.a, h.b) = (a, b);
                Some(reclaim_at(rec, self.lease_retention_ms))
            }
            (Entry::Occupied(o), Change::Delete) => {
                o.remove();
                None
            }
            (Entry::Vacant(_), Change::Restamp { .. } | Change::Delete) => None,
        };
        book.counters.add(d.records, d.bytes);
        book.counters.in_flight =
            (book.counters.in_flight + u64::from(now_leased)).wrapping_sub(u64::from(was_leased));
        if let Some(at) = written {
            *book.next_reclaim = (*book.next_reclaim).min(at);
        }
    }

    /// One change of the key at `slot` (found by the caller under the shard's lock): account,
    /// log as `op`, apply. `op: None` replays a logged change (no limits, no log).
    #[inline]
    pub(super) fn commit(
        &self,
        book: &mut Book<'_>,
        slot: Entry<'_, Record>,
        key: Key<'_>,
        op: Option<Op>,
        change: Change<'_>,
    ) -> Result<(), Error> {
        self.commit_with(book, slot, key, op, change, false)
    }

    /// [`commit`](Self::commit); `lazy`: no one waits for this change by itself (a deferred
    /// lease), so the log need not hurry it to the disk (see `Wal::append_with`).
    #[inline]
    pub(super) fn commit_with(
        &self,
        book: &mut Book<'_>,
        slot: Entry<'_, Record>,
        key: Key<'_>,
        op: Option<Op>,
        change: Change<'_>,
        lazy: bool,
    ) -> Result<(), Error> {
        let old = held(&slot);
        let d = change.delta(key, old);
        self.account(d, op.is_some())?;
        if let Some(op) = op {
            let logged = self.log(&mut book.counters.last_seq, op, lazy, |w| {
                change.encode(w, key, old)
            });
            if let Err(e) = logged {
                self.unaccount(d);
                return Err(e);
            }
        }
        self.apply_at(book, slot, key, change, d);
        Ok(())
    }

    /// Changes of several keys as one log record, all or nothing: each change names the
    /// position of its key's shard in `guards` (all locked by the caller) and the key's hash.
    /// Accounted as a whole, logged as one record (so after a crash it is there entirely or not
    /// at all), then applied. `lazy` as for [`commit_with`](Self::commit_with).
    pub(super) fn commit_many(
        &self,
        guards: &mut [ShardGuard<'_>],
        op: Op,
        changes: &[(usize, u64, Key<'_>, Change<'_>)],
        lazy: bool,
    ) -> Result<(), Error> {
        let deltas: Vec<Delta> = changes
            .iter()
            .map(|&(pos, hash, key, change)| {
                change.delta(key, guards[pos].table.find(hash, eq_key(key)))
            })
            .collect();
        self.commit_many_sized(guards, op, changes, &deltas, lazy)
    }

    /// [`commit_many`](Self::commit_many) with each change's delta already known (the caller
    /// looked at each key's record to decide its change): one lookup a key fewer.
    pub(super) fn commit_many_sized(
        &self,
        guards: &mut [ShardGuard<'_>],
        op: Op,
        changes: &[(usize, u64, Key<'_>, Change<'_>)],
        deltas: &[Delta],
        lazy: bool,
    ) -> Result<(), Error> {
        let mut total = Delta::default();
        deltas.iter().for_each(|&d| total += d);
        self.account(total, true)?;
        let mut seq = 0;
        let logged = self.log(&mut seq, op, lazy, |w| {
            for &(pos, hash, key, change) in changes {
                // Only a restamp logs from the record it changes; a put or a delete is whole.
                let old = match change {
                    Change::Restamp { .. } => guards[pos].table.find(hash, eq_key(key)),
                    Change::Put { .. } | Change::Delete => None,
                };
                change.encode(w, key, old);
            }
        });
        if let Err(e) = logged {
            self.unaccount(total);
            return Err(e);
        }
        for g in guards.iter_mut() {
            g.counters.last_seq = g.counters.last_seq.max(seq);
        }
        for (&(pos, hash, key, change), &d) in changes.iter().zip(deltas) {
            let (table, mut book) = guards[pos].parts();
            if let Some(slot) = self.slot_for(table, hash, key, &change) {
                self.apply_at(&mut book, slot, key, change, d);
            }
        }
        Ok(())
    }

    /// Drops an expired record found at a key (`slot` is occupied by it). If the log refuses,
    /// the record stays (it is invisible anyway) and the caller's own change will be refused
    /// with the same error.
    #[inline]
    pub(super) fn expire(&self, book: &mut Book<'_>, slot: Entry<'_, Record>, key: Key<'_>) {
        if self
            .commit(book, slot, key, Some(Op::Expire), Change::Delete)
            .is_ok()
        {
            book.counters.expirations += 1;
        }
    }

    /// Replays one logged item (recovery) through [`commit`](Self::commit) with logging and
    /// limits off. Returns the high bits of the token or version it carries (0 if none), so
    /// that new tokens are issued above every logged one.
    pub(super) fn apply(&self, item: &Item<'_>) -> u64 {
        let key = item.key();
        let hash = self.hash(key);
        let mut guard = self.shards[self.shard_index(hash)].0.lock();
        let (table, mut book) = guard.parts();
        let change = Change::of_item(item);
        if let Some(slot) = self.slot_for(table, hash, key, &change) {
            // Replay checks no limit and logs nothing: it cannot fail.
            let _ = self.commit(&mut book, slot, key, None, change);
        }
        match item {
            Item::Put {
                kind: Kind::InFlight | Kind::InFlightPending | Kind::Value,
                a,
                ..
            } => a >> 16,
            _ => 0,
        }
    }
}
