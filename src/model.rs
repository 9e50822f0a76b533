//! The outcomes and requests every backend shares (the embedded store and Redis): leases,
//! what `begin` and `take_pending` answer, snapshots, versioned writes, and statistics.
//!
//! Invariant: these types carry no behaviour of any one backend; a backend builds them from its
//! own records, and the adapters consume them without knowing which backend made them.

use std::time::Duration;

use crate::clock::Timestamp;
use crate::key::{Fingerprint, Key, OwnedKey};

/// A held lease on a key: proof that the caller, and nobody else, may complete it.
///
/// Its `token` is a fencing token: unique in the store, and larger than every token (and
/// version) handed out before for the same key. `complete`, `release` and `renew` check it, so a
/// holder whose lease expired and was taken over gets [`Error::StaleLease`](crate::Error::StaleLease) and can never
/// overwrite the new holder's work.
#[derive(Debug)]
pub struct Lease {
    pub(crate) key: OwnedKey,
    /// The key's hash in the store that granted the lease (saves rehashing on complete).
    pub(crate) hash: Option<u64>,
    pub(crate) token: u64,
    pub(crate) deadline: Timestamp,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) takeover: bool,
}

impl Lease {
    /// A copy for the crate's own bookkeeping (the lease runner's release-on-drop); a lease is
    /// not `Clone` for users, so that one attempt holds one lease.
    #[cfg(any(feature = "http", feature = "kafka"))]
    pub(crate) fn duplicate(&self) -> Lease {
        Lease {
            key: self.key.clone(),
            hash: self.hash,
            token: self.token,
            deadline: self.deadline,
            fingerprint: self.fingerprint,
            takeover: self.takeover,
        }
    }

    /// Builds a lease as a backend hands it out. Backends other than the embedded store use this.
    pub fn new(
        key: OwnedKey,
        token: u64,
        deadline: Timestamp,
        fingerprint: Fingerprint,
        takeover: bool,
    ) -> Self {
        Lease {
            key,
            hash: None,
            token,
            deadline,
            fingerprint,
            takeover,
        }
    }

    /// The key the lease holds.
    pub fn key(&self) -> Key<'_> {
        self.key.as_key()
    }

    /// The fencing token.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// When the lease expires unless renewed; after it, another caller may take the key over.
    pub fn deadline(&self) -> Timestamp {
        self.deadline
    }

    /// The fingerprint the key was begun with.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// True when this lease took over an expired one: an earlier attempt may have partly run.
    pub fn is_takeover(&self) -> bool {
        self.takeover
    }

    /// Records a new deadline after a successful renew (for backends).
    pub fn set_deadline(&mut self, deadline: Timestamp) {
        self.deadline = deadline;
    }
}

/// A completed record: the response to replay.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The stored response, exactly as given to `complete`.
    pub response: Vec<u8>,
    /// The fingerprint of the request that produced it.
    pub fingerprint: Fingerprint,
    /// When it was completed.
    pub completed_at: Timestamp,
    /// When it expires.
    pub expires_at: Timestamp,
}

/// What [`Store::blocking_begin`](crate::Store::blocking_begin) found.
#[derive(Debug)]
#[must_use]
pub enum Begin {
    /// The caller holds the key: run the work, then `complete` or `release`.
    /// [`Lease::is_takeover`] says whether an expired earlier attempt was taken over.
    Acquired(Lease),
    /// Someone else holds a live lease until `deadline` (a caller can say `Retry-After`).
    InProgress {
        /// The holder's lease deadline.
        deadline: Timestamp,
    },
    /// Done before: replay this.
    Completed(Completed),
    /// The key was used with another fingerprint.
    Mismatch,
}

/// What [`Store::blocking_take_pending`](crate::Store::blocking_take_pending) found.
#[derive(Debug)]
#[must_use]
pub enum Take {
    /// The caller holds the stored request: process `payload`, then `complete` or `release`.
    Acquired {
        /// The lease to complete with.
        lease: Lease,
        /// The stored request.
        payload: Vec<u8>,
    },
    /// Someone else is processing it until `deadline`.
    InProgress {
        /// The holder's lease deadline.
        deadline: Timestamp,
    },
    /// Processed before: this is the stored response.
    Completed(Completed),
    /// No request is stored under this key (never stored, deleted, or expired).
    NotFound,
}

/// What [`Store::blocking_put_pending`](crate::Store::blocking_put_pending) did.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum PutPending {
    /// The payload is stored (replacing an earlier, not yet processed one).
    Stored,
    /// The request is being processed; the payload was not changed.
    InProgress {
        /// The holder's lease deadline.
        deadline: Timestamp,
    },
    /// The request was processed already; the payload was not changed.
    Completed,
}

/// A versioned value.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// Its version: unique in the store, larger after every write of the key (also across a
    /// delete and re-create, so a stale version never matches again).
    pub version: u64,
    /// The bytes.
    pub value: Vec<u8>,
    /// When it expires, if ever.
    pub expires_at: Option<Timestamp>,
}

/// A copy of what a key holds, from [`Store::blocking_get`](crate::Store::blocking_get).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Snapshot {
    /// Held by a lease (possibly expired and not yet taken over).
    InFlight {
        /// The lease's fencing token.
        token: u64,
        /// The lease deadline.
        deadline: Timestamp,
        /// The fingerprint it was begun with.
        fingerprint: Fingerprint,
        /// Whether it is a stored request being processed (`take_pending`).
        pending: bool,
    },
    /// Completed.
    Completed(Completed),
    /// A stored request not processed yet.
    Pending {
        /// The stored request.
        payload: Vec<u8>,
        /// When it expires.
        expires_at: Timestamp,
    },
    /// A versioned value.
    Value(Versioned),
}

/// A compare-and-set on a versioned value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOp {
    /// Write only if the key is absent.
    PutIfAbsent(Vec<u8>),
    /// Write only if the current version is `version`.
    SetIfVersion {
        /// The expected current version.
        version: u64,
        /// The new bytes.
        value: Vec<u8>,
    },
    /// Delete only if the current version is `version`.
    DeleteIfVersion {
        /// The expected current version.
        version: u64,
    },
}

/// One result for [`IdempotencyStore::complete_many`](crate::IdempotencyStore::complete_many):
/// what [`complete`](crate::IdempotencyStore::complete) takes, as one value.
///
/// ```
/// # use idemkv::{Completion, Lease};
/// fn done(lease: &Lease) -> Completion<'_> {
///     Completion::new(lease, b"201 created")
/// }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Completion<'a> {
    /// The lease whose key is completed.
    pub lease: &'a Lease,
    /// The result to store and replay.
    pub response: &'a [u8],
    /// How long it is kept (`None`: the store's default).
    pub ttl: Option<std::time::Duration>,
    /// Versioned writes on other keys, committed with it, all or nothing.
    pub writes: &'a [Write],
}

impl<'a> Completion<'a> {
    /// `response` for `lease`, with the default TTL and no writes.
    pub fn new(lease: &'a Lease, response: &'a [u8]) -> Self {
        Completion {
            lease,
            response,
            ttl: None,
            writes: &[],
        }
    }
}

/// One versioned write: on its own with [`Store::blocking_cas`](crate::Store::blocking_cas), or in a completion batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The key written.
    pub key: OwnedKey,
    /// The condition and the change.
    pub op: CasOp,
    /// Expiry of the written value; `None` keeps it until deleted.
    pub ttl: Option<Duration>,
}

impl Write {
    /// Write `value` if `key` is absent.
    pub fn put_if_absent(key: OwnedKey, value: impl Into<Vec<u8>>) -> Self {
        Write {
            key,
            op: CasOp::PutIfAbsent(value.into()),
            ttl: None,
        }
    }

    /// Write `value` if `key`'s version is `version`.
    pub fn set_if_version(key: OwnedKey, version: u64, value: impl Into<Vec<u8>>) -> Self {
        Write {
            key,
            op: CasOp::SetIfVersion {
                version,
                value: value.into(),
            },
            ttl: None,
        }
    }

    /// Delete `key` if its version is `version`.
    pub fn delete_if_version(key: OwnedKey, version: u64) -> Self {
        Write {
            key,
            op: CasOp::DeleteIfVersion { version },
            ttl: None,
        }
    }

    /// Sets an expiry on the written value.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// What a compare-and-set did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum CasOutcome {
    /// Written; `version` is the new version (`None` after a delete).
    Applied {
        /// The key's version now.
        version: Option<u64>,
    },
    /// The condition did not hold; nothing was written.
    Conflict {
        /// The key's current version, `None` if absent.
        current: Option<u64>,
    },
}

/// What a checkpoint wrote, from [`Store::checkpoint`](crate::Store::checkpoint).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointStats {
    /// Live records written: those the log changed since the previous checkpoint (all of
    /// them when the checkpoint had to be written whole).
    pub records: u64,
    /// Records removed from the checkpoint: changed since the previous one and now gone
    /// (deleted, expired or reclaimed).
    pub removed: u64,
    /// Every log record up to this sequence number is reflected.
    pub covers_seq: u64,
    /// Log segments deleted.
    pub segments_deleted: usize,
}

/// Counters and sizes of a store, from [`Store::stats`](crate::Store::stats).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Leases granted (including takeovers).
    pub acquired: u64,
    /// Begins answered with a stored response.
    pub replayed: u64,
    /// Begins answered "in progress".
    pub in_progress: u64,
    /// Begins answered "mismatch".
    pub mismatches: u64,
    /// Leases granted over an expired lease.
    pub takeovers: u64,
    /// Records dropped because they expired.
    pub expirations: u64,
    /// Records stored now.
    pub records: u64,
    /// Bytes accounted now (each record's header, key and value).
    pub bytes: u64,
    /// Checkpoints written since the store was opened.
    pub checkpoints: u64,
    /// Leases completed (their response recorded).
    pub completions: u64,
    /// Leases released (the work will run again).
    pub releases: u64,
    /// Completions, releases and renewals refused because the lease was no longer held.
    pub stale_leases: u64,
    /// Records held by a lease now (including expired leases not yet taken over or swept).
    pub in_flight: u64,
    /// Bytes appended to the log since the store was opened (0 in memory).
    pub log_bytes: u64,
    /// Log segment files in the directory (0 in memory).
    pub log_segments: u64,
    /// Whether the log is poisoned (a write or fsync failed): nothing more is acknowledged
    /// until the store is reopened.
    pub poisoned: bool,
}
