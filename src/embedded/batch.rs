//! A completion with a batch of versioned writes on other keys, all or nothing.
//!
//! Invariant: every shard involved is locked in index order (so two batches cannot deadlock),
//! every condition and limit is checked before anything changes, and the whole batch is one log
//! record: after a crash it is there entirely or not at all.

use super::engine::{Inner, Settle, ShardGuard, cas_holds, cas_version};
use crate::clock::Timestamp;
use crate::error::Error;
use crate::key::Fingerprint;
use crate::limits::{cas_value, ms};
use crate::model::{Lease, Write};
use crate::record::{Kind, NewRecord, Record};
use crate::shard::{eq_key, is_dead};
use crate::wal::format::Op;

impl Inner {
    /// Completion plus versioned writes on other keys, all or nothing: every shard involved is
    /// locked (in index order, so two batches cannot deadlock), every condition and limit is
    /// checked, and only then is anything changed.
    pub(super) fn complete_batch(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl_ms: u64,
        writes: &[Write],
        settle: &Settle,
    ) -> Result<Timestamp, Error> {
        self.check_batch(lease, writes)?;
        let now = self.now();
        let expires = now.saturating_add(ttl_ms);
        let lease_hash = self.lease_hash(lease);
        let hashes: Vec<u64> = writes.iter().map(|w| self.hash(w.key.as_key())).collect();
        let mut order: Vec<usize> = std::iter::once(lease_hash)
            .chain(hashes.iter().copied())
            .map(|h| self.shard_index(h))
            .collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<ShardGuard<'_>> =
            order.iter().map(|&i| self.lock_index(i, settle)).collect();
        let pos = |hash: u64| -> usize {
            let idx = self.shard_index(hash);
            order.partition_point(|&i| i < idx)
        };

        // 1. Check: the lease, every condition, the limits. Nothing changes yet.
        let lease_shard = &guards[pos(lease_hash)];
        let Some(rec) = lease_shard.table.find(lease_hash, eq_key(lease.key())) else {
            return Err(Error::StaleLease { token: lease.token });
        };
        Self::check_holder(rec, lease)?;
        let mut records_delta: i64 = 0;
        let mut bytes_delta: i64 = (response.len() as i64) - (rec.value().len() as i64);
        let mut dead = 0u64;
        for (i, (w, &h)) in writes.iter().zip(&hashes).enumerate() {
            let found = guards[pos(h)].table.find(h, eq_key(w.key.as_key()));
            let live = found.filter(|r| !is_dead(r, now));
            let current = cas_version(live)?;
            if !cas_holds(&w.op, current) {
                return Err(Error::BatchConflict { index: i, current });
            }
            let old = found.map_or(0, |r| r.size() as i64);
            dead += u64::from(found.is_some() && live.is_none());
            let new =
                cas_value(&w.op).map_or(0, |v| Record::size_for(w.key.as_key(), v.len()) as i64);
            records_delta += i64::from(new > 0) - i64::from(old > 0);
            bytes_delta += new - old;
        }
        let (grow_r, grow_b) = (records_delta.max(0) as u64, bytes_delta.max(0) as u64);
        let (shrink_r, shrink_b) = ((-records_delta).max(0) as u64, (-bytes_delta).max(0) as u64);
        self.admit(grow_r, grow_b)?;
        self.give_back(shrink_r, shrink_b);

        // 2. Log the whole batch as one record: after a crash, all of it is there or none.
        let fp = rec.header().fingerprint;
        let stamped: Vec<(u64, u64)> = writes
            .iter()
            .zip(&hashes)
            .map(|(w, &h)| {
                let version = self.next_seq(&mut guards[pos(h)].counters, h);
                (
                    version,
                    w.ttl.map_or(u64::MAX, |d| now.saturating_add(ms(d))),
                )
            })
            .collect();
        let mut seq = 0;
        let logged = self.log(&mut seq, Op::Complete, |w| {
            w.put_parts(lease.key(), Kind::Completed, now, expires, fp, response);
            for (wr, &(version, b)) in writes.iter().zip(&stamped) {
                match cas_value(&wr.op) {
                    Some(v) => w.put_parts(
                        wr.key.as_key(),
                        Kind::Value,
                        version,
                        b,
                        Fingerprint::NONE,
                        v,
                    ),
                    None => w.delete(wr.key.as_key()),
                }
            }
        });
        if let Err(e) = logged {
            self.give_back(grow_r, grow_b);
            let _ = self.admit(shrink_r, shrink_b);
            return Err(e);
        }
        for g in &mut guards {
            g.counters.last_seq = g.counters.last_seq.max(seq);
        }

        // 3. Apply. Admitted and logged, so nothing below can fail; each shard's own counters
        // follow its own changes.
        let counters_pos = pos(lease_hash);
        guards[counters_pos].counters.expirations += dead;
        for ((w, &h), &(version, b)) in writes.iter().zip(&hashes).zip(&stamped) {
            let shard = &mut *guards[pos(h)];
            let key = w.key.as_key();
            let c = &mut shard.counters;
            match (cas_value(&w.op), shard.table.find_entry(h, eq_key(key))) {
                (None, Ok(entry)) => {
                    let (rec, _) = entry.remove();
                    c.add(-1, -(rec.size() as i64));
                }
                (None, Err(_)) => {}
                (Some(v), Ok(mut entry)) => {
                    let r = entry.get_mut();
                    c.add(0, v.len() as i64 - r.value().len() as i64);
                    r.set_value(v);
                    r.set_kind(Kind::Value);
                    let hd = r.header_mut();
                    hd.a = version;
                    hd.b = b;
                    hd.fingerprint = Fingerprint::NONE;
                    shard.note_reclaim_at(b);
                }
                (Some(v), Err(_)) => {
                    c.add(1, Record::size_for(key, v.len()) as i64);
                    shard.table.insert_unique(
                        h,
                        Record::new(NewRecord {
                            kind: Kind::Value,
                            a: version,
                            b,
                            fingerprint: Fingerprint::NONE,
                            key,
                            value: v,
                        }),
                        |r| self.hash(r.key()),
                    );
                    shard.note_reclaim_at(b);
                }
            }
        }
        let shard = &mut *guards[counters_pos];
        if let Some(rec) = shard.table.find_mut(lease_hash, eq_key(lease.key())) {
            shard
                .counters
                .add(0, response.len() as i64 - rec.value().len() as i64);
            rec.set_value(response);
            rec.set_kind(Kind::Completed);
            let h = rec.header_mut();
            h.a = now;
            h.b = expires;
        }
        shard.note_reclaim_at(expires);
        shard.wake(lease_hash);
        Ok(Timestamp::from_millis(expires))
    }
}
