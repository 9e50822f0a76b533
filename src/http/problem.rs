//! RFC 9457 `application/problem+json` responses.
//!
//! Invariant: every problem body is valid JSON (strings escaped here), and every store error
//! maps to one status and problem type, in `store_error`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A problem response; `kind` names the problem type (`urn:idemkv:problem:<kind>`).
pub(crate) fn problem<B: From<Bytes>>(status: StatusCode, kind: &str, detail: &str) -> Response<B> {
    let mut body = String::from("{\"type\":");
    json_str(&mut body, &format!("urn:idemkv:problem:{kind}"));
    body.push_str(",\"title\":");
    json_str(&mut body, status.canonical_reason().unwrap_or("Error"));
    body.push_str(&format!(",\"status\":{},\"detail\":", status.as_u16()));
    json_str(&mut body, detail);
    body.push('}');
    let mut res = Response::new(B::from(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

/// The one mapping from a store error to an HTTP status and problem type, for every HTTP
/// adapter (the idempotency layer and `ExactlyOnce`):
///
/// | error | status | problem type |
/// |---|---|---|
/// | empty or too long key id or scope | 400 | `invalid-key` |
/// | value too large | 413 | `too-large` |
/// | a completion batch's version check failed | 409 | `contention` (retry) |
/// | the lease was lost (taken over) | 409 | `lease-lost` (retry: the other holder's result replays) |
/// | anything else (backend down, log poisoned, full) | 503 | `store-unavailable`, `Retry-After: 1` |
pub(crate) fn store_error<B: From<Bytes>>(e: &crate::Error) -> Response<B> {
    use crate::Error as E;
    // The last field: whether a retry soon is worth it (`Retry-After: 1`).
    let (status, kind, detail, retry_soon) = match e {
        E::KeyTooLong { .. } | E::ScopeTooLong { .. } | E::EmptyKey => {
            (StatusCode::BAD_REQUEST, "invalid-key", e.to_string(), false)
        }
        E::ValueTooLarge { .. } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            e.to_string(),
            false,
        ),
        E::BatchConflict { .. } => (
            StatusCode::CONFLICT,
            "contention",
            "state this request changes was changed by another; retry".to_owned(),
            false,
        ),
        E::StaleLease { .. } => (
            StatusCode::CONFLICT,
            "lease-lost",
            "this attempt lost its lease to another; retry to get that attempt's result".to_owned(),
            true,
        ),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "store-unavailable",
            e.to_string(),
            true,
        ),
    };
    let mut res = problem(status, kind, &detail);
    if retry_soon {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}

/// Adds `Retry-After`: whole seconds until `deadline` (at least 1).
pub(crate) fn retry_after<B>(mut r: Response<B>, deadline: crate::Timestamp) -> Response<B> {
    let now = crate::Clock::now(&crate::SystemClock).as_millis();
    let secs = deadline
        .as_millis()
        .saturating_sub(now)
        .div_ceil(1000)
        .max(1);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_shapes() {
        let r: Response<Bytes> = problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "mismatch",
            "a \"quoted\"\nline",
        );
        assert_eq!(r.status(), 422);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(
            r.body().as_ref(),
            br#"{"type":"urn:idemkv:problem:mismatch","title":"Unprocessable Entity","status":422,"detail":"a \"quoted\"\nline"}"#
        );
    }
}
