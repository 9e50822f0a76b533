//! The write-ahead log: every state change is appended as a record (see [`format`]) before
//! it is applied in memory; one writer thread batches the records of all callers into one
//! write and one `fdatasync` (group commit).
//!
//! Invariant: a change is in the log before it is visible in memory, and acknowledged
//! (`Immediate`) only once durable.
//!
//! Write path:
//! 1. The operation, under its shard lock, decides the change and reserves the limits.
//! 2. It encodes the change as a record into the shared buffer (taking a sequence number) —
//!    refused if the log is poisoned — and applies the change in memory; then unlocks.
//! 3. The writer thread takes the whole buffer, prefixes a batch header, writes it at the end
//!    of the current segment (`pwrite`), and calls `fdatasync` on the segment (**fsync 1**).
//!    A new segment is preallocated, its header written and synced (**fsync 2**), and the
//!    directory synced (**fsync 3**) before any batch goes into it.
//! 4. It publishes the highest durable sequence number and wakes the callers waiting for it.
//! 5. With `Durability::Immediate` a caller returns only once its shard's last record is
//!    durable; with `Batched` it returns at step 2 and step 3 happens within `max_delay`.

pub(crate) mod changes;
pub(crate) mod format;
pub(crate) mod io;
pub(crate) mod recovery;
pub(crate) mod segments;
mod writer;

use std::time::Duration;

pub(crate) use writer::Wal;

/// What survives a crash of the process or a power cut, per store.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// An operation returns once the log record of its change — and of every change it could
    /// have observed — is on disk (`fdatasync`). A power cut loses nothing acknowledged.
    /// Concurrent callers share one `fdatasync` (group commit).
    Immediate,
    /// An operation returns at once; its record is written and synced within `max_delay`
    /// (like Redis' `appendfsync everysec`). A crash of the process loses nothing once the
    /// record is written (the page cache survives it); a power cut can lose the last
    /// `max_delay` of acknowledged changes, never a torn one.
    Batched {
        /// Longest time between a change and its `fdatasync`.
        max_delay: Duration,
    },
    /// Memory only: a restart loses everything. (The store is not opened on a directory.)
    None,
}

/// Whether a `begin` that acquires a lease waits for the lease's log record to be durable
/// before it returns. It only matters with [`Durability::Immediate`]: with `Batched` no call
/// waits for the disk, and in memory there is no disk.
///
/// After a crash of the process (or a power cut):
/// - **`Synced`**: every lease a handler ran under is in the log. A retry after the restart
///   finds it in flight (409, or a wait) until it expires, then takes it over, and the new
///   lease says so ([`Lease::is_takeover`](crate::Lease::is_takeover)): the handler knows an
///   earlier attempt may have done part of its work. Each request waits for two `fdatasync`s,
///   the lease's and the completion's.
/// - **`Deferred`**: the handler starts at once and the request waits once, before it is
///   acknowledged: the completion's `fdatasync` covers the lease too, because the log is
///   synced in order and the lease comes earlier in it. A lease whose record never reached the
///   disk leaves no record: the retry runs as fresh (no wait for the lease to expire, and
///   `is_takeover` is false, though the crashed attempt may have started its work). A
///   completion, a release and everything else are durable before they return, as before;
///   so is every outcome that reports a stored record (a replay, a mismatch).
///
/// The adapters choose `Deferred` (see DESIGN.md, "Durability of a lease"); a [`Store`](crate::Store)
/// used directly is `Synced` unless [`Store::with_lease_sync`](crate::Store::with_lease_sync) says otherwise.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LeaseSync {
    /// `begin` returns once its lease is durable (with `Durability::Immediate`).
    #[default]
    Synced,
    /// `begin` returns an acquired lease at once; the next durable change covers it.
    Deferred,
}

/// Default size of a new log segment, preallocated (a larger batch gets a segment of its own).
pub(crate) const SEGMENT_SIZE: u64 = 64 << 20;
