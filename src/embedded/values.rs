//! Operations on values and stored requests: `get`, `remove`, versioned `cas`, and the
//! exactly-once protocol's `put_pending` / `take_pending`.
//!
//! Invariant: an expired record is invisible to every operation here, and is reclaimed (logged
//! as an expiry) by the first one that finds it.

use std::time::Duration;

use hashbrown::hash_table::Entry;

use super::engine::{Inner, Settle, cas_holds, cas_version, completed_of, kind_of, snapshot_of};
use super::txn::{Change, held};
use crate::clock::Timestamp;
use crate::error::{Error, RecordKind};
use crate::key::{Fingerprint, Key};
use crate::limits::{cas_value, nonzero};
use crate::model::{CasOutcome, Lease, PutPending, Snapshot, Take, Write};
use crate::record::Kind;
use crate::shard::{eq_key, is_dead};
use crate::wal::format::Op;

impl Inner {
    #[inline]
    pub(crate) fn get(&self, key: Key<'_>, settle: &Settle) -> Result<Option<Snapshot>, Error> {
        self.check_key(key)?;
        let hash = self.hash(key);
        let now = self.now();
        let mut guard = self.lock(hash, settle);
        let (table, mut book) = guard.parts();
        let Ok(slot) = table.find_entry(hash, eq_key(key)) else {
            return Ok(None);
        };
        if is_dead(slot.get(), now) {
            self.expire(&mut book, Entry::Occupied(slot), key);
            return Ok(None);
        }
        Ok(Some(snapshot_of(slot.get())))
    }
    #[inline]
    pub(crate) fn remove(&self, key: Key<'_>, settle: &Settle) -> Result<bool, Error> {
        self.check_key(key)?;
        let hash = self.hash(key);
        let now = self.now();
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let (table, mut book) = shard.parts();
        let Ok(slot) = table.find_entry(hash, eq_key(key)) else {
            return Ok(false);
        };
        if is_dead(slot.get(), now) {
            self.expire(&mut book, Entry::Occupied(slot), key);
            return Ok(false);
        }
        let slot = Entry::Occupied(slot);
        self.commit(&mut book, slot, key, Some(Op::Remove), Change::Delete)?;
        shard.wake(hash);
        Ok(true)
    }
    #[inline]
    pub(crate) fn cas(&self, write: &Write, settle: &Settle) -> Result<CasOutcome, Error> {
        self.cas_versioned(write, settle, None)
    }
    /// `cas`, writing version `fixed` instead of the next one when given (restoring a dump);
    /// the shard's versions then continue above it.
    #[inline]
    fn cas_versioned(
        &self,
        write: &Write,
        settle: &Settle,
        fixed: Option<u64>,
    ) -> Result<CasOutcome, Error> {
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
        let (table, mut book) = guard.parts();
        let slot = self.entry(table, hash, key);
        let (found, live) = match &slot {
            Entry::Occupied(e) => (true, Some(e.get()).filter(|r| !is_dead(r, now))),
            Entry::Vacant(_) => (false, None),
        };
        let current = cas_version(live)?;
        if !cas_holds(&write.op, current) {
            return Ok(CasOutcome::Conflict { current });
        }
        let was_dead = found && current.is_none();
        let version = match cas_value(&write.op) {
            // Deleting what is not there changes nothing, and logs nothing.
            None if !found => None,
            None => {
                self.commit(&mut book, slot, key, Some(Op::Cas), Change::Delete)?;
                None
            }
            Some(value) => {
                let version = match fixed {
                    Some(v) => {
                        book.counters.seq = book.counters.seq.max(v >> 16);
                        v
                    }
                    None => self.next_seq(book.counters, hash),
                };
                self.commit(
                    &mut book,
                    slot,
                    key,
                    Some(Op::Cas),
                    value_at(version, b, value),
                )?;
                Some(version)
            }
        };
        if was_dead {
            book.counters.expirations += 1;
        }
        Ok(CasOutcome::Applied { version })
    }
    /// A value with a given version, if the key holds nothing live: for restoring a dump.
    /// Later versions of the shard stay above it.
    pub(crate) fn restore_value(
        &self,
        key: Key<'_>,
        value: &[u8],
        version: u64,
        ttl: Option<Duration>,
        settle: &Settle,
    ) -> Result<bool, Error> {
        let mut write = Write::put_if_absent(key.to_owned(), value);
        write.ttl = ttl;
        match self.cas_versioned(&write, settle, Some(version)) {
            Ok(CasOutcome::Applied { .. }) => Ok(true),
            // A live value, or a live record of another kind: left as it is.
            Ok(CasOutcome::Conflict { .. }) | Err(Error::WrongKind { .. }) => Ok(false),
            Err(e) => Err(e),
        }
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
        let mut guard = self.lock(hash, settle);
        let (table, mut book) = guard.parts();
        let slot = self.entry(table, hash, key);
        let stored = Change::Put {
            kind: Kind::Pending,
            a: now,
            b: now.saturating_add(ttl_ms),
            fingerprint: Fingerprint::NONE,
            value: payload,
        };
        let found = held(&slot);
        let Some(rec) = found else {
            self.commit(&mut book, slot, key, Some(Op::PutPending), stored)?;
            return Ok(PutPending::Stored);
        };
        let dead = is_dead(rec, now);
        match rec.kind() {
            // A stored request is replaced; an expired record of another kind too.
            k @ (Kind::Pending | Kind::Completed | Kind::Value) if dead || k == Kind::Pending => {
                self.commit(&mut book, slot, key, Some(Op::PutPending), stored)?;
                if dead {
                    book.counters.expirations += 1;
                }
                Ok(PutPending::Stored)
            }
            Kind::InFlightPending => Ok(PutPending::InProgress {
                deadline: Timestamp::from_millis(rec.header().b),
            }),
            Kind::Completed => Ok(PutPending::Completed),
            other => Err(Error::WrongKind {
                expected: RecordKind::Pending,
                found: kind_of(other),
            }),
        }
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
        let (table, mut book) = guard.parts();
        let Ok(slot) = table.find_entry(hash, eq_key(key)) else {
            return Ok(Take::NotFound);
        };
        let rec = slot.get();
        if is_dead(rec, now) {
            self.expire(&mut book, Entry::Occupied(slot), key);
            return Ok(Take::NotFound);
        }
        let takeover = match rec.kind() {
            Kind::Pending => false,
            Kind::InFlightPending if rec.header().b > now => {
                book.counters.in_progress += 1;
                return Ok(Take::InProgress {
                    deadline: Timestamp::from_millis(rec.header().b),
                });
            }
            Kind::InFlightPending => true,
            Kind::Completed => {
                book.counters.replayed += 1;
                return Ok(Take::Completed(completed_of(rec)));
            }
            other => {
                return Err(Error::WrongKind {
                    expected: RecordKind::Pending,
                    found: kind_of(other),
                });
            }
        };
        let payload = rec.value().to_vec();
        let token = self.next_seq(book.counters, hash);
        let taken = Change::Restamp {
            kind: Kind::InFlightPending,
            a: token,
            b: deadline,
        };
        self.commit(
            &mut book,
            Entry::Occupied(slot),
            key,
            Some(Op::TakePending),
            taken,
        )?;
        book.counters.acquired += 1;
        book.counters.takeovers += u64::from(takeover);
        Ok(Take::Acquired {
            lease: Lease {
                key: key.to_owned(),
                hash: Some(hash),
                token,
                deadline: Timestamp::from_millis(deadline),
                fingerprint: Fingerprint::NONE,
                takeover,
            },
            payload,
        })
    }
}

/// A versioned value as a change: version `version`, expiring at `b` (`u64::MAX`: never).
fn value_at(version: u64, b: u64, value: &[u8]) -> Change<'_> {
    Change::Put {
        kind: Kind::Value,
        a: version,
        b,
        fingerprint: Fingerprint::NONE,
        value,
    }
}
