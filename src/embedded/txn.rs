//! The mutation primitives: every change to a record goes through one of them — insert into a
//! vacant slot, overwrite, restamp (kind and header fields), delete, expire — and so does
//! recovery's replay of a logged item ([`Inner::apply`]). Each one accounts the change to its
//! shard's counters and the store-wide limits, logs it (unless replaying), then applies it.
//!
//! Invariant: a primitive that fails (a limit, a poisoned log) leaves the record, the counters
//! and the limits exactly as they were; one that succeeds has logged before it applied.

use super::engine::Inner;
use crate::error::Error;
use crate::key::Fingerprint;
use crate::record::{Kind, NewRecord, Record};
use crate::shard::{Counters, eq_key, reclaim_at};
use crate::sync::Ordering;
use crate::wal::format::{Item, Op};

impl Inner {
    /// Turns `rec` (same key) into a fresh record, reusing its slot: reserves, logs, applies.
    #[expect(
        clippy::too_many_arguments,
        reason = "the header fields, spelled out at each call"
    )]
    #[inline]
    pub(super) fn overwrite(
        &self,
        c: &mut Counters,
        op: Op,
        rec: &mut Record,
        kind: Kind,
        a: u64,
        b: u64,
        fingerprint: Fingerprint,
        value: &[u8],
    ) -> Result<(), Error> {
        let (old, new) = (rec.size(), rec.size() - rec.value().len() + value.len());
        self.resize(c, old, new)?;
        let logged = self.log(&mut c.last_seq, op, |w| {
            w.put_parts(rec.key(), kind, a, b, fingerprint, value)
        });
        if let Err(e) = logged {
            let _ = self.resize(c, new, old);
            return Err(e);
        }
        rec.set_value(value);
        rec.set_kind(kind);
        let h = rec.header_mut();
        h.a = a;
        h.b = b;
        h.fingerprint = fingerprint;
        Ok(())
    }
    /// Changes a record's kind and `a`/`b` fields (a takeover, a renew, a release): logs, applies.
    #[inline]
    pub(super) fn restamp(
        &self,
        c: &mut Counters,
        op: Op,
        rec: &mut Record,
        kind: Kind,
        a: u64,
        b: u64,
    ) -> Result<(), Error> {
        let fp = rec.header().fingerprint;
        self.log(&mut c.last_seq, op, |w| {
            w.put_parts(rec.key(), kind, a, b, fp, rec.value())
        })?;
        rec.set_kind(kind);
        let h = rec.header_mut();
        h.a = a;
        h.b = b;
        Ok(())
    }
    /// Inserts a new record into a vacant slot: reserves, logs, applies.
    #[inline]
    pub(super) fn insert(
        &self,
        c: &mut Counters,
        op: Op,
        slot: hashbrown::hash_table::VacantEntry<'_, Record>,
        parts: NewRecord<'_>,
    ) -> Result<(), Error> {
        let size = Record::size_for(parts.key, parts.value.len()) as u64;
        self.reserve(c, 1, size)?;
        let logged = self.log(&mut c.last_seq, op, |w| {
            w.put_parts(
                parts.key,
                parts.kind,
                parts.a,
                parts.b,
                parts.fingerprint,
                parts.value,
            )
        });
        if let Err(e) = logged {
            self.unreserve(c, 1, size);
            return Err(e);
        }
        slot.insert(Record::new(parts));
        Ok(())
    }
    /// Removes the record at `entry`: logs, applies.
    #[inline]
    pub(super) fn delete(
        &self,
        c: &mut Counters,
        op: Op,
        entry: hashbrown::hash_table::OccupiedEntry<'_, Record>,
    ) -> Result<(), Error> {
        self.log(&mut c.last_seq, op, |w| w.delete(entry.get().key()))?;
        let (rec, _) = entry.remove();
        self.unreserve(c, 1, rec.size() as u64);
        Ok(())
    }
    /// Drops an expired record found at a key. If the log refuses, the record stays (it is
    /// invisible anyway) and the caller's own change will be refused with the same error.
    #[inline]
    pub(super) fn expire(
        &self,
        c: &mut Counters,
        entry: hashbrown::hash_table::OccupiedEntry<'_, Record>,
    ) {
        if self.delete(c, Op::Expire, entry).is_ok() {
            c.expirations += 1;
        }
    }
    /// Replays one logged item (recovery). Limits are not applied: the data was accepted
    /// before. Returns the high bits of the token or version it carries (0 if none), so that
    /// new tokens are issued above every logged one.
    pub(super) fn apply(&self, item: &Item<'_>) -> u64 {
        let key = item.key();
        let hash = self.hash(key);
        let idx = self.shard_index(hash);
        let retention = self.lease_retention_ms;
        let limited = self.limited;
        let mut guard = self.shards[idx].0.lock();
        let shard = &mut *guard;
        let entry = shard.table.find_entry(hash, eq_key(key));
        let (records, bytes): (i64, i64) = match (item, entry) {
            (Item::Delete { .. }, Ok(e)) => {
                let (rec, _) = e.remove();
                (-1, -(rec.size() as i64))
            }
            (Item::Delete { .. }, Err(_)) => (0, 0),
            (
                &Item::Put {
                    kind,
                    a,
                    b,
                    fingerprint,
                    value,
                    ..
                },
                found,
            ) => {
                let parts = NewRecord {
                    kind,
                    a,
                    b,
                    fingerprint,
                    key,
                    value,
                };
                let new = Record::new(parts);
                shard.next_reclaim = shard.next_reclaim.min(reclaim_at(&new, retention));
                match found {
                    Ok(mut e) => {
                        let old = std::mem::replace(e.get_mut(), new);
                        (0, e.get().size() as i64 - old.size() as i64)
                    }
                    Err(_) => {
                        let size = new.size() as i64;
                        shard.table.insert_unique(hash, new, |r| self.hash(r.key()));
                        (1, size)
                    }
                }
            }
        };
        shard.counters.add(records, bytes);
        if limited {
            self.used_records
                .fetch_add(records as u64, Ordering::Relaxed);
            self.used_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
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
