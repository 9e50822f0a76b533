//! The bytes a Kafka result is stored as in the idempotency store, so that a redelivery can
//! replay the reply without running the handler.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! 0      1        2       3         5
//! +------+--------+-------+---------+--------------------------------------------+
//! | 0x4B | ver=1  | state | n: u16  | n × (name_len u16, name, val_len u32, val) |
//! +------+--------+-------+---------+--------------------------------------------+
//! | err_len u32 | error (UTF-8, state=1 only) | payload (the rest)               |
//! +-------------+-----------------------------+----------------------------------+
//! ```
//!
//! `state` is 0 for a result and 1 for a recorded final failure. The store frames and
//! checksums the value itself (log records and checkpoint values carry a crc32), so this layout
//! only needs to be unambiguous; decoding still checks every length and answers a typed error.

/// A handler's recorded answer: a result or a final failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoredReply {
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Vec<u8>,
    /// `Some` for a recorded final failure.
    pub error: Option<String>,
}

const MAGIC: u8 = 0x4B; // 'K'
const VERSION: u8 = 1;

/// Why stored bytes are not a Kafka reply record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DecodeError(pub &'static str);

impl StoredReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut len = 5 + 4 + self.payload.len() + self.error.as_ref().map_or(0, String::len);
        for (n, v) in &self.headers {
            len += 6 + n.len() + v.len();
        }
        let mut out = Vec::with_capacity(len);
        out.push(MAGIC);
        out.push(VERSION);
        out.push(u8::from(self.error.is_some()));
        // Header counts and sizes are bounded when the reply is built (`Outcome::header`
        // refuses names over u16::MAX and values over u32::MAX); saturate defensively.
        out.extend_from_slice(&(self.headers.len().min(u16::MAX as usize) as u16).to_le_bytes());
        for (n, v) in self.headers.iter().take(u16::MAX as usize) {
            out.extend_from_slice(&(n.len() as u16).to_le_bytes());
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        let err = self.error.as_deref().unwrap_or("");
        out.extend_from_slice(&(err.len() as u32).to_le_bytes());
        out.extend_from_slice(err.as_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        if r.take(1)? != [MAGIC] {
            return Err(DecodeError("bad magic"));
        }
        if r.take(1)? != [VERSION] {
            return Err(DecodeError("unknown format version"));
        }
        let failed = match r.take(1)? {
            [0] => false,
            [1] => true,
            _ => return Err(DecodeError("bad state byte")),
        };
        let n = r.u16()?;
        let mut headers = Vec::with_capacity(usize::from(n).min(64));
        for _ in 0..n {
            let name_len = usize::from(r.u16()?);
            let name = std::str::from_utf8(r.take(name_len)?)
                .map_err(|_| DecodeError("header name is not UTF-8"))?
                .to_owned();
            let value_len = r.u32()? as usize;
            headers.push((name, r.take(value_len)?.to_vec()));
        }
        let err_len = r.u32()? as usize;
        let err = std::str::from_utf8(r.take(err_len)?)
            .map_err(|_| DecodeError("error text is not UTF-8"))?;
        if !failed && !err.is_empty() {
            return Err(DecodeError("error text on a result"));
        }
        Ok(StoredReply {
            headers,
            payload: r.0.to_vec(),
            error: failed.then(|| err.to_owned()),
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
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
        };
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
        assert_eq!(StoredReply::decode(&other), Err(DecodeError("bad magic")));
        other = bytes.clone();
        other[1] = 9;
        assert!(StoredReply::decode(&other).is_err());
        other = bytes;
        other[2] = 7;
        assert!(StoredReply::decode(&other).is_err());
    }
}
