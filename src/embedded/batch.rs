//! A completion with a batch of versioned writes on other keys, all or nothing.
//!
//! Invariant: every shard involved is locked in index order (so two batches cannot deadlock),
//! every condition is checked before anything changes, and the whole batch goes through
//! `txn::commit_many`: the limits for all of it, one log record (after a crash it is there
//! entirely or not at all), then the apply.

use super::engine::{Inner, Settle, ShardGuard, cas_holds, cas_version};
use super::txn::Change;
use crate::clock::Timestamp;
use crate::error::Error;
use crate::key::Fingerprint;
use crate::limits::{cas_value, ms};
use crate::model::{Lease, Write};
use crate::record::Kind;
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
        let fp = rec.header().fingerprint;
        let mut dead = 0u64;
        for (i, (w, &h)) in writes.iter().zip(&hashes).enumerate() {
            let found = guards[pos(h)].table.find(h, eq_key(w.key.as_key()));
            let live = found.filter(|r| !is_dead(r, now));
            let current = cas_version(live)?;
            if !cas_holds(&w.op, current) {
                return Err(Error::BatchConflict { index: i, current });
            }
            dead += u64::from(found.is_some() && live.is_none());
        }

        // 2. The changes, each write with a fresh version; then, through the one mutation
        // path, the limits, one log record for all of them, and the apply.
        let done = Change::Put {
            kind: Kind::Completed,
            a: now,
            b: expires,
            fingerprint: fp,
            value: response,
        };
        let mut changes = Vec::with_capacity(writes.len() + 1);
        changes.push((pos(lease_hash), lease_hash, lease.key(), done));
        for (w, &h) in writes.iter().zip(&hashes) {
            let change = match cas_value(&w.op) {
                Some(value) => Change::Put {
                    kind: Kind::Value,
                    a: self.next_seq(&mut guards[pos(h)].counters, h),
                    b: w.ttl.map_or(u64::MAX, |d| now.saturating_add(ms(d))),
                    fingerprint: Fingerprint::NONE,
                    value,
                },
                None => Change::Delete,
            };
            changes.push((pos(h), h, w.key.as_key(), change));
        }
        self.commit_many(&mut guards, Op::Complete, &changes, false)?;
        let shard = &mut *guards[pos(lease_hash)];
        shard.counters.expirations += dead;
        shard.counters.completions += 1;
        shard.wake(lease_hash);
        Ok(Timestamp::from_millis(expires))
    }
}
