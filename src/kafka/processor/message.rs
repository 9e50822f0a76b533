//! A consumed message as the processor sees it: copied out of librdkafka's buffer, with its
//! idempotency id derived by the configured key sources, and the header rules it is checked by
//! (echo headers, reply topic names).
//!
//! Invariant: a message's id depends only on its own key, headers and position, so every
//! redelivery of it derives the same id.

use std::sync::Arc;

use super::*;

/// A consumed message, copied out of librdkafka's buffer.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The idempotency key's id, derived by the configured key sources.
    pub id: Vec<u8>,
}

impl Message {
    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub(super) fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub(super) fn from_kafka(
        m: &BorrowedMessage<'_>,
        topic: Arc<str>,
        sources: &[KeySource],
    ) -> Message {
        let headers = crate::kafka::from_headers(m.headers());
        let mut msg = Message {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            id: Vec::new(),
        };
        msg.id = derive_id(&msg, sources);
        msg
    }
}

/// Ids longer than this are replaced by their digest (below the store's default key limit).
pub(super) const MAX_DERIVED_ID: usize = 128;

/// The first non-empty value among `sources`; ids longer than [`MAX_DERIVED_ID`] are replaced
/// by a digest (`xxh3:` and 32 hex digits), so a long message key never becomes an error.
pub(super) fn derive_id(msg: &Message, sources: &[KeySource]) -> Vec<u8> {
    // A follow-up's id is the one its outbox gave it (`{request id}/{index}`), whatever the
    // sources say: it must not collide with the request's own.
    if msg.header(crate::kafka::call::CALL_URL).is_some()
        && let Some(id) = msg
            .header(crate::kafka::IDEMPOTENCY_KEY)
            .filter(|v| !v.is_empty())
    {
        return id.to_vec();
    }
    let found = sources.iter().find_map(|s| match s {
        KeySource::Header(name) => msg
            .header(name)
            .filter(|v| !v.is_empty())
            .map(<[u8]>::to_vec),
        KeySource::MessageKey => msg.key.clone().filter(|k| !k.is_empty()),
        KeySource::Position => {
            Some(format!("{}/{}/{}", msg.topic, msg.partition, msg.offset).into_bytes())
        }
    });
    let id = found
        .unwrap_or_else(|| format!("{}/{}/{}", msg.topic, msg.partition, msg.offset).into_bytes());
    if id.len() > MAX_DERIVED_ID {
        format!("xxh3:{:032x}", xxhash_rust::xxh3::xxh3_128(&id)).into_bytes()
    } else {
        id
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
        .iter()
        .filter(|(n, _)| {
            n.eq_ignore_ascii_case(ECHO_SET_HEADER) || n.eq_ignore_ascii_case("x-reply-set-header")
        })
        .map(|(_, raw)| raw.as_slice());
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
        let mut m = Message {
            topic: "t".into(),
            partition: 3,
            offset: 42,
            key: key.map(|k| k.as_bytes().to_vec()),
            payload: None,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            id: Vec::new(),
        };
        m.id = derive_id(&m, &KeySource::defaults());
        m
    }

    #[test]
    fn key_sources_in_order() {
        assert_eq!(message(&[("Idempotency-Key", "k1")], Some("mk")).id, b"k1");
        assert_eq!(message(&[("idempotency-key", "")], Some("mk")).id, b"mk");
        assert_eq!(message(&[], Some("")).id, b"t/3/42");
        let long = "x".repeat(MAX_DERIVED_ID + 1);
        let id = message(&[], Some(&long)).id;
        assert!(id.starts_with(b"xxh3:") && id.len() == 37, "{id:?}");
        assert_eq!(id, message(&[], Some(&long)).id);
        let m = message(&[("idempotency-key", "k1")], Some("mk"));
        assert_eq!(derive_id(&m, &[KeySource::MessageKey]), b"mk");
        assert_eq!(derive_id(&m, &[KeySource::Position]), b"t/3/42");
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
