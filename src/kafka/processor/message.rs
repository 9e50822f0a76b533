//! A consumed message as the processor sees it: copied out of librdkafka's buffer, with its
//! idempotency id derived by the configured key sources, and the header rules it is checked by
//! (echo headers, reply topic names).
//!
//! Invariant: a message's id depends only on its own key, headers and position, so every
//! redelivery of it derives the same id.

use std::sync::Arc;

use rdkafka::message::Headers as _;

use super::*;

/// Where a part of a message lies in its buffer.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    at: u32,
    len: u32,
}

/// A consumed message, copied out of librdkafka's buffer in one allocation: key, payload,
/// header names and values, and (when it is not one of those) the idempotency id are spans
/// of `bytes`. Messages are reused ([`Recycler`]), buffer included.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    bytes: Vec<u8>,
    key: Option<Span>,
    payload: Option<Span>,
    /// Name and value of each header, in order; names are UTF-8.
    headers: HeaderSpans,
    /// The idempotency key's id, derived by the configured key sources.
    id: Span,
}

/// Up to this many headers are kept without an allocation of their own.
const INLINE_HEADERS: usize = 4;

/// Where a message's headers are: inline for the common few, else in their own allocation.
#[derive(Debug)]
enum HeaderSpans {
    Inline(u8, [(Span, Span); INLINE_HEADERS]),
    Heap(Box<[(Span, Span)]>),
}

impl HeaderSpans {
    fn as_slice(&self) -> &[(Span, Span)] {
        match self {
            HeaderSpans::Inline(n, spans) => spans.get(..usize::from(*n)).unwrap_or_default(),
            HeaderSpans::Heap(spans) => spans,
        }
    }
}

/// Appends `part` to `buf` and says where it is.
fn push(buf: &mut Vec<u8>, part: &[u8]) -> Span {
    let at = buf.len() as u32;
    buf.extend_from_slice(part);
    Span {
        at,
        len: part.len() as u32,
    }
}

/// Where a message comes from: its position and parts (copied into the message's buffer).
pub(crate) struct Parts<'a, H> {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) payload: Option<&'a [u8]>,
    /// Header names and values, in order.
    pub(crate) headers: H,
}

impl Message {
    /// A message from its parts (copied), with its id derived by `sources`.
    pub(crate) fn new<'a>(
        parts: Parts<'a, impl Iterator<Item = (&'a str, &'a [u8])> + Clone>,
        sources: &[KeySource],
    ) -> Message {
        Message::build(parts, sources, Vec::new())
    }

    /// Makes this message the one of `parts`, in the buffer it already has (grown if need be).
    fn fill<'a>(
        &mut self,
        parts: Parts<'a, impl Iterator<Item = (&'a str, &'a [u8])> + Clone>,
        sources: &[KeySource],
    ) {
        let buf = std::mem::take(&mut self.bytes);
        *self = Message::build(parts, sources, buf);
    }

    /// The message of `parts`, copied into `buf` (emptied first, grown if need be).
    fn build<'a>(
        parts: Parts<'a, impl Iterator<Item = (&'a str, &'a [u8])> + Clone>,
        sources: &[KeySource],
        mut buf: Vec<u8>,
    ) -> Message {
        let Parts {
            topic,
            partition,
            offset,
            key,
            payload,
            headers,
        } = parts;
        // One pass to size the buffer and count the headers, one to copy.
        let (count, header_bytes) = headers
            .clone()
            .fold((0, 0), |(c, b), (n, v)| (c + 1, b + n.len() + v.len()));
        let size = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len) + header_bytes;
        buf.clear();
        buf.reserve(size);
        let key = key.map(|k| push(&mut buf, k));
        let payload = payload.map(|p| push(&mut buf, p));
        let mut spans = headers.map(|(n, v)| (push(&mut buf, n.as_bytes()), push(&mut buf, v)));
        let headers = if count <= INLINE_HEADERS {
            let mut inline = [(Span::default(), Span::default()); INLINE_HEADERS];
            let mut n = 0u8;
            for (slot, span) in inline.iter_mut().zip(spans.by_ref()) {
                *slot = span;
                n += 1;
            }
            HeaderSpans::Inline(n, inline)
        } else {
            HeaderSpans::Heap(spans.collect())
        };
        let mut msg = Message {
            topic,
            partition,
            offset,
            bytes: buf,
            key,
            payload,
            headers,
            id: Span::default(),
        };
        msg.id = match derive_id(&msg, sources) {
            Id::Within(span) => span,
            // Rare (positions, digests): the buffer grows once more.
            Id::Made(id) => push(&mut msg.bytes, &id),
        };
        msg
    }

    fn get(&self, span: Span) -> &[u8] {
        let at = span.at as usize;
        self.bytes
            .get(at..at + span.len as usize)
            .unwrap_or_default()
    }

    /// The message key.
    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.key.map(|s| self.get(s))
    }

    /// The payload.
    pub(crate) fn payload(&self) -> Option<&[u8]> {
        self.payload.map(|s| self.get(s))
    }

    /// The idempotency key's id.
    pub(crate) fn id(&self) -> &[u8] {
        self.get(self.id)
    }

    /// All headers, in order.
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.as_slice().iter().map(|&(n, v)| {
            // Names were copied from `&str`s.
            (
                std::str::from_utf8(self.get(n)).unwrap_or_default(),
                self.get(v),
            )
        })
    }

    /// The values of the headers named `name` (any case), in order.
    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.header_span(name).map(|s| self.get(s))
    }

    /// Like [`header`](Self::header), as a span of the buffer.
    fn header_span(&self, name: &str) -> Option<Span> {
        self.headers
            .as_slice()
            .iter()
            .find(|&&(n, _)| self.get(n).eq_ignore_ascii_case(name.as_bytes()))
            .map(|&(_, v)| v)
    }

    pub(super) fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// `m`, copied out of librdkafka: into `reuse` (a message nobody else holds any more,
    /// from the [`Recycler`]) if there is one.
    pub(super) fn from_kafka(
        m: &BorrowedMessage<'_>,
        topic: Arc<str>,
        sources: &[KeySource],
        reuse: Option<Arc<Message>>,
    ) -> Arc<Message> {
        let headers = m.headers();
        let count = headers.map_or(0, |hs| hs.count());
        let pairs = (0..count)
            .filter_map(move |i| headers.and_then(|hs| hs.try_get(i)))
            .map(|h| (h.key, h.value.unwrap_or_default()));
        let parts = Parts {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            key: m.key(),
            payload: m.payload(),
            headers: pairs,
        };
        // The recycler keeps only messages no one else holds, so `get_mut` succeeds; were it
        // to fail, a new message is made.
        if let Some(mut reused) = reuse
            && let Some(msg) = Arc::get_mut(&mut reused)
        {
            msg.fill(parts, sources);
            return reused;
        }
        Arc::new(Message::new(parts, sources))
    }
}

/// Consumed messages and batches handed back by the partition tasks once done with, for the
/// polling thread to fill again.
///
/// Why: the polling thread allocates every message and a partition task frees it, on another
/// thread. glibc's allocator then never refills the polling thread's cache of free blocks,
/// so each message costs it a trip into the shared heap under its lock (`_int_malloc` and
/// `malloc_consolidate` in profiles). Reused, a message costs two short lock holds, here.
///
/// Only a message its task holds alone is kept (a handler may still hold one: it is then
/// freed as before), and only a bounded number, with buffers up to [`KEEP_BYTES`]: the
/// recycler holds no more memory than a few batches in flight do.
#[derive(Default)]
pub(crate) struct Recycler {
    messages: Mutex<Vec<Arc<Message>>>,
    batches: Mutex<Vec<Vec<Arc<Message>>>>,
}

/// Messages kept for reuse, at most.
const KEEP_MESSAGES: usize = 4 * super::poller::BATCH;
/// Empty batches kept for reuse, at most.
const KEEP_BATCHES: usize = 8;
/// A message whose buffer grew past this is freed, not kept.
const KEEP_BYTES: usize = 16 << 10;

impl Recycler {
    /// A message to fill again, if one was handed back.
    pub(super) fn message(&self) -> Option<Arc<Message>> {
        self.messages.lock().pop()
    }

    /// An empty batch with room for [`BATCH`](super::poller::BATCH) messages.
    pub(super) fn batch(&self) -> Vec<Arc<Message>> {
        self.batches
            .lock()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(super::poller::BATCH))
    }

    /// Takes back a batch its task is done with: the messages no one else holds, and the
    /// emptied batch.
    pub(super) fn give(&self, mut batch: Vec<Arc<Message>>) {
        {
            let mut kept = self.messages.lock();
            for mut m in batch.drain(..) {
                let sole = Arc::get_mut(&mut m).is_some_and(|m| m.bytes.capacity() <= KEEP_BYTES);
                if sole && kept.len() < KEEP_MESSAGES {
                    kept.push(m);
                }
            }
        }
        if batch.capacity() >= super::poller::BATCH {
            let mut batches = self.batches.lock();
            if batches.len() < KEEP_BATCHES {
                batches.push(batch);
            }
        }
    }
}

/// Ids longer than this are replaced by their digest (below the store's default key limit).
pub(super) const MAX_DERIVED_ID: usize = 128;

/// A message's id: a span of its buffer (a header's value, its key), or made from its position
/// or as a digest.
enum Id {
    Within(Span),
    Made(Vec<u8>),
}

/// The first non-empty value among `sources`; ids longer than [`MAX_DERIVED_ID`] are replaced
/// by a digest (`xxh3:` and 32 hex digits), so a long message key never becomes an error.
fn derive_id(msg: &Message, sources: &[KeySource]) -> Id {
    let position =
        || Id::Made(format!("{}/{}/{}", msg.topic, msg.partition, msg.offset).into_bytes());
    // A follow-up's id is the one its outbox gave it (`{request id}/{index}`), whatever the
    // sources say: it must not collide with the request's own.
    let followed = msg
        .header(crate::kafka::call::CALL_URL)
        .is_some()
        .then(|| msg.header_span(crate::kafka::IDEMPOTENCY_KEY))
        .flatten()
        .filter(|s| s.len > 0);
    let id = followed.map(Id::Within).or_else(|| {
        sources.iter().find_map(|s| match s {
            KeySource::Header(name) => msg.header_span(name).filter(|s| s.len > 0).map(Id::Within),
            KeySource::MessageKey => msg.key.filter(|s| s.len > 0).map(Id::Within),
            KeySource::Position => Some(position()),
        })
    });
    let id = id.unwrap_or_else(position);
    let long = |bytes: &[u8]| {
        Id::Made(format!("xxh3:{:032x}", xxhash_rust::xxh3::xxh3_128(bytes)).into_bytes())
    };
    match id {
        Id::Within(s) if s.len as usize > MAX_DERIVED_ID => long(msg.get(s)),
        Id::Made(v) if v.len() > MAX_DERIVED_ID => long(&v),
        id => id,
    }
}

/// The echo headers a request asks for, or why they are refused.
/// Bounded and checked by the same [`EchoPolicy`] rules as the HTTP layer.
pub(super) fn echo_headers(
    policy: &EchoPolicy,
    msg: &Message,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let raws = msg
        .headers
        .as_slice()
        .iter()
        .filter(|&&(n, _)| {
            let n = msg.get(n);
            n.eq_ignore_ascii_case(ECHO_SET_HEADER.as_bytes())
                || n.eq_ignore_ascii_case(b"x-reply-set-header")
        })
        .map(|&(_, raw)| msg.get(raw));
    match policy.parse_all(raws) {
        Ok(all) => Ok(all
            .into_iter()
            .map(|(name, value)| (name, value.into_bytes()))
            .collect()),
        Err(e) => Err(format!("{ECHO_SET_HEADER}: {e}")),
    }
}

/// Kafka's rule for topic names: 1–249 of `[a-zA-Z0-9._-]`.
pub(super) fn valid_topic(t: &str) -> bool {
    (1..=249).contains(&t.len())
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::super::attempt::backoff;
    use super::*;
    use crate::kafka::KeySource;

    fn message(headers: &[(&str, &str)], key: Option<&str>) -> Message {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        let parts = Parts {
            topic: "t".into(),
            partition: 3,
            offset: 42,
            key: key.map(str::as_bytes),
            payload: None,
            headers: headers.into_iter(),
        };
        Message::new(parts, &KeySource::defaults())
    }

    fn derived(m: &Message, sources: &[KeySource]) -> Vec<u8> {
        match derive_id(m, sources) {
            Id::Within(span) => m.get(span).to_vec(),
            Id::Made(id) => id,
        }
    }

    #[test]
    fn key_sources_in_order() {
        assert_eq!(
            message(&[("Idempotency-Key", "k1")], Some("mk")).id(),
            b"k1"
        );
        assert_eq!(message(&[("idempotency-key", "")], Some("mk")).id(), b"mk");
        assert_eq!(message(&[], Some("")).id(), b"t/3/42");
        let long = "x".repeat(MAX_DERIVED_ID + 1);
        let m = message(&[("a", "b")], Some(&long));
        let id = m.id();
        assert!(id.starts_with(b"xxh3:") && id.len() == 37, "{id:?}");
        assert_eq!(id, message(&[], Some(&long)).id());
        // The parts are still where they were after the id was appended.
        assert_eq!(m.key(), Some(long.as_bytes()));
        assert_eq!(m.headers().collect::<Vec<_>>(), [("a", &b"b"[..])]);
        let m = message(&[("idempotency-key", "k1")], Some("mk"));
        assert_eq!(derived(&m, &[KeySource::MessageKey]), b"mk");
        assert_eq!(derived(&m, &[KeySource::Position]), b"t/3/42");
        // A follow-up keeps the id its outbox gave it.
        let follow = message(
            &[
                (crate::kafka::call::CALL_URL, "http://x"),
                ("idempotency-key", "r/0"),
            ],
            Some("mk"),
        );
        assert_eq!(derived(&follow, &[KeySource::MessageKey]), b"r/0");
    }

    #[test]
    fn headers_inline_or_not_read_back_in_order() {
        for count in [0, 1, INLINE_HEADERS, INLINE_HEADERS + 1, 9] {
            let owned: Vec<(String, String)> = (0..count)
                .map(|i| (format!("H{i}"), format!("v{i}")))
                .collect();
            let pairs: Vec<(&str, &str)> = owned
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let m = message(&pairs, Some("k"));
            let back: Vec<(String, Vec<u8>)> = m
                .headers()
                .map(|(n, v)| (n.to_owned(), v.to_vec()))
                .collect();
            let want: Vec<(String, Vec<u8>)> = owned
                .iter()
                .map(|(n, v)| (n.clone(), v.clone().into_bytes()))
                .collect();
            assert_eq!(back, want, "{count} headers");
            if count > 0 {
                let last = count - 1;
                let value = format!("v{last}");
                assert_eq!(m.header(&format!("h{last}")), Some(value.as_bytes()));
            }
            assert_eq!(m.key(), Some(&b"k"[..]));
            assert_eq!(m.payload(), None);
        }
    }

    #[test]
    fn echo_headers_are_parsed_or_refused() {
        let ok = message(
            &[
                ("X-Echo-Set-Header", "X-Trace: t1"),
                ("x-echo-set-header", "A:b"),
            ],
            None,
        );
        assert_eq!(
            echo_headers(&EchoPolicy::default(), &ok).unwrap(),
            vec![
                ("x-trace".into(), b"t1".to_vec()),
                ("a".into(), b"b".to_vec())
            ]
        );
        // The HTTP layer's policy: registered names refused, bounded count, allow-lists.
        let cache = message(&[("x-echo-set-header", "Cache-Control: public")], None);
        assert!(echo_headers(&EchoPolicy::default(), &cache).is_err());
        let many: Vec<(String, String)> = (0..17)
            .map(|i| ("x-echo-set-header".to_owned(), format!("x-e{i}: v")))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let why = echo_headers(&EchoPolicy::default(), &message(&many, None)).unwrap_err();
        assert!(why.contains("at most 16"), "{why}");
        let strict = EchoPolicy::allow_only(["x-trace"]);
        assert!(
            echo_headers(&strict, &ok).is_err(),
            "`a` is not on the list"
        );
        let bad = message(&[("x-echo-set-header", "Content-Length: 1")], None);
        assert!(
            echo_headers(&EchoPolicy::default(), &bad)
                .unwrap_err()
                .to_ascii_lowercase()
                .contains("content-length")
        );
    }

    #[test]
    fn topic_names_and_backoff() {
        assert!(valid_topic("orders.replies-1_x"));
        assert!(
            !valid_topic("")
                && !valid_topic("..")
                && !valid_topic("a b")
                && !valid_topic(&"a".repeat(250))
        );
        let (f, m) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff(f, m, 1), f);
        assert_eq!(backoff(f, m, 2), f * 2);
        assert_eq!(backoff(f, m, 3), f * 4);
        assert_eq!(backoff(f, m, 30), m);
    }

    fn parts<'a>(
        offset: i64,
        payload: &'a [u8],
        headers: &'a [(&'a str, &'a [u8])],
    ) -> Parts<'a, impl Iterator<Item = (&'a str, &'a [u8])> + Clone> {
        Parts {
            topic: "orders".into(),
            partition: 1,
            offset,
            key: Some(b"mk"),
            payload: Some(payload),
            headers: headers.iter().copied(),
        }
    }

    #[test]
    fn a_refilled_message_is_the_new_message_in_the_old_buffer() {
        let sources = KeySource::defaults();
        let first: &[(&str, &[u8])] = &[("idempotency-key", b"k-1"), ("x-a", b"1")];
        let mut m = Message::new(parts(7, b"a longer first payload", first), &sources);
        let buffer = m.bytes.as_ptr();
        // Fewer headers, a shorter payload, and an id made from the position (no key header).
        let second: &[(&str, &[u8])] = &[("x-b", b"2")];
        let sources_by_position = [KeySource::Position];
        m.fill(parts(8, b"short", second), &sources_by_position);
        let fresh = Message::new(parts(8, b"short", second), &sources_by_position);
        assert_eq!(m.bytes.as_ptr(), buffer, "the buffer is reused");
        assert_eq!((m.partition, m.offset), (fresh.partition, fresh.offset));
        assert_eq!(m.key(), fresh.key());
        assert_eq!(m.payload(), Some(&b"short"[..]));
        assert_eq!(m.id(), fresh.id());
        assert_eq!(m.id(), b"orders/1/8");
        assert_eq!(
            m.headers().collect::<Vec<_>>(),
            fresh.headers().collect::<Vec<_>>()
        );
        assert_eq!(m.header("x-a"), None);
    }

    #[test]
    fn the_recycler_keeps_only_messages_no_one_else_holds_and_only_so_many() {
        let r = Recycler::default();
        let sources = KeySource::defaults();
        let one = |i: i64| Arc::new(Message::new(parts(i, b"p", &[]), &sources));
        let held = one(0);
        let mut batch = r.batch();
        assert!(batch.capacity() >= super::super::poller::BATCH);
        batch.push(held.clone());
        batch.push(one(1));
        let mut big = Message::new(parts(2, b"p", &[]), &sources);
        big.bytes.reserve(KEEP_BYTES + 1);
        batch.push(Arc::new(big));
        r.give(batch);
        // Only the message that was held by the batch alone is kept; the batch comes back.
        let kept = r.message().expect("one message is kept");
        assert_eq!(kept.offset, 1);
        assert!(
            r.message().is_none(),
            "a held or oversized message is not kept"
        );
        assert_eq!(Arc::strong_count(&held), 1, "the held one was let go");
        assert!(r.batches.lock().len() == 1);
        // At most KEEP_MESSAGES are kept.
        let mut many = Vec::new();
        for i in 0..(KEEP_MESSAGES + 10) as i64 {
            many.push(one(i));
        }
        r.give(many);
        assert_eq!(r.messages.lock().len(), KEEP_MESSAGES);
    }
}
