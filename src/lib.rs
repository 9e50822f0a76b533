//! # idemkv
//!
//! An embedded key-value store for idempotency keys and exactly-once state.
//!
//! A retried `POST /orders` should create one order; a Kafka message delivered twice should
//! be processed once. idemkv answers the question behind both — *has this request been seen,
//! is it still running, what did it return?* — in well under a microsecond, in process, and
//! never lets two callers both believe they own the same key.
//!
//! - [`Store::blocking_begin`] either grants a [`Lease`] (run the work), or says the work is
//!   [in progress](Begin::InProgress), [done](Begin::Completed) (replay the response), or that
//!   the key was used for a [different request](Begin::Mismatch).
//! - [`Store::blocking_complete`] stores the response; only the lease's current holder can (fencing
//!   tokens). [`Store::blocking_complete_with`] commits versioned writes on other keys atomically with it.
//! - [`Store::blocking_begin_wait`] waits for the holder instead of answering "in progress".
//! - Versioned compare-and-set ([`Store::blocking_cas`]) for other exactly-once state, and stored
//!   requests ([`Store::blocking_put_pending`], [`Store::blocking_take_pending`]) for the PUT/POST protocol.
//! - Records expire (TTL, checked on access, reclaimed by a background sweeper); every limit
//!   is a typed [`Error`] that leaves the store unchanged.
//! - [`IdempotencyStore`] is the async face the adapters use; `Store` implements it.
//!
//! ## Blocking and async
//! In async code, import [`IdempotencyStore`] and write `store.begin(key, fp, lease).await`:
//! with the trait in scope that is the obvious call, and it waits for a holder or for the disk
//! without blocking the executor. The blocking methods are named `blocking_*` (tokio's
//! convention: `blocking_lock`, `blocking_recv`), so they are never picked by accident: a
//! `store.begin(..)` without the trait in scope does not compile, and the compiler names the
//! trait to import. Threads that are not on a runtime call `store.blocking_begin(..)`.
//!
//! ```
//! use idemkv::{Begin, Fingerprint, IdempotencyStore, Key, Store};
//! use std::time::Duration;
//!
//! async fn handler(store: &Store) -> Result<bool, idemkv::Error> {
//!     let key = Key::new("tenant-1", "k");
//!     // The async operation: waits for the disk without blocking the executor.
//!     let fresh = matches!(
//!         store.begin(key, Fingerprint::of(b"x"), Duration::from_secs(30)).await?,
//!         Begin::Acquired(_)
//!     );
//!     Ok(fresh)
//! }
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! # assert!(rt.block_on(handler(&Store::in_memory())).unwrap());
//! ```
//!
//! Without the trait in scope, the same line does not compile: no blocking call hides behind
//! it.
//!
//! ```compile_fail
//! use idemkv::{Fingerprint, Key, Store};
//! use std::time::Duration;
//!
//! async fn handler(store: &Store) {
//!     let _ = store.begin(Key::new("t", "k"), Fingerprint::of(b"x"), Duration::from_secs(30));
//! }
//! ```
//!
//! ```
//! use idemkv::{Begin, Fingerprint, Key, Store};
//! use std::time::Duration;
//!
//! let store = Store::in_memory();
//! let key = Key::new("tenant-1/POST /orders", "3f1c7a52");
//! let fp = Fingerprint::of(br#"{"items":[{"sku":"id-17236","count":1}]}"#);
//!
//! match store.blocking_begin(key, fp, Duration::from_secs(30))? {
//!     Begin::Acquired(lease) => {
//!         let response = b"201 {\"id\":\"o-1\"}"; // ... run the handler ...
//!         store.blocking_complete(&lease, response, None)?;
//!     }
//!     Begin::Completed(done) => { /* replay done.response */ }
//!     Begin::InProgress { deadline } => { /* 409, Retry-After: deadline - now */ }
//!     Begin::Mismatch => { /* 422 */ }
//! }
//! # Ok::<(), idemkv::Error>(())
//! ```
//!
//! ## Consistency
//! Every operation is linearizable. `begin`/`complete`/`release`/`renew` on one key are
//! serialised by the key's shard lock; a completion batch locks all its shards (in index
//! order) and applies all or nothing. Counters in [`Stats`] are exact but read one shard at a
//! time, so a snapshot taken under load is not one instant.
//!
//! ## Memory
//! Each record is one allocation of a 40-byte header plus scope, id and value bytes, and one
//! 8-byte slot (plus a control byte) in a hash table that is between 44% and 87% full:
//! about `40 + 9 / load` ≈ 50–60 bytes per record beyond its key and value.

#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(test, allow(clippy::unwrap_used))]

#[cfg(any(feature = "http", feature = "kafka"))]
mod adapter;
mod backend;
mod checkpoint;
mod clock;
pub mod echo;
mod embedded;
mod error;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;
mod key;
mod limits;
pub mod metrics;
mod model;
/// Messages a handler sends, published only after its result commits, each under a stable id
/// (see [`Outgoing`](outbox::Outgoing) and [`Publisher`](outbox::Publisher)).
#[cfg(any(feature = "http", feature = "kafka"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "http", feature = "kafka"))))]
pub mod outbox {
    pub use crate::adapter::outbox::{Outgoing, Publisher};
}
#[allow(unsafe_code)]
mod record;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod shard;
mod sync;
#[cfg(not(loom))]
pub mod tools;
mod wait;
mod wal;

pub use backend::{BeginOptions, Either, IdempotencyStore};
pub use checkpoint::CheckpointError;
pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use embedded::{OpenError, Store, StoreBuilder};
pub use error::{Cause, Error, RecordKind};
pub use key::{Fingerprint, Key, MAX_ID_LEN, MAX_SCOPE_LEN, OwnedKey};
pub use model::{
    Begin, CasOp, CasOutcome, CheckpointStats, Completed, Completion, Lease, PutPending, Snapshot,
    Stats, Take, Versioned, Write,
};
pub use wal::recovery::{DroppedDamage, LogError, OnCorruption, RecoveryReport, TornTail};
pub use wal::{Durability, LeaseSync};

/// The file boundary of the log, for tests that inject faults: a store writes its log through
/// a [`LogStorage`](storage::LogStorage) ([`StoreBuilder::log_storage`]).
pub mod storage {
    pub use crate::wal::io::{LogFile, LogStorage, OsFile, OsStorage};
}

/// Entry points for the `fuzz/` targets: decoders run on arbitrary bytes. Not a public API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::wal::format;

    /// Decodes `bytes` as a log segment, as far as it decodes; must never panic.
    pub fn decode_segment(bytes: &[u8]) -> usize {
        let Ok(_) = format::decode_segment_header(bytes) else {
            return 0;
        };
        let mut offset = format::SEGMENT_HEADER_LEN;
        let mut records = 0;
        while let Ok(format::BatchAt::Batch {
            first_seq,
            count,
            records: r,
            len,
        }) = format::decode_batch(&bytes[offset..])
        {
            match format::decode_records(first_seq, count, r) {
                Ok(recs) => records += recs.len(),
                Err(_) => break,
            }
            offset += len;
        }
        records
    }

    /// Decodes one checkpoint record; must never panic.
    pub fn decode_checkpoint_record(key: &[u8], value: &[u8]) -> bool {
        crate::checkpoint::decode(key, value).is_ok()
    }

    /// The HTTP layer's parsers on arbitrary bytes: the key, `Prefer`, the echo headers and
    /// the stored-response codec. Panics (the fuzzer's finding) when a parser accepts what it
    /// must refuse, or the codec does not round-trip.
    #[cfg(feature = "http")]
    pub fn http_parsers(key: &[u8], prefer: &[u8], echo: &[&[u8]], stored: &[u8]) {
        use crate::http::{request_key, stored as codec};

        for uuid_only in [false, true] {
            if let Ok(k) = request_key::parse_key(key, uuid_only) {
                assert!((1..=255).contains(&k.len()), "{k:?}");
                assert!(k.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{k:?}");
                assert!(!uuid_only || k.len() == 36, "{k:?}");
            }
        }

        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_bytes(prefer) {
            headers.append("prefer", v);
        }
        if let Some(w) = request_key::prefer_wait(&headers) {
            assert!(w <= std::time::Duration::from_secs(60), "{w:?}");
        }

        let policy = crate::echo::EchoPolicy::default();
        if let Ok(all) = policy.parse_all(echo.iter().copied()) {
            assert!(all.len() <= 16);
            assert!(echo.iter().map(|e| e.len()).sum::<usize>() <= 4096);
            for (name, value) in all {
                // An oracle of its own, not the policy's list: never one of these.
                let never = [
                    "set-cookie",
                    "content-length",
                    "location",
                    "cache-control",
                    "vary",
                ];
                assert!(!never.contains(&name.as_str()), "{name}");
                assert!(
                    http::HeaderName::from_bytes(name.as_bytes()).is_ok(),
                    "{name:?}"
                );
                assert!(http::HeaderValue::from_str(&value).is_ok(), "{value:?}");
            }
        }

        // Decoding never panics; what decodes re-encodes to the same response.
        if let Some(s) = codec::decode(stored) {
            if let Some(body) = &s.body {
                let all = |_: &http::HeaderName, _: &http::HeaderValue| true;
                let again = codec::encode(s.status, &s.headers, body, usize::MAX, &all);
                let back = codec::decode(&again).expect("a re-encoded response decodes");
                assert_eq!(back.status, s.status);
                assert_eq!(back.body, s.body);
                let kept: Vec<_> = s
                    .headers
                    .iter()
                    .filter(|(n, _)| !codec::is_hop_by_hop(n))
                    .collect();
                assert_eq!(back.headers.iter().collect::<Vec<_>>(), kept);
            }
            let _ = codec::replay::<bytes::Bytes>(stored.to_vec(), true);
        }
    }

    /// Encodes a segment holding one batch of one record putting `value` under (`scope`, `id`),
    /// for seeding the fuzzer's corpus.
    pub fn sample_segment(scope: &[u8], id: &[u8], value: &[u8]) -> Vec<u8> {
        let mut records = Vec::new();
        let mut w = format::RecordWriter::new(&mut records, 1, format::Op::Complete);
        w.put_parts(
            crate::Key::new(scope, id),
            crate::record::Kind::Completed,
            1,
            2,
            crate::Fingerprint::NONE,
            value,
        );
        w.finish();
        let mut seg = format::segment_header(1).to_vec();
        seg.extend_from_slice(&format::batch_header(1, 1, &records));
        seg.extend_from_slice(&records);
        seg
    }
}

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
