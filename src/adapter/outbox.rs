//! The outbox: messages a handler sends are recorded in the same batch as its result, and
//! published only after that batch commits; each published one is marked, and the record is
//! gone once all are.
//!
//! Record layout, version 1 (a value under the key's outbox scope; integers little-endian):
//!
//! ```text
//! 0   1  magic 0x4F ('O')
//! 1   1  format version (1)
//! 2   2  produced: how many of the messages, in order, are already published
//! 4   2  number of messages N
//!     N × topic length (2) | topic
//!         | key flag (1: 0 none, 1 present) [| key length (4) | key]
//!         | header count (2) | H × (name length (2) | name | value length (4) | value)
//!         | payload length (4) | payload
//! ```
//!
//! The store checksums every value; decoding still checks every length and answers a typed
//! error, never a panic.
//!
//! Invariants:
//! - A message is published only after the result it belongs to is durable in the store (the
//!   record is written in the result's batch; `flush` runs after `complete` returned).
//! - Message `i` is published before the record says `produced > i`: a crash between the two
//!   publishes it again, never loses it. The receiver deduplicates by the message's stable id,
//!   `{source id}/{i}`, the same on every publication.
//! - Two flushers of one record (a redelivery racing the first owner) both advance `produced`
//!   by versioned writes: a flusher whose write conflicts reads the record again and continues
//!   from what the other marked, so each message is published at least once and the record is
//!   deleted exactly once.

use std::future::Future;
use std::time::Duration;

use crate::{CasOutcome, Error, IdempotencyStore, OwnedKey, Snapshot, Write};

const MAGIC: u8 = 0x4F;
const VERSION: u8 = 1;

/// A message a handler sends: published after its result commits, exactly once as far as a
/// receiver that deduplicates by its id can tell (see [`Publisher`]).
///
/// ```
/// use idemkv::outbox::Outgoing;
/// let event = Outgoing::to("billing.events")
///     .key("order-17")
///     .header("content-type", "application/json")
///     .payload(r#"{"type":"BillingSucceeded"}"#);
/// assert_eq!(event.topic(), "billing.events");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outgoing {
    topic: String,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    payload: Vec<u8>,
    /// Token-based deduplication: the scope the message's token is created in.
    token: Option<String>,
}

impl Outgoing {
    /// A message to `topic`, with no key, headers or payload yet.
    pub fn to(topic: impl Into<String>) -> Self {
        Outgoing {
            topic: topic.into(),
            ..Outgoing::default()
        }
    }

    /// Sets the message key (partitioning, compaction).
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header. The publisher sets `idempotency-key` itself (the stable id), over any
    /// header of that name.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Token-based deduplication (for idemkv-to-idemkv links over a shared store): a token is
    /// created under `scope`, with the message's stable id, in the same batch as the result
    /// that sends it; a receiver built with `require_tokens(scope)` (the Kafka processor's
    /// builder, feature `kafka`) processes the message only while the token exists and deletes
    /// it with its own result. Neither side then keeps a record per message past its
    /// processing: storage is bounded by the messages in flight, not by rate × TTL. Sender and
    /// receiver must share the store (one process's embedded store, or Redis).
    #[cfg_attr(
        feature = "kafka",
        doc = "",
        doc = "The receiving side: [`ProcessorBuilder::require_tokens`](crate::kafka::ProcessorBuilder::require_tokens)."
    )]
    pub fn with_token(mut self, scope: impl Into<String>) -> Self {
        self.token = Some(scope.into());
        self
    }

    /// The topic it goes to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The message key, if set.
    pub fn message_key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The headers, in order.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    /// The payload.
    pub fn body(&self) -> &[u8] {
        &self.payload
    }
}

/// Publishes an outbox's messages. The Kafka adapter implements it on its producer; anything
/// that can deliver a message and say when it is stored (another broker, an HTTP endpoint)
/// can.
///
/// `id` is stable across retries and crashes: a receiver that deduplicates by it (an idemkv
/// consumer keyed by the `idempotency-key` header does) sees each message once.
pub trait Publisher: Send + Sync {
    /// Publishes `msg` under `id`; `Ok` once the destination has stored it.
    fn publish(
        &self,
        msg: &Outgoing,
        id: &[u8],
    ) -> impl Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send;
}

/// Why an outbox could not be flushed. The record stays; a later flush continues it.
#[derive(Debug)]
pub(crate) enum FlushError {
    Store(Error),
    Publish {
        topic: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    Corrupt(&'static str),
}

impl From<Error> for FlushError {
    fn from(e: Error) -> Self {
        FlushError::Store(e)
    }
}

/// The stable id of message `index` of the work identified by `source`.
pub(crate) fn message_id(source: &[u8], index: usize) -> Vec<u8> {
    let mut id = source.to_vec();
    id.push(b'/');
    id.extend_from_slice(index.to_string().as_bytes());
    id
}

/// The record for `messages`, the first `produced` of them already published.
pub(crate) fn encode(produced: u16, messages: &[Outgoing]) -> Vec<u8> {
    let size: usize = messages
        .iter()
        .map(|m| {
            16 + m.topic.len()
                + m.key.as_ref().map_or(0, Vec::len)
                + m.payload.len()
                + m.headers
                    .iter()
                    .map(|(n, v)| 6 + n.len() + v.len())
                    .sum::<usize>()
        })
        .sum();
    let mut out = Vec::with_capacity(6 + size);
    out.extend_from_slice(&[MAGIC, VERSION]);
    out.extend_from_slice(&produced.to_le_bytes());
    out.extend_from_slice(&(messages.len() as u16).to_le_bytes());
    for m in messages {
        out.extend_from_slice(&(m.topic.len() as u16).to_le_bytes());
        out.extend_from_slice(m.topic.as_bytes());
        match &m.key {
            None => out.push(0),
            Some(k) => {
                out.push(1);
                out.extend_from_slice(&(k.len() as u32).to_le_bytes());
                out.extend_from_slice(k);
            }
        }
        out.extend_from_slice(&(m.headers.len() as u16).to_le_bytes());
        for (n, v) in &m.headers {
            out.extend_from_slice(&(n.len() as u16).to_le_bytes());
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        out.extend_from_slice(&(m.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&m.payload);
    }
    out
}

/// The writes that create the tokens of `messages` (see [`Outgoing::with_token`]), to commit
/// with the result that sends them (tokens are not part of the outbox record: a publication
/// repeated after a crash must not create a consumed token again).
pub(crate) fn token_writes(source: &[u8], messages: &[Outgoing], ttl: Duration) -> Vec<Write> {
    messages
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let scope = m.token.as_deref()?;
            let key = OwnedKey::new(scope, message_id(source, i));
            Some(Write::put_if_absent(key, Vec::new()).with_ttl(ttl))
        })
        .collect()
}

/// Why the bounds of [`encode`] refuse a set of messages: more than 65,535 of them, a topic or
/// header name over 65,535 bytes, more than 65,535 headers on one, or a part over 4 GiB.
pub(crate) fn check(messages: &[Outgoing]) -> Result<(), &'static str> {
    let fits16 = |n: usize| u16::try_from(n).is_ok();
    let fits32 = |n: usize| u32::try_from(n).is_ok();
    if !fits16(messages.len()) {
        return Err("more than 65535 outgoing messages");
    }
    for m in messages {
        let parts_fit = fits16(m.topic.len())
            && fits16(m.headers.len())
            && m.key.as_ref().is_none_or(|k| fits32(k.len()))
            && fits32(m.payload.len())
            && m.headers
                .iter()
                .all(|(n, v)| fits16(n.len()) && fits32(v.len()));
        if !parts_fit {
            return Err("an outgoing message part is too large");
        }
    }
    Ok(())
}

/// The record's `produced` count and its messages.
pub(crate) fn decode(bytes: &[u8]) -> Result<(u16, Vec<Outgoing>), &'static str> {
    let mut r = Reader(bytes);
    if r.take(2)? != [MAGIC, VERSION] {
        return Err("not an outbox record of a known version");
    }
    let produced = r.u16()?;
    let n = r.u16()?;
    let mut messages = Vec::with_capacity(usize::from(n).min(1024));
    for _ in 0..n {
        let len = usize::from(r.u16()?);
        let topic = std::str::from_utf8(r.take(len)?).map_err(|_| "topic is not UTF-8")?;
        let key = match r.take(1)?[0] {
            0 => None,
            1 => {
                let len = r.u32()?;
                Some(r.take(len)?.to_vec())
            }
            _ => return Err("bad key flag"),
        };
        let count = r.u16()?;
        let mut headers = Vec::with_capacity(usize::from(count).min(64));
        for _ in 0..count {
            let len = usize::from(r.u16()?);
            let name = std::str::from_utf8(r.take(len)?).map_err(|_| "header name is not UTF-8")?;
            let len = r.u32()?;
            headers.push((name.to_owned(), r.take(len)?.to_vec()));
        }
        let len = r.u32()?;
        let payload = r.take(len)?.to_vec();
        messages.push(Outgoing {
            topic: topic.to_owned(),
            key,
            headers,
            payload,
            token: None,
        });
    }
    if !r.0.is_empty() {
        return Err("trailing bytes after the last message");
    }
    if usize::from(produced) > messages.len() {
        return Err("more messages marked produced than recorded");
    }
    Ok((produced, messages))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated outbox record");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<usize, &'static str> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

/// Publishes what the outbox record at `key` has not published yet, in order, marking each,
/// and deletes the record after the last. Returns how many this call published. With no
/// record (nothing sent, or already flushed) it publishes nothing.
pub(crate) async fn flush<St, P>(
    store: &St,
    key: &OwnedKey,
    source: &[u8],
    ttl: Duration,
    publisher: &P,
) -> Result<usize, FlushError>
where
    St: IdempotencyStore,
    P: Publisher,
{
    let mut published = 0;
    // (version, produced, messages) as last read or written by this flusher.
    let mut state = read(store, key).await?;
    while let Some((version, produced, messages)) = state {
        let i = usize::from(produced);
        if i < messages.len() {
            publisher
                .publish(&messages[i], &message_id(source, i))
                .await
                .map_err(|source| FlushError::Publish {
                    topic: messages[i].topic.clone(),
                    source,
                })?;
            published += 1;
        }
        // Mark it (or, after the last, delete the record); a conflict means another flusher
        // moved the record on: read what it marked and go on from there.
        let done = i + 1 >= messages.len();
        let write = if done {
            Write::delete_if_version(key.clone(), version)
        } else {
            Write::set_if_version(key.clone(), version, encode(produced + 1, &messages))
                .with_ttl(ttl)
        };
        state = match store.cas(&write).await? {
            CasOutcome::Applied { .. } if done => None,
            CasOutcome::Applied { version: Some(v) } => Some((v, produced + 1, messages)),
            CasOutcome::Applied { version: None } | CasOutcome::Conflict { .. } => {
                read(store, key).await?
            }
        };
    }
    Ok(published)
}

type State = Option<(u64, u16, Vec<Outgoing>)>;

async fn read<St: IdempotencyStore>(store: &St, key: &OwnedKey) -> Result<State, FlushError> {
    match store.get(key.as_key()).await? {
        None => Ok(None),
        Some(Snapshot::Value(v)) => {
            let (produced, messages) = decode(&v.value).map_err(FlushError::Corrupt)?;
            Ok(Some((v.version, produced, messages)))
        }
        Some(_) => Err(FlushError::Corrupt("the outbox key holds something else")),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::Store;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Records what it publishes; fails the publication numbered `fail_at` (counting from 0).
    #[derive(Default)]
    struct Log {
        got: parking_lot::Mutex<Vec<(String, Vec<u8>)>>,
        calls: AtomicUsize,
        fail_at: Option<usize>,
    }

    impl Publisher for Log {
        async fn publish(
            &self,
            msg: &Outgoing,
            id: &[u8],
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if Some(n) == self.fail_at {
                return Err("broker down".into());
            }
            self.got.lock().push((msg.topic().to_owned(), id.to_vec()));
            Ok(())
        }
    }

    fn three() -> Vec<Outgoing> {
        (0..3)
            .map(|i| {
                Outgoing::to(format!("t{i}"))
                    .key(vec![i])
                    .header("h", vec![i; 3])
                    .payload(vec![i; 5])
            })
            .collect()
    }

    fn put(store: &Store, key: &OwnedKey, messages: &[Outgoing]) {
        let w = Write::put_if_absent(key.clone(), encode(0, messages));
        assert!(matches!(
            store.blocking_cas(&w),
            Ok(CasOutcome::Applied { .. })
        ));
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn the_codec_round_trips_and_refuses_damage() {
        let m = three();
        assert_eq!(decode(&encode(2, &m)), Ok((2, m.clone())));
        assert_eq!(decode(&encode(0, &[])), Ok((0, Vec::new())));
        let bytes = encode(1, &m);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode(&long).is_err());
        let mut over = encode(0, &m);
        over[2] = 4; // produced > N
        assert!(decode(&over).is_err());
        assert!(check(&m).is_ok());
        let many = vec![Outgoing::to("t"); 70_000];
        assert!(check(&many).is_err());
    }

    #[tokio::test]
    async fn flush_publishes_in_order_with_stable_ids_then_deletes() {
        let store = Store::in_memory();
        let key = OwnedKey::new("o", "m-1");
        put(&store, &key, &three());
        let log = Log::default();
        assert_eq!(flush(&store, &key, b"m-1", TTL, &log).await.unwrap(), 3);
        let got = log.got.lock().clone();
        let ids: Vec<&[u8]> = got.iter().map(|(_, id)| id.as_slice()).collect();
        assert_eq!(ids, [&b"m-1/0"[..], b"m-1/1", b"m-1/2"]);
        assert_eq!(store.blocking_get(key.as_key()).unwrap(), None);
        // Flushing again (a redelivery) publishes nothing.
        assert_eq!(flush(&store, &key, b"m-1", TTL, &log).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_failed_publication_is_retried_and_nothing_published_is_repeated() {
        let store = Store::in_memory();
        let key = OwnedKey::new("o", "m-2");
        put(&store, &key, &three());
        let failing = Log {
            fail_at: Some(1),
            ..Log::default()
        };
        assert!(matches!(
            flush(&store, &key, b"m-2", TTL, &failing).await,
            Err(FlushError::Publish { .. })
        ));
        // The record says one is out; the next flush publishes the other two only.
        let Some(Snapshot::Value(v)) = store.blocking_get(key.as_key()).unwrap() else {
            panic!()
        };
        assert_eq!(decode(&v.value).unwrap().0, 1);
        let log = Log::default();
        assert_eq!(flush(&store, &key, b"m-2", TTL, &log).await.unwrap(), 2);
        let ids: Vec<Vec<u8>> = log.got.lock().iter().map(|(_, id)| id.clone()).collect();
        assert_eq!(ids, [b"m-2/1".to_vec(), b"m-2/2".to_vec()]);
        assert_eq!(store.blocking_get(key.as_key()).unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_flushers_publish_everything_and_delete_once() {
        for round in 0..50 {
            let store = Store::in_memory();
            let key = OwnedKey::new("o", format!("m-{round}"));
            put(&store, &key, &three());
            let log = Arc::new(Log::default());
            let tasks: Vec<_> = (0..2)
                .map(|_| {
                    let (store, key, log) = (store.clone(), key.clone(), log.clone());
                    tokio::spawn(async move { flush(&store, &key, b"m", TTL, &*log).await })
                })
                .collect();
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap().unwrap();
            }
            let got = log.got.lock().clone();
            assert_eq!(got.len(), total);
            for i in 0..3 {
                let id = message_id(b"m", i);
                assert!(
                    got.iter().any(|(_, g)| *g == id),
                    "message {i} never published"
                );
            }
            assert_eq!(store.blocking_get(key.as_key()).unwrap(), None);
        }
    }
}

/// loom model of the outbox with the store: the first owner records a result with its outbox
/// and flushes it, but "crashes" (its first publication fails, and it stops) while a
/// redelivery waits for the key, finds the result, and flushes what is left; every interleaving
/// of the two, over the real store and the real `flush`.
///
/// `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --lib loom`
#[cfg(all(test, loom))]
mod loom {
    use super::*;
    use crate::{Begin, Fingerprint, Key, ManualClock, Store};
    use ::loom::sync::atomic::{AtomicBool, Ordering};
    use ::loom::sync::{Arc, Mutex};
    use ::loom::thread;

    const LEASE: Duration = Duration::from_secs(10);
    const TTL: Duration = Duration::from_secs(60);

    fn key() -> Key<'static> {
        Key::new("work", "m")
    }

    fn outbox_key() -> OwnedKey {
        OwnedKey::new("work#outbox", "m")
    }

    /// Publishes into a shared log, checking that the result it belongs to is recorded;
    /// `crash` makes its first publication fail (the owner dies there).
    struct Log {
        store: Store,
        got: Arc<Mutex<Vec<Vec<u8>>>>,
        crash: AtomicBool,
    }

    impl Publisher for Log {
        async fn publish(
            &self,
            _msg: &Outgoing,
            id: &[u8],
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            assert!(
                matches!(
                    self.store.blocking_get(key()),
                    Ok(Some(crate::Snapshot::Completed(_)))
                ),
                "published before the result was recorded"
            );
            if self.crash.swap(false, Ordering::SeqCst) {
                return Err("the owner died here".into());
            }
            self.got
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id.to_vec());
            Ok(())
        }
    }

    #[test]
    fn a_redelivery_finishes_the_outbox_of_an_owner_that_died_flushing_it() {
        ::loom::model(|| {
            let store = Store::builder()
                .shards(1)
                .sweep_interval(None)
                .clock(ManualClock::new(0))
                .build()
                .expect("store");
            let Ok(Begin::Acquired(lease)) = store.blocking_begin(key(), Fingerprint::NONE, LEASE)
            else {
                panic!("first begin")
            };
            let got = Arc::new(Mutex::new(Vec::new()));
            let messages: Vec<Outgoing> = (0..2).map(|i| Outgoing::to(format!("t{i}"))).collect();

            let (s2, got2) = (store.clone(), got.clone());
            let redelivery = thread::spawn(move || {
                let begin = s2.blocking_begin_wait(
                    key(),
                    Fingerprint::NONE,
                    LEASE,
                    Duration::from_secs(3600),
                );
                assert!(matches!(begin, Ok(Begin::Completed(_))), "{begin:?}");
                let log = Log {
                    store: s2.clone(),
                    got: got2,
                    crash: AtomicBool::new(false),
                };
                crate::adapter::ready(flush(&s2, &outbox_key(), b"m", TTL, &log)).expect("flush")
            });

            // The owner: the result and its outbox in one batch, then the flush it dies in.
            let write = Write::put_if_absent(outbox_key(), encode(0, &messages)).with_ttl(TTL);
            store
                .blocking_complete_with(&lease, b"reply", None, &[write])
                .expect("record");
            let log = Log {
                store: store.clone(),
                got: got.clone(),
                crash: AtomicBool::new(true),
            };
            let owner = crate::adapter::ready(flush(&store, &outbox_key(), b"m", TTL, &log));
            assert!(matches!(owner, Err(FlushError::Publish { .. }) | Ok(_)));
            redelivery.join().expect("join");

            let got = got.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for i in 0..2 {
                assert!(
                    got.contains(&message_id(b"m", i)),
                    "message {i} lost: {got:?}"
                );
            }
            assert_eq!(
                store.blocking_get(outbox_key().as_key()),
                Ok(None),
                "outbox left behind"
            );
        });
    }
}
