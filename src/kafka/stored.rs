//! A Kafka result as recorded in the idempotency store, so that a redelivery can replay the
//! reply without running the handler: an owned view of the shared reply codec
//! (`adapter::reply`, which documents the bytes), with status 0.
//!
//! Invariant: `decode(encode(r)) == r`, through the shared codec.

use crate::adapter::reply::{self, DecodeError};

/// A handler's recorded answer: a result or a final failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoredReply {
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Vec<u8>,
    /// `Some` for a recorded final failure.
    pub error: Option<String>,
    /// The reply is the follow-up's (the message made exactly-once HTTP calls): this record's
    /// payload lists the winning attempt's call URLs, one per line, and nothing is replied
    /// from it. Stored as status 1 in the shared codec (0 is a plain message reply).
    pub deferred: bool,
}

impl StoredReply {
    /// A recorded result: the handler's reply headers and payload.
    pub fn reply(headers: Vec<(String, Vec<u8>)>, payload: Vec<u8>) -> Self {
        StoredReply {
            headers,
            payload,
            error: None,
            deferred: false,
        }
    }

    /// A recorded final failure: no headers, no payload, the reason.
    pub fn failure(why: String) -> Self {
        StoredReply {
            headers: Vec::new(),
            payload: Vec::new(),
            error: Some(why),
            deferred: false,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// [`encode`](Self::encode), appended to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // Header names and values are bounded when the reply is built (`Outcome::header`).
        let headers = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_slice()));
        let status = u16::from(self.deferred);
        reply::encode_into(
            out,
            status,
            headers,
            self.error.as_deref(),
            &self.payload,
            usize::MAX,
        );
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let r = reply::decode(bytes)?;
        let mut headers = Vec::with_capacity(r.headers.len());
        for (n, v) in r.headers {
            let name =
                std::str::from_utf8(n).map_err(|_| DecodeError("header name is not UTF-8"))?;
            headers.push((name.to_owned(), v.to_vec()));
        }
        Ok(StoredReply {
            headers,
            payload: r.body.unwrap_or_default().to_vec(),
            error: r.error.map(str::to_owned),
            deferred: r.status == 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredReply {
        StoredReply {
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("x-empty".into(), Vec::new()),
            ],
            payload: br#"{"id":"o-1"}"#.to_vec(),
            error: None,
            deferred: false,
        }
    }

    #[test]
    fn round_trips_results_and_failures() {
        let ok = sample();
        assert_eq!(StoredReply::decode(&ok.encode()).unwrap(), ok);
        let failed = StoredReply {
            headers: Vec::new(),
            payload: Vec::new(),
            error: Some("card declined".into()),
            deferred: false,
        };
        assert_eq!(StoredReply::decode(&failed.encode()).unwrap(), failed);
        let deferred = StoredReply {
            headers: Vec::new(),
            payload: b"http://h/a\nhttp://h/b".to_vec(),
            error: None,
            deferred: true,
        };
        assert_eq!(StoredReply::decode(&deferred.encode()).unwrap(), deferred);
        assert_eq!(StoredReply::decode(&failed.encode()).unwrap(), failed);
    }

    #[test]
    fn every_truncation_is_an_error_or_a_shorter_payload() {
        let bytes = sample().encode();
        let fixed = bytes.len() - sample().payload.len();
        for cut in 0..fixed {
            assert!(StoredReply::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = bytes.clone();
        other[0] = b'{';
        assert!(StoredReply::decode(&other).is_err());
        other = bytes.clone();
        other[1] = 9;
        assert!(StoredReply::decode(&other).is_err());
        other = bytes;
        other[2] = 7;
        assert!(StoredReply::decode(&other).is_err());
    }
}
