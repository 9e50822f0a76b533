//! The store's error type, shared by every backend.
//!
//! Invariant: every variant says what the caller can do, and an infrastructure failure keeps
//! its cause (an `io::Error`, redb's or Redis's error) as its `source()`.

use std::sync::Arc;

/// The underlying error of an infrastructure failure ([`Error::Poisoned`],
/// [`Error::Checkpoint`], [`Error::Unavailable`]): shared, so that [`Error`] stays `Clone`; its
/// `source()` is the original error, for an operator's error chain. Two causes are equal when
/// they read the same.
#[derive(Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    pub(crate) fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Cause(Arc::new(e))
    }

    /// The original error, to downcast (for example to `std::io::Error`).
    pub fn get(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for Cause {}

/// What kind of record a key holds; named in [`Error::WrongKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// An idempotency record: in flight or completed (`begin`/`complete`).
    Idempotency,
    /// A stored request of the exactly-once protocol (`put_pending`/`take_pending`).
    Pending,
    /// A versioned value (`cas`).
    Value,
}

/// Everything the store can refuse.
///
/// Every error leaves the store exactly as it was: nothing is half-applied, nothing already
/// stored is evicted to make room.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The key's id is empty.
    #[error("the key id is empty")]
    EmptyKey,
    /// The key's id is longer than the configured maximum.
    #[error("the key id is {len} bytes long; the maximum is {max}")]
    KeyTooLong {
        /// Length of the id given.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The key's scope is longer than 255 bytes.
    #[error("the key scope is {len} bytes long; the maximum is {max}")]
    ScopeTooLong {
        /// Length of the scope given.
        len: usize,
        /// The maximum (255).
        max: usize,
    },
    /// A value (response, payload) is larger than the configured maximum.
    #[error("the value is {len} bytes long; the maximum is {max}")]
    ValueTooLarge {
        /// Length of the value given.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// Storing this would exceed the maximum number of records.
    #[error("the store holds its maximum of {max} records; nothing was evicted to make room")]
    RecordLimit {
        /// The configured maximum.
        max: u64,
    },
    /// Storing this would exceed the maximum number of bytes.
    #[error("storing {needed} more bytes would exceed the store's maximum of {max} bytes")]
    ByteLimit {
        /// Bytes the operation needed.
        needed: u64,
        /// The configured maximum.
        max: u64,
    },
    /// A duration that must be positive was zero.
    #[error("{what} must be longer than zero")]
    ZeroDuration {
        /// Which argument.
        what: &'static str,
    },
    /// The lease is no longer the key's current lease: it was taken over after it expired,
    /// completed or released already, or the record was removed. Nothing was written.
    #[error(
        "the lease (token {token}) is no longer held: the key was taken over, completed, released or removed"
    )]
    StaleLease {
        /// The lease's fencing token.
        token: u64,
    },
    /// The key holds a different kind of record than the operation works on.
    #[error("the key holds a {found:?} record; this operation needs {expected:?}")]
    WrongKind {
        /// What the operation works on.
        expected: RecordKind,
        /// What the key holds.
        found: RecordKind,
    },
    /// A versioned write in a completion batch did not match; nothing of the batch, nor the
    /// completion, was applied, and the lease is still held.
    #[error(
        "write {index} of the completion batch failed its version check (current version: {current:?})"
    )]
    BatchConflict {
        /// Position of the failing write in the batch.
        index: usize,
        /// The key's current version, `None` if absent.
        current: Option<u64>,
    },
    /// The completion batch is malformed (too many writes, a key twice, or the lease's own key).
    #[error("invalid completion batch: {reason}")]
    InvalidBatch {
        /// What is wrong.
        reason: &'static str,
    },
    /// Writing or syncing the log failed once; the store refuses every further change (an
    /// fsync error is not retryable: the kernel may have dropped the unwritten pages). Close
    /// the store and open it again: recovery reads back exactly what was made durable.
    #[error("the store's log is poisoned ({reason}); close and re-open the store")]
    Poisoned {
        /// What failed.
        reason: String,
        /// The I/O error that poisoned it.
        #[source]
        source: Cause,
    },
    /// Writing a checkpoint failed; the log still holds everything, nothing was lost.
    #[error("checkpoint failed: {reason}")]
    Checkpoint {
        /// What failed.
        reason: String,
        /// The underlying error (redb's, or the file system's).
        #[source]
        source: Cause,
    },
    /// A remote backend (Redis) could not be reached, timed out, or answered an error. The
    /// operation may or may not have been applied; the lease protocol stays safe either way
    /// (a retry of `begin` sees the outcome). The connection reconnects on its own.
    #[error("the store's backend is unavailable: {reason}")]
    Unavailable {
        /// The client's error, as text.
        reason: String,
        /// The client's error itself, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// An async method was called outside a Tokio runtime with its time driver.
    #[error("idemkv's async API needs a Tokio runtime with time enabled")]
    NoRuntime,
    /// Bad configuration.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
}
