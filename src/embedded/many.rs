//! Many keys in one call, for adapters that process a batch (the Kafka processor takes a
//! partition's fetched messages together): `begin_many` leases many keys, `complete_many`
//! records many results. Each call locks every shard involved (in index order, as a batch
//! does) and writes its changes as one log record. Taken only when the calls wait for the
//! disk (`Immediate`, see `Store::batch_calls_pay`): there the one wait a call is the gain;
//! otherwise one call a key costs less, and the trait methods make those instead.
//!
//! Invariants:
//! - Each item gets the answer its single-key operation would give at that moment, as if the
//!   items ran one after another: a key that an earlier item of the same call acquired is held
//!   by it (a later one answers `InProgress`, or `Mismatch` under another fingerprint), and a
//!   lease completed by an earlier item is no longer held (`StaleLease`).
//! - The changes of a call are all in one log record and applied together, or (if the log or
//!   a store-wide limit refuses them) none is: then the call fails as a whole and changed
//!   nothing.

use std::time::Duration;

use hashbrown::HashTable;

use super::engine::{Inner, Settle, ShardGuard};
use super::lease_ops::{Verdict, judge, verdict_counted};
use super::txn::{Change, Delta};
use crate::clock::Timestamp;
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::limits::nonzero;
use crate::model::{Begin, Completion, Lease};
use crate::record::{Kind, Record};
use crate::shard::eq_key;
use crate::wal::LeaseSync;
use crate::wal::format::Op;

/// The shards of `hashes`, sorted and without repeats: the order they are locked in.
fn lock_order(inner: &Inner, hashes: impl Iterator<Item = u64>) -> Vec<usize> {
    let mut order: Vec<usize> = hashes.map(|h| inner.shard_index(h)).collect();
    order.sort_unstable();
    order.dedup();
    order
}

impl Inner {
    /// `begin` (without waiting) on each of `keys`, as one log record. `Err` only if the
    /// whole call was refused (the log, a store-wide limit): then nothing changed.
    pub(crate) fn begin_many(
        &self,
        keys: &[(Key<'_>, Fingerprint)],
        lease: Duration,
        sync: LeaseSync,
        settle: &Settle,
    ) -> Result<Vec<Result<Begin, Error>>, Error> {
        let lazy = sync == LeaseSync::Deferred;
        let lease_ms = nonzero(lease, "the lease duration")?;
        let now = self.now();
        let deadline = now.saturating_add(lease_ms);
        let hashes: Vec<u64> = keys.iter().map(|(k, _)| self.hash(*k)).collect();
        let order = lock_order(self, hashes.iter().copied());
        // Each key's position in `guards`, once.
        let at: Vec<usize> = hashes
            .iter()
            .map(|&h| order.partition_point(|&i| i < self.shard_index(h)))
            .collect();
        let mut guards: Vec<ShardGuard<'_>> =
            order.iter().map(|&i| self.lock_index(i, settle)).collect();

        // 1. Judge every key against what it holds; nothing changes yet.
        let mut answers: Vec<Result<Begin, Error>> = Vec::with_capacity(keys.len());
        let mut changes: Vec<(usize, u64, Key<'_>, Change<'_>)> = Vec::new();
        let mut deltas: Vec<Delta> = Vec::new();
        let mut acquiring: Vec<(usize, Verdict, u64)> = Vec::new();
        // The items that acquired their key so far, by key: a repeat is found in O(1), not by
        // a scan of the items before it (batches run to hundreds of keys).
        let mut held: HashTable<usize> = HashTable::with_capacity(keys.len());
        for (i, (&(key, fingerprint), &hash)) in keys.iter().zip(&hashes).enumerate() {
            if let Err(e) = self.check_key(key) {
                answers.push(Err(e));
                continue;
            }
            // A key acquired earlier in this call is held by that lease: in progress, or a
            // mismatch under another fingerprint, as `begin` would answer.
            if let Some(&j) = held.find(hash, |&j| keys[j].0 == key) {
                answers.push(Ok(if keys[j].1 == fingerprint {
                    Begin::InProgress {
                        deadline: Timestamp::from_millis(deadline),
                    }
                } else {
                    Begin::Mismatch
                }));
                continue;
            }
            let p = at[i];
            let found = guards[p].table.find(hash, eq_key(key));
            let old_size = found.map(Record::size);
            match judge(found, now, fingerprint) {
                Err(e) => answers.push(Err(e)),
                Ok(Verdict::Answer(outcome)) => answers.push(Ok(outcome)),
                Ok(acquire) => {
                    let token = self.next_seq(&mut guards[p].counters, hash);
                    let change = acquire.change(token, deadline, fingerprint);
                    deltas.push(change.delta_sized(key, old_size));
                    changes.push((p, hash, key, change));
                    answers.push(Ok(Begin::Acquired(Lease {
                        key: key.to_owned(),
                        hash: Some(hash),
                        token,
                        deadline: Timestamp::from_millis(deadline),
                        fingerprint,
                        takeover: matches!(acquire, Verdict::TakeOver),
                    })));
                    acquiring.push((i, acquire, token));
                    held.insert_unique(hash, i, |&j| hashes[j]);
                }
            }
        }

        // 2. One log record for every lease, then the counters.
        if !changes.is_empty() {
            self.commit_many_sized(&mut guards, Op::Begin, &changes, &deltas, lazy)?;
        }
        for (answer, &p) in answers.iter().zip(&at) {
            if let Ok(outcome) = answer {
                verdict_counted(&mut guards[p].counters, outcome);
            }
        }
        for (i, verdict, token) in &acquiring {
            let c = &mut guards[at[*i]].counters;
            verdict.count(c, keys[*i].0, *token);
        }
        Ok(answers)
    }

    /// `complete` of each item. Those without writes are checked together and written as one
    /// log record; an item with writes is its own batch (`complete_batch`) after them. `Err`
    /// only if the shared record was refused (the log, a store-wide limit): then none of the
    /// items without writes changed.
    pub(crate) fn complete_many(
        &self,
        items: &[Completion<'_>],
        settle: &Settle,
    ) -> Result<Vec<Result<Timestamp, Error>>, Error> {
        let now = self.now();
        let mut results: Vec<Option<Result<Timestamp, Error>>> = vec![None; items.len()];
        let mut plain: Vec<(usize, u64, u64)> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            if !item.writes.is_empty() {
                continue;
            }
            let checked = self
                .check_value(item.response)
                .and_then(|()| match item.ttl {
                    Some(d) => nonzero(d, "the ttl"),
                    None => Ok(self.default_ttl_ms),
                });
            match checked {
                Ok(ttl_ms) => plain.push((i, self.lease_hash(item.lease), ttl_ms)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !plain.is_empty() {
            let order = lock_order(self, plain.iter().map(|&(_, h, _)| h));
            let pos = |h: u64| order.partition_point(|&i| i < self.shard_index(h));
            let mut guards: Vec<ShardGuard<'_>> =
                order.iter().map(|&i| self.lock_index(i, settle)).collect();
            let mut changes: Vec<(usize, u64, Key<'_>, Change<'_>)> = Vec::new();
            let mut deltas: Vec<Delta> = Vec::new();
            let mut done: Vec<(usize, u64)> = Vec::new();
            // The keys completed so far in this call (indexes into `items`).
            let mut completed: HashTable<usize> = HashTable::with_capacity(plain.len());
            for &(i, hash, ttl_ms) in &plain {
                let lease = items[i].lease;
                let key = lease.key();
                let p = pos(hash);
                let twice = completed
                    .find(hash, |&j| items[j].lease.key() == key)
                    .is_some();
                let holder = guards[p]
                    .table
                    .find(hash, eq_key(key))
                    .filter(|_| !twice)
                    .ok_or(Error::StaleLease { token: lease.token })
                    .and_then(|rec| Self::check_holder(rec, lease).map(|()| rec));
                match holder {
                    Ok(rec) => {
                        let expires = now.saturating_add(ttl_ms);
                        let change = Change::Put {
                            kind: Kind::Completed,
                            a: now,
                            b: expires,
                            fingerprint: rec.header().fingerprint,
                            value: items[i].response,
                        };
                        deltas.push(change.delta(key, Some(rec)));
                        changes.push((p, hash, key, change));
                        done.push((i, expires));
                        completed.insert_unique(hash, i, |&j| self.lease_hash(items[j].lease));
                    }
                    Err(e) => results[i] = Some(self.note(Err(e))),
                }
            }
            if !changes.is_empty() {
                self.commit_many_sized(&mut guards, Op::Complete, &changes, &deltas, false)?;
            }
            for (&(p, hash, _, _), &(i, expires)) in changes.iter().zip(&done) {
                let shard = &mut *guards[p];
                shard.counters.completions += 1;
                shard.wake(hash);
                results[i] = Some(Ok(Timestamp::from_millis(expires)));
            }
        }
        for (i, item) in items.iter().enumerate() {
            if !item.writes.is_empty() {
                let r = self.complete(item.lease, item.response, item.ttl, item.writes, settle);
                results[i] = Some(self.note(r));
            }
        }
        // Every item was answered above; an unanswered one (none) would read as not completed.
        Ok(results
            .into_iter()
            .zip(items)
            .map(|(r, item)| {
                r.unwrap_or(Err(Error::StaleLease {
                    token: item.lease.token,
                }))
            })
            .collect())
    }
}
