//! The limits and defaults every backend applies the same way, before it touches anything:
//! key and value sizes, batch shape, positive durations.
//!
//! Invariant: a request refused here changes nothing in any backend.

use std::time::Duration;

use crate::clock::duration_to_millis_ceil;
use crate::error::Error;
use crate::key::{Key, MAX_SCOPE_LEN};
use crate::model::{CasOp, Write};

/// How long records live unless told otherwise (completed responses, stored requests, and
/// expired leases kept to report a takeover).
pub(crate) const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The size limits every backend checks the same way, before touching anything.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_key_len: usize,
    pub max_value_len: usize,
    pub max_batch: usize,
}

impl Limits {
    #[inline]
    pub(crate) fn check_key(&self, key: Key<'_>) -> Result<(), Error> {
        if key.scope().len() > MAX_SCOPE_LEN {
            return Err(Error::ScopeTooLong {
                len: key.scope().len(),
                max: MAX_SCOPE_LEN,
            });
        }
        if key.id().is_empty() {
            return Err(Error::EmptyKey);
        }
        if key.id().len() > self.max_key_len {
            return Err(Error::KeyTooLong {
                len: key.id().len(),
                max: self.max_key_len,
            });
        }
        Ok(())
    }

    #[inline]
    pub(crate) fn check_value(&self, value: &[u8]) -> Result<(), Error> {
        if value.len() > self.max_value_len {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max: self.max_value_len,
            });
        }
        Ok(())
    }

    /// A completion batch: its size, every key and value, positive TTLs, no write on the
    /// lease's own key, no key twice.
    pub(crate) fn check_batch(&self, lease_key: Key<'_>, writes: &[Write]) -> Result<(), Error> {
        if writes.len() > self.max_batch {
            return Err(Error::InvalidBatch {
                reason: "more writes than max_batch",
            });
        }
        for (i, w) in writes.iter().enumerate() {
            self.check_key(w.key.as_key())?;
            if let Some(v) = cas_value(&w.op) {
                self.check_value(v)?;
            }
            if let Some(d) = w.ttl {
                nonzero(d, "a write's ttl")?;
            }
            if w.key.as_key() == lease_key {
                return Err(Error::InvalidBatch {
                    reason: "a write targets the lease's own key",
                });
            }
            if writes[..i].iter().any(|o| o.key == w.key) {
                return Err(Error::InvalidBatch {
                    reason: "two writes target the same key",
                });
            }
        }
        Ok(())
    }
}

#[inline]
pub(crate) fn ms(d: Duration) -> u64 {
    duration_to_millis_ceil(d)
}

#[inline]
pub(crate) fn nonzero(d: Duration, what: &'static str) -> Result<u64, Error> {
    if d.is_zero() {
        Err(Error::ZeroDuration { what })
    } else {
        Ok(ms(d))
    }
}

#[inline]
pub(crate) fn cas_value(op: &CasOp) -> Option<&[u8]> {
    match op {
        CasOp::PutIfAbsent(v) | CasOp::SetIfVersion { value: v, .. } => Some(v),
        CasOp::DeleteIfVersion { .. } => None,
    }
}
