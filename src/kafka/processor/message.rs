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
/// of `bytes`.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    bytes: Box<[u8]>,
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

impl Message {
    /// A message from its parts (copied), with its id derived by `sources`.
    pub(crate) fn new<'a>(
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
        sources: &[KeySource],
    ) -> Message {
        // One pass to size the buffer and count the headers, one to copy.
        let (count, header_bytes) = headers
            .clone()
            .fold((0, 0), |(c, b), (n, v)| (c + 1, b + n.len() + v.len()));
        let size = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len) + header_bytes;
        let mut buf = Vec::with_capacity(size);
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
            bytes: Box::default(),
            key,
            payload,
            headers,
            id: Span::default(),
        };
        msg.bytes = buf.into_boxed_slice();
        msg.id = match derive_id(&msg, sources) {
            Id::Within(span) => span,
            Id::Made(id) => {
                // Rare (positions, digests): the buffer grows once more.
                let mut buf = std::mem::take(&mut msg.bytes).into_vec();
                let span = push(&mut buf, &id);
                msg.bytes = buf.into_boxed_slice();
                span
            }
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

    pub(super) fn from_kafka(
        m: &BorrowedMessage<'_>,
        topic: Arc<str>,
        sources: &[KeySource],
    ) -> Message {
        let headers = m.headers();
        let count = headers.map_or(0, |hs| hs.count());
        let pairs = (0..count)
            .filter_map(move |i| headers.and_then(|hs| hs.try_get(i)))
            .map(|h| (h.key, h.value.unwrap_or_default()));
        Message::new(
            topic,
            m.partition(),
            m.offset(),
            m.key(),
            m.payload(),
            pairs,
            sources,
        )
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
        Message::new(
            "t".into(),
            3,
            42,
            key.map(str::as_bytes),
            None,
            headers.into_iter(),
            &KeySource::defaults(),
        )
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
}
