//! The one codec for a recorded reply, shared by the HTTP adapters (a stored response) and
//! Kafka (a stored reply message): what a repeat gets back without running the work again.
//!
//! Layout, version 2 (all integers little-endian):
//!
//! ```text
//! 0   1  magic 0x52 ('R')
//! 1   1  format version (2)
//! 2   1  flags: bit 0 the body was too large to keep (it is absent);
//!               bit 1 a recorded final failure (the error text is set)
//! 3   2  HTTP status code (0 for a message reply)
//! 5   2  number of headers N
//!     N × name length (2) | name | value length (4) | value
//!     4  error text length E | E bytes of UTF-8
//!     rest: body
//! ```
//!
//! The store frames and checksums every value (log records and checkpoint values carry a
//! crc32), so this layout only needs to be unambiguous; decoding checks every length and
//! answers a typed error, never a panic. Replies recorded by earlier versions (HTTP format 1,
//! whose first byte is 1; Kafka format 1, which starts `0x4B 0x01`) still decode: a durable
//! store keeps them for their TTL across an upgrade.
//!
//! Invariant: `decode(encode(r)) == r` for every reply whose header count fits 16 bits, names 16
//! bits and values 32 bits (the encoders of both adapters bound them).

const MAGIC: u8 = 0x52;
const VERSION: u8 = 2;
const TOO_LARGE: u8 = 1;
const FAILED: u8 = 2;

/// Why bytes are not a recorded reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DecodeError(pub &'static str);

/// Header names and values, in order, borrowed from the stored bytes.
type Headers<'a> = Vec<(&'a [u8], &'a [u8])>;

/// A decoded reply, borrowing from the stored bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reply<'a> {
    /// HTTP status, 0 for a message reply.
    pub status: u16,
    pub headers: Headers<'a>,
    /// `Some` for a recorded final failure.
    pub error: Option<&'a str>,
    /// `None` when the body was too large to keep.
    pub body: Option<&'a [u8]>,
}

/// Encodes a reply; if it would exceed `max` bytes, the body is left out and flagged. At most
/// 65,535 headers are kept; a name is cut at 65,535 bytes and a value at 4 GiB (the adapters
/// refuse larger ones before this).
pub(crate) fn encode<'h>(
    status: u16,
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
    error: Option<&str>,
    body: &[u8],
    max: usize,
) -> Vec<u8> {
    let err = error.unwrap_or("");
    let mut out = Vec::with_capacity((64 + err.len() + body.len()).min(max.saturating_add(64)));
    encode_into(&mut out, status, headers, error, body, max);
    out
}

/// [`encode`], appended to `out` (several records in one buffer); `max` bounds this record.
pub(crate) fn encode_into<'h>(
    out: &mut Vec<u8>,
    status: u16,
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
    error: Option<&str>,
    body: &[u8],
    max: usize,
) {
    let start = out.len();
    let err = error.unwrap_or("");
    let mut flags = if error.is_some() { FAILED } else { 0 };
    out.extend_from_slice(&[MAGIC, VERSION, 0]);
    out.extend_from_slice(&status.to_le_bytes());
    out.extend_from_slice(&[0, 0]); // the header count, patched below
    let mut count: u16 = 0;
    for (n, v) in headers.into_iter().take(u16::MAX as usize) {
        let n = &n[..n.len().min(u16::MAX as usize)];
        let v = &v[..v.len().min(u32::MAX as usize)];
        out.extend_from_slice(&(n.len() as u16).to_le_bytes());
        out.extend_from_slice(n);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
        count += 1;
    }
    out[start + 5..start + 7].copy_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(err.len() as u32).to_le_bytes());
    out.extend_from_slice(err.as_bytes());
    if out.len() - start + body.len() > max {
        flags |= TOO_LARGE;
    } else {
        out.extend_from_slice(body);
    }
    out[start + 2] = flags;
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
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn headers(&mut self) -> Result<Headers<'a>, DecodeError> {
        let n = self.u16()?;
        let mut out = Vec::with_capacity(usize::from(n).min(64));
        for _ in 0..n {
            let nl = usize::from(self.u16()?);
            let name = self.take(nl)?;
            let vl = self.u32()? as usize;
            out.push((name, self.take(vl)?));
        }
        Ok(out)
    }
    fn error(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError("error text is not UTF-8"))
    }
}

/// Decodes a reply of any version this crate has written.
pub(crate) fn decode(bytes: &[u8]) -> Result<Reply<'_>, DecodeError> {
    match bytes {
        [MAGIC, VERSION, ..] => decode_v2(bytes),
        [0x4B, 1, ..] => decode_kafka_v1(bytes),
        [1, ..] => decode_http_v1(bytes),
        [MAGIC, _, ..] => Err(DecodeError("unknown format version")),
        _ => Err(DecodeError("not a recorded reply")),
    }
}

fn decode_v2(bytes: &[u8]) -> Result<Reply<'_>, DecodeError> {
    let mut r = Reader(&bytes[2..]);
    let flags = r.u8()?;
    if flags & !(TOO_LARGE | FAILED) != 0 {
        return Err(DecodeError("unknown flags"));
    }
    let status = r.u16()?;
    let headers = r.headers()?;
    let error = r.error()?;
    if flags & FAILED == 0 && !error.is_empty() {
        return Err(DecodeError("error text on a result"));
    }
    Ok(Reply {
        status,
        headers,
        error: (flags & FAILED != 0).then_some(error),
        body: (flags & TOO_LARGE == 0).then_some(r.0),
    })
}

/// HTTP format 1: version 1 | flags (bit 0 too large) | status u16 | headers | body.
fn decode_http_v1(bytes: &[u8]) -> Result<Reply<'_>, DecodeError> {
    let mut r = Reader(&bytes[1..]);
    let flags = r.u8()?;
    let status = r.u16()?;
    let headers = r.headers()?;
    Ok(Reply {
        status,
        headers,
        error: None,
        body: (flags & TOO_LARGE == 0).then_some(r.0),
    })
}

/// Kafka format 1: 0x4B | version 1 | state (1: failure) | headers | error | payload.
fn decode_kafka_v1(bytes: &[u8]) -> Result<Reply<'_>, DecodeError> {
    let mut r = Reader(&bytes[2..]);
    let failed = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(DecodeError("bad state byte")),
    };
    let headers = r.headers()?;
    let error = r.error()?;
    if !failed && !error.is_empty() {
        return Err(DecodeError("error text on a result"));
    }
    Ok(Reply {
        status: 0,
        headers,
        error: failed.then_some(error),
        body: Some(r.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(status: u16, headers: &[(&[u8], &[u8])], error: Option<&str>, body: &[u8]) {
        let bytes = encode(status, headers.iter().copied(), error, body, usize::MAX);
        let r = decode(&bytes).expect("decodes");
        assert_eq!(r.status, status);
        assert_eq!(r.headers, headers);
        assert_eq!(r.error, error);
        assert_eq!(r.body, Some(body));
    }

    #[test]
    fn round_trips() {
        roundtrip(201, &[(b"content-type", b"application/json")], None, b"{}");
        roundtrip(0, &[], Some("boom"), b"");
        roundtrip(0, &[(b"a", b""), (b"a", b"2")], None, b"\x00\x01");
    }

    #[test]
    fn a_body_over_the_limit_is_flagged_not_kept() {
        let bytes = encode(200, [(&b"x"[..], &b"y"[..])], None, &[7; 100], 50);
        let r = decode(&bytes).expect("decodes");
        assert_eq!((r.status, r.body), (200, None));
        assert_eq!(r.headers, vec![(&b"x"[..], &b"y"[..])]);
    }

    #[test]
    fn earlier_formats_still_decode() {
        // HTTP format 1: 201, one header, body "hi".
        let mut http = vec![1, 0];
        http.extend_from_slice(&201u16.to_le_bytes());
        http.extend_from_slice(&1u16.to_le_bytes());
        http.extend_from_slice(&1u16.to_le_bytes());
        http.push(b'k');
        http.extend_from_slice(&1u32.to_le_bytes());
        http.push(b'v');
        http.extend_from_slice(b"hi");
        let r = decode(&http).expect("http v1");
        assert_eq!((r.status, r.body, r.error), (201, Some(&b"hi"[..]), None));
        // Kafka format 1: a failure "no".
        let mut kafka = vec![0x4B, 1, 1, 0, 0];
        kafka.extend_from_slice(&2u32.to_le_bytes());
        kafka.extend_from_slice(b"no");
        let r = decode(&kafka).expect("kafka v1");
        assert_eq!((r.status, r.error, r.body), (0, Some("no"), Some(&b""[..])));
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let bytes = encode(
            200,
            [(&b"name"[..], &b"value"[..])],
            Some("e"),
            b"body",
            usize::MAX,
        );
        for cut in 0..bytes.len() - 4 {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode(&[MAGIC, 9]).is_err());
        assert!(decode(&[MAGIC, VERSION, 0x80, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
