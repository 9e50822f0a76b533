//! Operations on values and stored requests: `get`, `remove`, versioned `cas`, and the
//! exactly-once protocol's `put_pending` / `take_pending`.
//!
//! Invariant: an expired record is invisible to every operation here, and is reclaimed (logged
//! as an expiry) by the first one that finds it.

use std::time::Duration;

use hashbrown::hash_table::Entry;

use super::engine::{Inner, Settle, cas_holds, cas_version, completed_of, kind_of, snapshot_of};
use crate::clock::Timestamp;
use crate::error::{Error, RecordKind};
use crate::key::{Fingerprint, Key};
use crate::limits::{cas_value, nonzero};
use crate::model::{CasOutcome, Lease, PutPending, Snapshot, Take, Write};
use crate::record::{Kind, NewRecord, Record};
use crate::shard::{Counters, eq_key, is_dead};
use crate::wal::format::Op;

impl Inner {
    #[inline]
    pub(crate) fn get(&self, key: Key<'_>, settle: &Settle) -> Result<Option<Snapshot>, Error> {
        self.check_key(key)?;
        let hash = self.hash(key);
        let now = self.now();
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let Ok(entry) = shard.table.find_entry(hash, eq_key(key)) else {
            return Ok(None);
        };
        let rec = entry.get();
        if is_dead(rec, now) {
            self.expire(&mut shard.counters, entry);
            return Ok(None);
        }
        Ok(Some(snapshot_of(rec)))
    }
    #[inline]
    pub(crate) fn remove(&self, key: Key<'_>, settle: &Settle) -> Result<bool, Error> {
        self.check_key(key)?;
        let hash = self.hash(key);
        let now = self.now();
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let Ok(entry) = shard.table.find_entry(hash, eq_key(key)) else {
            return Ok(false);
        };
        if is_dead(entry.get(), now) {
            self.expire(&mut shard.counters, entry);
            return Ok(false);
        }
        self.delete(&mut shard.counters, Op::Remove, entry)?;
        shard.wake(hash);
        Ok(true)
    }
    #[inline]
    pub(crate) fn cas(&self, write: &Write, settle: &Settle) -> Result<CasOutcome, Error> {
        let key = write.key.as_key();
        self.check_key(key)?;
        if let Some(v) = cas_value(&write.op) {
            self.check_value(v)?;
        }
        let now = self.now();
        let b = match write.ttl {
            Some(d) => now.saturating_add(nonzero(d, "the ttl")?),
            None => u64::MAX,
        };
        let hash = self.hash(key);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let entry = shard.table.entry(hash, eq_key(key), |r| self.hash(r.key()));
        let live = match &entry {
            Entry::Occupied(e) if !is_dead(e.get(), now) => Some(e.get()),
            _ => None,
        };
        let current = cas_version(live)?;
        if !cas_holds(&write.op, current) {
            return Ok(CasOutcome::Conflict { current });
        }
        let was_dead = matches!(&entry, Entry::Occupied(_)) && current.is_none();
        let c = &mut shard.counters;
        let outcome = match (cas_value(&write.op), entry) {
            (None, Entry::Occupied(e)) => {
                self.delete(c, Op::Cas, e)?;
                CasOutcome::Applied { version: None }
            }
            (None, Entry::Vacant(_)) => CasOutcome::Applied { version: None },
            (Some(v), Entry::Occupied(mut e)) => {
                let version = self.next_seq(c, hash);
                self.overwrite(
                    c,
                    Op::Cas,
                    e.get_mut(),
                    Kind::Value,
                    version,
                    b,
                    Fingerprint::NONE,
                    v,
                )?;
                CasOutcome::Applied {
                    version: Some(version),
                }
            }
            (Some(v), Entry::Vacant(slot)) => {
                let version = self.next_seq(c, hash);
                self.insert(
                    c,
                    Op::Cas,
                    slot,
                    NewRecord {
                        kind: Kind::Value,
                        a: version,
                        b,
                        fingerprint: Fingerprint::NONE,
                        key,
                        value: v,
                    },
                )?;
                CasOutcome::Applied {
                    version: Some(version),
                }
            }
        };
        if was_dead {
            shard.counters.expirations += 1;
        }
        shard.note_reclaim_at(b);
        Ok(outcome)
    }
    #[inline]
    pub(crate) fn put_pending(
        &self,
        key: Key<'_>,
        payload: &[u8],
        ttl: Option<Duration>,
        settle: &Settle,
    ) -> Result<PutPending, Error> {
        self.check_key(key)?;
        self.check_value(payload)?;
        let ttl_ms = match ttl {
            Some(d) => nonzero(d, "the ttl")?,
            None => self.pending_ttl_ms,
        };
        let hash = self.hash(key);
        let now = self.now();
        let b = now.saturating_add(ttl_ms);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let parts = NewRecord {
            kind: Kind::Pending,
            a: now,
            b,
            fingerprint: Fingerprint::NONE,
            key,
            value: payload,
        };
        let outcome = match shard.table.entry(hash, eq_key(key), |r| self.hash(r.key())) {
            Entry::Vacant(slot) => {
                self.insert(&mut shard.counters, Op::PutPending, slot, parts)?;
                PutPending::Stored
            }
            Entry::Occupied(mut e) => {
                let rec = e.get_mut();
                let dead = is_dead(rec, now);
                match rec.kind() {
                    // A stored request is replaced; an expired record of another kind too.
                    k @ (Kind::Pending | Kind::Completed | Kind::Value)
                        if dead || k == Kind::Pending =>
                    {
                        let c = &mut shard.counters;
                        self.overwrite(
                            c,
                            Op::PutPending,
                            rec,
                            Kind::Pending,
                            now,
                            b,
                            Fingerprint::NONE,
                            payload,
                        )?;
                        if dead {
                            c.expirations += 1;
                        }
                        PutPending::Stored
                    }
                    Kind::InFlightPending => PutPending::InProgress {
                        deadline: Timestamp::from_millis(rec.header().b),
                    },
                    Kind::Completed => PutPending::Completed,
                    other => {
                        return Err(Error::WrongKind {
                            expected: RecordKind::Pending,
                            found: kind_of(other),
                        });
                    }
                }
            }
        };
        shard.note_reclaim_at(b);
        Ok(outcome)
    }
    #[inline]
    pub(crate) fn take_pending(
        &self,
        key: Key<'_>,
        lease: Duration,
        settle: &Settle,
    ) -> Result<Take, Error> {
        self.check_key(key)?;
        let lease_ms = nonzero(lease, "the lease duration")?;
        let hash = self.hash(key);
        let now = self.now();
        let deadline = now.saturating_add(lease_ms);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let Ok(mut entry) = shard.table.find_entry(hash, eq_key(key)) else {
            return Ok(Take::NotFound);
        };
        if is_dead(entry.get(), now) {
            self.expire(&mut shard.counters, entry);
            return Ok(Take::NotFound);
        }
        let rec = entry.get_mut();
        let acquire = |c: &mut Counters, rec: &mut Record, takeover: bool| -> Result<Take, Error> {
            let token = self.next_seq(c, hash);
            self.restamp(
                c,
                Op::TakePending,
                rec,
                Kind::InFlightPending,
                token,
                deadline,
            )?;
            Ok(Take::Acquired {
                lease: Lease {
                    key: key.to_owned(),
                    hash: Some(hash),
                    token,
                    deadline: Timestamp::from_millis(deadline),
                    fingerprint: Fingerprint::NONE,
                    takeover,
                },
                payload: rec.value().to_vec(),
            })
        };
        let outcome = match rec.kind() {
            Kind::Pending => {
                shard.counters.acquired += 1;
                acquire(&mut shard.counters, rec, false)?
            }
            Kind::InFlightPending if rec.header().b > now => {
                shard.counters.in_progress += 1;
                Take::InProgress {
                    deadline: Timestamp::from_millis(rec.header().b),
                }
            }
            Kind::InFlightPending => {
                shard.counters.acquired += 1;
                shard.counters.takeovers += 1;
                acquire(&mut shard.counters, rec, true)?
            }
            Kind::Completed => {
                shard.counters.replayed += 1;
                Take::Completed(completed_of(rec))
            }
            other => {
                return Err(Error::WrongKind {
                    expected: RecordKind::Pending,
                    found: kind_of(other),
                });
            }
        };
        if let Take::Acquired { .. } = outcome {
            shard.note_reclaim_at(deadline.saturating_add(self.lease_retention_ms));
        }
        Ok(outcome)
    }
}
