//! Echoed headers, shared by the HTTP and Kafka adapters: a request may carry
//! `X-Echo-Set-Header: Name: value` (or the synonym `X-Reply-Set-Header`), asking that its
//! response or reply carry the header `Name: value` — so a reply can be matched to its request
//! without touching the payload. Framing, hop-by-hop and security-sensitive names are refused,
//! and so are malformed names and values.
//!
//! Invariant: the HTTP layer and the Kafka adapter accept and refuse exactly the same names
//! (one rule, here).

/// Why an echo request is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EchoError {
    /// No `:` between name and value.
    #[error("expected `Name: value`, found no colon")]
    NoColon,
    /// The name is empty or not an HTTP token.
    #[error("{0:?} is not a valid header name")]
    BadName(String),
    /// The value contains control characters (CR, LF, NUL, …) or non-ASCII bytes.
    #[error("the value for {0:?} contains characters a header value may not hold")]
    BadValue(String),
    /// The name is one a request may not set on its response.
    #[error("{0:?} may not be set by a request (framing, hop-by-hop or security-sensitive header)")]
    Refused(String),
}

/// Header names that requests may not ask to have set: framing, hop-by-hop, and those that
/// carry credentials or security policy.
const REFUSED: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "content-encoding",
    "content-type",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "host",
    "set-cookie",
    "cookie",
    "authorization",
    "www-authenticate",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "strict-transport-security",
    "content-security-policy",
    "location",
    "idempotent-replayed",
    "x-echo-set-header",
    "x-reply-set-header",
];

/// Whether `name` (any case) may be set through an echo request.
pub fn is_refused(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    REFUSED.contains(&lower.as_str())
        || lower.starts_with("proxy-")
        || lower.starts_with("access-control-")
        || lower.starts_with("sec-")
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses one `Name: value`; returns the name in lower case and the trimmed value.
///
/// ```
/// use idemkv::echo::{parse, EchoError};
/// assert_eq!(parse(b"X-Correlation: abc 123").unwrap(), ("x-correlation".to_string(), "abc 123".to_string()));
/// assert!(matches!(parse(b"Set-Cookie: a=b"), Err(EchoError::Refused(_))));
/// assert!(matches!(parse(b"X-A: evil\r\nX-B: c"), Err(EchoError::BadValue(_))));
/// ```
pub fn parse(raw: &[u8]) -> Result<(String, String), EchoError> {
    let colon = raw
        .iter()
        .position(|&b| b == b':')
        .ok_or(EchoError::NoColon)?;
    let name = raw[..colon].trim_ascii();
    let value = raw[colon + 1..].trim_ascii();
    let name_str = String::from_utf8_lossy(name).into_owned();
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(EchoError::BadName(name_str));
    }
    if !value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return Err(EchoError::BadValue(name_str));
    }
    if is_refused(&name_str) {
        return Err(EchoError::Refused(name_str));
    }
    let value = String::from_utf8_lossy(value).into_owned();
    Ok((name_str.to_ascii_lowercase(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_headers() {
        assert_eq!(
            parse(b"X-Trace:t1").unwrap(),
            ("x-trace".into(), "t1".into())
        );
        assert_eq!(
            parse(b"  Reply-Topic :  a:b:c  ").unwrap(),
            ("reply-topic".into(), "a:b:c".into())
        );
        assert_eq!(
            parse(b"X-Empty:").unwrap(),
            ("x-empty".into(), String::new())
        );
    }

    #[test]
    fn refuses_framing_security_and_malformed() {
        for bad in [
            &b"Content-Length: 5"[..],
            b"transfer-encoding: chunked",
            b"Connection: close",
            b"Set-Cookie: s=1",
            b"Proxy-Anything: x",
            b"Access-Control-Allow-Origin: *",
            b"Idempotent-Replayed: true",
        ] {
            assert!(
                matches!(parse(bad), Err(EchoError::Refused(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse(b"no colon"), Err(EchoError::NoColon));
        assert!(matches!(parse(b": v"), Err(EchoError::BadName(_))));
        assert!(matches!(parse(b"Bad Name: v"), Err(EchoError::BadName(_))));
        assert!(matches!(parse(b"X-A: a\nb"), Err(EchoError::BadValue(_))));
        assert!(matches!(parse(b"X-A: \x00"), Err(EchoError::BadValue(_))));
        assert!(matches!(
            parse("X-A: é".as_bytes()),
            Err(EchoError::BadValue(_))
        ));
    }
}
