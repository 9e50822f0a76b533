//! The lease protocol on one key: `begin` (acquire, replay, in progress, mismatch, takeover),
//! one round of `begin_wait`, `complete` without a batch, `release` and `renew`.
//!
//! Invariant: only the holder of the key's current token can complete, release or renew it; a
//! new token for a key is larger than every token and version the key had before.

use std::time::{Duration, Instant};

use hashbrown::hash_table::Entry;

use super::engine::{Inner, Round, Settle, Waiter, completed_of, kind_of};
use super::txn::{Change, held};
use crate::clock::Timestamp;
use crate::error::{Error, RecordKind};
use crate::key::{Fingerprint, Key};
use crate::limits::nonzero;
use crate::model::{Begin, Lease, Write};
use crate::record::{Kind, Record};
use crate::shard::Counters;
use crate::shard::{eq_key, is_dead};
use crate::sync::Arc;
use crate::wait::Signal;
use crate::wal::LeaseSync;
use crate::wal::format::Op;

impl Inner {
    #[inline]
    pub(crate) fn begin(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        wait: bool,
        sync: LeaseSync,
        settle: &Settle,
    ) -> Result<(Begin, Option<Waiter>), Error> {
        // A deferred lease is logged lazily: its holder's next durable change syncs it.
        let lazy = sync == LeaseSync::Deferred;
        self.check_key(key)?;
        let lease_ms = nonzero(lease, "the lease duration")?;
        let hash = self.hash(key);
        let now = self.now();
        let deadline = now.saturating_add(lease_ms);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let acquired = |token, takeover| {
            Begin::Acquired(Lease {
                key: key.to_owned(),
                hash: Some(hash),
                token,
                deadline: Timestamp::from_millis(deadline),
                fingerprint,
                takeover,
            })
        };
        let (table, mut book) = shard.parts();
        let slot = self.entry(table, hash, key);
        // Decide first (from what the key holds), then make the one change through `commit`.
        let verdict = judge(held(&slot), now, fingerprint)?;
        let c = &mut *book.counters;
        let outcome = match verdict {
            Verdict::Answer(outcome) => {
                verdict_counted(c, &outcome);
                if let (Begin::InProgress { .. }, true) = (&outcome, wait) {
                    let signal = shard.add_waiter(hash);
                    return Ok((outcome, Some((hash, signal))));
                }
                outcome
            }
            acquire => {
                let token = self.next_seq(c, hash);
                let change = acquire.change(token, deadline, fingerprint);
                self.commit_with(&mut book, slot, key, Some(Op::Begin), change, lazy)?;
                acquire.count(book.counters, key, token);
                acquired(token, matches!(acquire, Verdict::TakeOver))
            }
        };
        Ok((outcome, None))
    }
    /// One round of `begin_wait`: answers as `begin` would, unless the key is in flight and
    /// time is left before `until`; then a waiter is registered (under the shard lock that saw
    /// the key in flight) and the caller waits on it for at most the returned slice: what is
    /// left of its budget, and no later than the holder's lease deadline, when the key can be
    /// taken over. Then the caller looks again.
    #[inline]
    pub(crate) fn begin_round(
        &self,
        key: Key<'_>,
        fingerprint: Fingerprint,
        lease: Duration,
        until: Instant,
        sync: LeaseSync,
        settle: &Settle,
    ) -> Result<Round, Error> {
        let left = until.saturating_duration_since(Instant::now());
        let (outcome, waiter) =
            self.begin(key, fingerprint, lease, !left.is_zero(), sync, settle)?;
        let (Begin::InProgress { deadline }, Some((hash, signal))) = (&outcome, waiter) else {
            return Ok(Round::Done(outcome));
        };
        let lease_left = deadline.as_millis().saturating_sub(self.now()).max(1);
        let slice = left.min(Duration::from_millis(lease_left));
        Ok(Round::Wait {
            hash,
            signal,
            slice,
        })
    }
    /// Removes a waiter that timed out (a fired one was removed by whoever fired it).
    pub(crate) fn forget_waiter(&self, hash: u64, signal: &Arc<Signal>) {
        self.lock(hash, &Settle::default()).remove_waiter(signal);
    }
    #[inline]
    pub(crate) fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        ttl: Option<Duration>,
        writes: &[Write],
        settle: &Settle,
    ) -> Result<Timestamp, Error> {
        self.check_value(response)?;
        let ttl_ms = match ttl {
            Some(d) => nonzero(d, "the ttl")?,
            None => self.default_ttl_ms,
        };
        if !writes.is_empty() {
            return self.complete_batch(lease, response, ttl_ms, writes, settle);
        }
        let now = self.now();
        let expires = now.saturating_add(ttl_ms);
        let done = |rec: &Record| Change::Put {
            kind: Kind::Completed,
            a: now,
            b: expires,
            fingerprint: rec.header().fingerprint,
            value: response,
        };
        self.commit_held(
            lease,
            settle,
            Op::Complete,
            done,
            |c| c.completions += 1,
            true,
        )?;
        Ok(Timestamp::from_millis(expires))
    }
    /// The one shape of complete, release and renew: under the lease's shard lock, check that
    /// this lease still holds its key, commit the change `make` builds from the record as
    /// `op`, count it, and wake the key's waiters if `wake`.
    #[inline]
    fn commit_held<'v>(
        &self,
        lease: &Lease,
        settle: &Settle,
        op: Op,
        make: impl FnOnce(&Record) -> Change<'v>,
        count: impl FnOnce(&mut Counters),
        wake: bool,
    ) -> Result<(), Error> {
        let key = lease.key();
        let hash = self.lease_hash(lease);
        let mut guard = self.lock(hash, settle);
        let shard = &mut *guard;
        let (table, mut book) = shard.parts();
        let Ok(slot) = table.find_entry(hash, eq_key(key)) else {
            return Err(Error::StaleLease { token: lease.token });
        };
        Self::check_holder(slot.get(), lease)?;
        let change = make(slot.get());
        self.commit(&mut book, Entry::Occupied(slot), key, Some(op), change)?;
        count(book.counters);
        if wake {
            shard.wake(hash);
        }
        Ok(())
    }
    #[inline]
    pub(super) fn check_holder(rec: &Record, lease: &Lease) -> Result<(), Error> {
        match rec.kind() {
            Kind::InFlight | Kind::InFlightPending if rec.header().a == lease.token => Ok(()),
            _ => Err(Error::StaleLease { token: lease.token }),
        }
    }
    #[inline]
    pub(super) fn check_batch(&self, lease: &Lease, writes: &[Write]) -> Result<(), Error> {
        self.limits().check_batch(lease.key(), writes)
    }
    #[inline]
    pub(crate) fn release(&self, lease: &Lease, settle: &Settle) -> Result<(), Error> {
        let now = self.now();
        let change = |rec: &Record| {
            if rec.kind() == Kind::InFlightPending {
                // The stored request goes back to waiting, with a fresh expiry.
                Change::Restamp {
                    kind: Kind::Pending,
                    a: now,
                    b: now.saturating_add(self.pending_ttl_ms),
                }
            } else {
                Change::Delete
            }
        };
        self.commit_held(
            lease,
            settle,
            Op::Release,
            change,
            |c| c.releases += 1,
            true,
        )
    }
    #[inline]
    pub(crate) fn renew(
        &self,
        lease: &Lease,
        extend: Duration,
        settle: &Settle,
    ) -> Result<Timestamp, Error> {
        let extend_ms = nonzero(extend, "the lease extension")?;
        let deadline = self.now().saturating_add(extend_ms);
        let renewed = |rec: &Record| Change::Restamp {
            kind: rec.kind(),
            a: rec.header().a,
            b: deadline,
        };
        self.commit_held(lease, settle, Op::Renew, renewed, |_| {}, false)?;
        Ok(Timestamp::from_millis(deadline))
    }
}

/// What `begin` finds at a key, before it changes anything.
pub(super) enum Verdict {
    /// Nothing there: a fresh lease.
    Vacant,
    /// An expired record: replaced by a fresh lease.
    Expired,
    /// A lease past its deadline, never completed: taken over with a new token.
    TakeOver,
    /// No change: a replay, a mismatch or a live holder.
    Answer(Begin),
}

impl Verdict {
    /// The change that acquires the key with `token` (for the acquiring verdicts).
    #[inline]
    pub(super) fn change(
        &self,
        token: u64,
        deadline: u64,
        fingerprint: Fingerprint,
    ) -> Change<'static> {
        match self {
            Verdict::TakeOver => Change::Restamp {
                kind: Kind::InFlight,
                a: token,
                b: deadline,
            },
            _ => Change::Put {
                kind: Kind::InFlight,
                a: token,
                b: deadline,
                fingerprint,
                value: &[],
            },
        }
    }

    /// Counts an acquisition made by this verdict (once it is committed).
    #[inline]
    pub(super) fn count(&self, c: &mut Counters, key: Key<'_>, token: u64) {
        c.acquired += 1;
        match self {
            Verdict::Expired => c.expirations += 1,
            Verdict::TakeOver => {
                c.takeovers += 1;
                tracing::warn!(
                    target: "idemkv::lease",
                    scope = %String::from_utf8_lossy(key.scope()),
                    token,
                    "lease expired without completion; taken over by a new attempt"
                );
            }
            _ => {}
        }
    }
}

/// Counts an answer that changed nothing.
#[inline]
pub(super) fn verdict_counted(c: &mut Counters, outcome: &Begin) {
    match outcome {
        Begin::Mismatch => c.mismatches += 1,
        Begin::Completed(_) => c.replayed += 1,
        Begin::InProgress { .. } => c.in_progress += 1,
        Begin::Acquired(_) => {}
    }
}

/// What a `begin` with `fingerprint` at `now` does with the record `found` at its key.
#[inline]
pub(super) fn judge(
    found: Option<&Record>,
    now: u64,
    fingerprint: Fingerprint,
) -> Result<Verdict, Error> {
    let Some(rec) = found else {
        return Ok(Verdict::Vacant);
    };
    if is_dead(rec, now) {
        return Ok(Verdict::Expired);
    }
    Ok(match rec.kind() {
        Kind::Completed | Kind::InFlight if rec.header().fingerprint != fingerprint => {
            Verdict::Answer(Begin::Mismatch)
        }
        Kind::Completed => Verdict::Answer(Begin::Completed(completed_of(rec))),
        Kind::InFlight if rec.header().b > now => Verdict::Answer(Begin::InProgress {
            deadline: Timestamp::from_millis(rec.header().b),
        }),
        Kind::InFlight => Verdict::TakeOver,
        other => {
            return Err(Error::WrongKind {
                expected: RecordKind::Idempotency,
                found: kind_of(other),
            });
        }
    })
}
