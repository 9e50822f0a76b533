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

/// How long a client is told to wait when the store is full (`Retry-After`): expiry frees
/// room on its own, in seconds to minutes.
const FULL_RETRY_SECS: u32 = 30;

/// The one mapping from a store error to an HTTP status and problem type, for every HTTP
/// adapter (the idempotency layer and `ExactlyOnce`). Bodies carry no internal error text:
/// infrastructure failures are logged (`tracing`, target `idemkv::http`) and the client gets a
/// stable problem type.
///
/// | error | status | problem type |
/// |---|---|---|
/// | empty or too long key id or scope | 400 | `invalid-key` |
/// | value too large | 413 | `too-large` |
/// | a completion batch's version check failed | 409 | `contention` (retry) |
/// | the lease was lost (taken over) | 409 | `lease-lost` (retry: the other holder's result replays) |
/// | the store's record or byte budget is reached | 503 | `store-full`, `Retry-After: 30`; nothing stored was evicted |
/// | backend down, log poisoned, checkpoint failed | 503 | `store-unavailable`, `Retry-After: 1` |
/// | anything else (a misconfiguration) | 500 | `internal-error` |
pub(crate) fn store_error<B: From<Bytes>>(e: &crate::Error) -> Response<B> {
    use crate::Error as E;
    // The last field: the `Retry-After` to send, if a retry is worth it.
    let (status, kind, detail, retry): (_, _, std::borrow::Cow<'_, str>, _) = match e {
        E::KeyTooLong { .. } | E::ScopeTooLong { .. } | E::EmptyKey => (
            StatusCode::BAD_REQUEST,
            "invalid-key",
            e.to_string().into(),
            None,
        ),
        E::ValueTooLarge { .. } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            e.to_string().into(),
            None,
        ),
        E::BatchConflict { .. } => (
            StatusCode::CONFLICT,
            "contention",
            "state this request changes was changed by another; retry".into(),
            None,
        ),
        E::StaleLease { .. } => (
            StatusCode::CONFLICT,
            "lease-lost",
            "this attempt lost its lease to another; retry to get that attempt's result".into(),
            Some(1),
        ),
        E::RecordLimit { .. } | E::ByteLimit { .. } => {
            tracing::warn!(target: "idemkv::http", error = %e, "idempotency store full; request refused");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "store-full",
                "the server cannot record new requests right now; nothing was done; retry later"
                    .into(),
                Some(FULL_RETRY_SECS),
            )
        }
        E::Poisoned { .. } | E::Checkpoint { .. } | E::Unavailable { .. } => {
            tracing::error!(target: "idemkv::http", error = %e, "idempotency store unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "the server's idempotency store is unavailable; retry later".into(),
                Some(1),
            )
        }
        _ => {
            tracing::error!(target: "idemkv::http", error = %e, "idempotency store refused an operation");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal-error",
                "the server failed to process this request".into(),
                None,
            )
        }
    };
    let mut res = problem(status, kind, &detail);
    if let Some(secs) = retry {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
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
    fn store_errors_carry_no_internal_text() {
        let secret = "redis://admin:hunter2@10.0.0.7 refused";
        let down = crate::Error::Unavailable {
            reason: secret.into(),
            source: None,
        };
        let r: Response<Bytes> = store_error(&down);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let body = String::from_utf8_lossy(r.body());
        assert!(
            body.contains("store-unavailable") && !body.contains("hunter2"),
            "{body}"
        );

        let full: Response<Bytes> = store_error(&crate::Error::RecordLimit { max: 10 });
        assert_eq!(full.status(), 503);
        assert_eq!(full.headers()[header::RETRY_AFTER], "30");
        assert!(String::from_utf8_lossy(full.body()).contains("store-full"));

        let cfg: Response<Bytes> = store_error(&crate::Error::ZeroDuration { what: "ttl" });
        assert_eq!(cfg.status(), 500);
    }

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
