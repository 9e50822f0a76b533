//! Background maintenance, on one schedule in one thread: reclaiming expired records (one
//! shard at a time, skipping shards with nothing due) and writing checkpoints when the log has
//! grown by `checkpoint_every` bytes or `checkpoint_interval` has passed. The thread holds only
//! a weak reference to the store: dropping the last `Store` stops and joins it.
//!
//! Invariant: sweeping and checkpointing are independent settings; turning the sweeper off
//! (`sweep_interval(None)`) never turns checkpoints off. A checkpoint claims only records that
//! are durable in the log, and removes only the segments it wholly covers.

use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::engine::{Inner, Settle};
use super::txn::Change;
use crate::checkpoint::Packed;
use crate::error::Error;
use crate::key::OwnedKey;
use crate::model::CheckpointStats;
use crate::record::Record;
use crate::shard::{eq_key, is_dead, reclaim_at};
use crate::sync::{Arc, Ordering};
use crate::wal::changes::changed_keys;
use crate::wal::format::Op;

#[derive(Debug)]
pub(crate) struct Handle {
    stop: std::sync::Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[cfg(not(any(loom, shuttle)))]
/// How often the thread looks whether a checkpoint is due when no sweeper sets the pace.
const CHECKPOINT_POLL: Duration = Duration::from_secs(1);

/// Starts the maintenance thread: sweeping every `sweep` (if set), and checkpoints when due
/// (if the store has a log). `None` when there is nothing to do.
#[cfg(not(any(loom, shuttle)))]
pub(crate) fn start(inner: &Arc<Inner>, sweep: Option<Duration>) -> Option<Handle> {
    let sweep = sweep.filter(|d| !d.is_zero());
    let checkpoints = inner.has_log();
    let every = match (sweep, checkpoints) {
        (Some(d), true) => d.min(CHECKPOINT_POLL),
        (Some(d), false) => d,
        (None, true) => CHECKPOINT_POLL,
        (None, false) => return None,
    };
    let weak = Arc::downgrade(inner);
    let stop = std::sync::Arc::new((Mutex::new(false), Condvar::new()));
    let stop2 = std::sync::Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("idemkv-maintenance".into())
        .spawn(move || {
            let (flag, cv) = &*stop2;
            let mut last_sweep = Instant::now();
            loop {
                {
                    let Ok(guard) = flag.lock() else { return };
                    let Ok((guard, _)) = cv.wait_timeout_while(guard, every, |stop| !*stop) else {
                        return;
                    };
                    if *guard {
                        return;
                    }
                }
                let Some(inner) = weak.upgrade() else { return };
                if let Some(d) = sweep
                    && last_sweep.elapsed() >= d
                {
                    for i in 0..inner.shard_count() {
                        inner.sweep_shard(i);
                    }
                    last_sweep = Instant::now();
                }
                if checkpoints {
                    inner.maybe_checkpoint();
                }
            }
        })
        .ok()?;
    Some(Handle {
        stop,
        thread: Some(thread),
    })
}

/// Under a model checker the sweeper is not started: neither loom nor shuttle can model a
/// free-running std thread (the models call `sweep_expired` themselves).
#[cfg(any(loom, shuttle))]
pub(crate) fn start(_inner: &Arc<Inner>, _sweep: Option<Duration>) -> Option<Handle> {
    None
}

impl Drop for Handle {
    fn drop(&mut self) {
        let (flag, cv) = &*self.stop;
        if let Ok(mut stop) = flag.lock() {
            *stop = true;
        }
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Inner {
    /// Drops expired records from shard `i`. Holds only that shard's lock, and skips the shard
    /// without scanning when nothing in it can have expired yet.
    pub(crate) fn sweep_shard(&self, i: usize) -> usize {
        let now = self.now();
        let settle = Settle::default();
        let mut guard = self.lock_index(i, &settle);
        if guard.next_reclaim > now {
            return 0;
        }
        let retention = self.lease_retention_ms;
        // The records due, copied out (the table changes under them), and the next time
        // anything left can be due.
        let mut next = u64::MAX;
        let mut due: Vec<(u64, OwnedKey)> = Vec::new();
        for r in guard.table.iter() {
            let at = reclaim_at(r, retention);
            if at <= now {
                due.push((self.hash(r.key()), r.key().to_owned()));
            } else {
                next = next.min(at);
            }
        }
        let n = due.len() as u64;
        if n > 0 {
            // One log record for all of them, through the one mutation path; if the log
            // refuses, nothing is removed.
            let changes: Vec<_> = due
                .iter()
                .map(|(h, k)| (0, *h, k.as_key(), Change::Delete))
                .collect();
            if self
                .commit_many(
                    std::slice::from_mut(&mut guard),
                    Op::Expire,
                    &changes,
                    false,
                )
                .is_err()
            {
                return 0;
            }
            // A lease swept after its retention has no holder left to wake its waiters (its
            // release now finds nothing): wake them here, so they look again at once.
            for (h, _) in &due {
                guard.wake(*h);
            }
        }
        guard.next_reclaim = next;
        guard.counters.expirations += n;
        n as usize
    }
    /// Writes a checkpoint if the log grew by `checkpoint_every` bytes since the last one.
    #[cfg_attr(any(loom, shuttle), allow(dead_code))]
    pub(crate) fn maybe_checkpoint(&self) {
        let (Some(wal), Some(_)) = (&self.wal, &self.checkpoints) else {
            return;
        };
        let due = {
            let last = self.checkpointing.lock();
            let grown = wal.written().saturating_sub(last.written);
            grown >= self.checkpoint_every
                || (grown > 0 && last.at.elapsed() >= self.checkpoint_interval)
        };
        if due {
            // Logged, and retried at the next due time; the log (which still holds
            // everything) keeps the data safe meanwhile.
            if let Err(e) = self.checkpoint() {
                tracing::error!(target: "idemkv::checkpoint", error = %e, "background checkpoint failed; the log keeps every record and it is retried");
            }
        }
    }
    /// Brings the checkpoint database up to date and deletes the log segments it then covers.
    /// Callers are not stopped: shards are read one at a time under their own locks.
    ///
    /// Incremental: only the keys the log changed since the last checkpoint are rewritten
    /// (or removed, when their record is gone or expired), found by reading that stretch of
    /// the log back. If the log cannot say (see [`changed_keys`]), every live record is
    /// written instead, into a fresh table.
    ///
    /// Correct for any interleaving with writers because log records are redo images: the
    /// checkpoint reflects at least every record up to `upto` (taken before the copy), and
    /// replaying records after `upto` over it — some of them already reflected — gives the
    /// same state as replaying them over the exact state at `upto`. A key no record in
    /// `after + 1 ..= upto` touched still holds what an earlier checkpoint copied, which
    /// reflects every record of that key up to `after` and possibly later ones, all of them
    /// replayed again after `upto` if they come after it.
    pub(crate) fn checkpoint(&self) -> Result<CheckpointStats, Error> {
        let (Some(wal), Some(checkpoints)) = (&self.wal, &self.checkpoints) else {
            return Ok(CheckpointStats::default());
        };
        let mut last = self.checkpointing.lock();
        #[cfg(feature = "metrics")]
        let started = Instant::now();
        wal.check()?;
        let written = wal.written();
        let upto = wal.appended();
        // Records up to `upto` are on disk before the log is read back for their keys.
        wal.wait(upto)?;
        let changed = changed_keys(&self.wal_dir, last.seq, upto);
        if let Err(e) = &changed {
            tracing::warn!(target: "idemkv::checkpoint", reason = %e.0, "the log does not say which keys changed since the last checkpoint: writing every live record");
        }
        let now = self.now();
        let token_high = self
            .shards
            .iter()
            .map(|s| s.0.lock().counters.seq)
            .max()
            .unwrap_or(0);
        let (records, whole) = match changed {
            Ok(mut keys) => {
                self.fill_current(&mut keys, now);
                (keys, false)
            }
            Err(_) => (self.live_records(now), true),
        };
        // Everything copied is durable in the log before the checkpoint can claim it.
        wal.wait(wal.appended())?;
        checkpoints
            .write(upto, token_high, &records, whole)
            .map_err(|e| Error::Checkpoint {
                reason: e.to_string(),
                source: crate::error::Cause::new(e),
            })?;
        let removed = records.removals() as u64;
        // The segments wholly covered by the checkpoint go; the newest one always stays.
        let deleted =
            crate::wal::segments::remove_covered(self.storage.as_ref(), &self.wal_dir, upto)
                .map_err(|e| Error::Checkpoint {
                    reason: format!("removing log segments in {}: {e}", self.wal_dir.display()),
                    source: crate::error::Cause::new(e),
                })?;
        *last = LastCheckpoint {
            written,
            at: Instant::now(),
            seq: upto,
        };
        self.checkpoints_written.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        crate::metrics::checkpoint(started.elapsed());
        Ok(CheckpointStats {
            records: records.len() as u64 - removed,
            removed,
            covers_seq: upto,
            segments_deleted: deleted,
        })
    }

    /// Gives each of `keys` (changed keys, no values yet) what the checkpoint should hold for
    /// it: its record's encoding, or nothing when there is none (gone, expired, or past its
    /// retention): remove it. Each shard is locked once.
    fn fill_current(&self, keys: &mut Packed, now: u64) {
        let mut by_shard: Vec<(usize, u64, usize)> = (0..keys.len())
            .filter_map(|i| {
                let key = crate::checkpoint::decode_key(keys.key(i))?;
                let h = self.hash(key);
                Some((self.shard_index(h), h, i))
            })
            .collect();
        by_shard.sort_unstable();
        for group in by_shard.chunk_by(|a, b| a.0 == b.0) {
            let shard = self.shards[group[0].0].0.lock();
            for &(_, h, i) in group {
                let Some(key) = crate::checkpoint::decode_key(keys.key(i)) else {
                    continue;
                };
                let live = shard.table.find(h, eq_key(key));
                if let Some(r) = live.filter(|r| self.carried(r, now)) {
                    keys.set_value(i, r);
                }
            }
        }
    }

    /// Whether a checkpoint holds `r` at `now`: expired records and leases past their
    /// retention are not carried into checkpoints.
    fn carried(&self, r: &Record, now: u64) -> bool {
        !is_dead(r, now) && reclaim_at(r, self.lease_retention_ms) > now
    }

    /// Every live record, encoded, sorted by key.
    fn live_records(&self, now: u64) -> Packed {
        let mut records = Packed::default();
        for shard in self.shards.iter() {
            let s = shard.0.lock();
            for r in s.table.iter().filter(|r| self.carried(r, now)) {
                records.push(r.key(), r);
            }
        }
        records.sort_dedup();
        records
    }
}

/// What the last checkpoint left: the log's size and the time then (when the next is due),
/// and the sequence number it covers (where the next one reads the log from).
#[derive(Debug)]
pub(crate) struct LastCheckpoint {
    pub(crate) written: u64,
    pub(crate) at: Instant,
    pub(crate) seq: u64,
}
