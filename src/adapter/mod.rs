//! What the adapters (HTTP, Kafka) share, so that each protocol is implemented once: the lease
//! runner ([`lease`]) and the stored-reply codec ([`reply`]).
//!
//! Invariant: no adapter renews, releases or encodes a recorded reply by itself; each calls
//! these.

pub(crate) mod lease;
pub(crate) mod reply;
