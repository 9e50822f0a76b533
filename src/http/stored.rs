//! A response as stored in the idempotency record, in the shared reply codec
//! (`adapter::reply`: explicit, versioned). Hop-by-hop headers and `Content-Length` are not
//! stored (the body determines it); of the others, a [`StoredHeaders`] policy picks (default:
//! no per-client credentials, so no `Set-Cookie`). Multi-valued headers are stored one entry
//! per value, in order.
//!
//! Invariant: a replay answers the status, headers and body as they were stored; hop-by-hop
//! headers and `Content-Length` are never stored, and neither is a header the policy refuses.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::problem::problem;

use crate::adapter::reply;

const NOT_STORED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
];

/// Which headers of a response are stored with it, and so replayed to every later request
/// with the same key (which may come from another client of the same scope, and may be read by
/// anyone with access to the store: Redis too). Hop-by-hop headers and `Content-Length` are
/// never stored, whatever the policy. The first response itself always goes out whole.
///
/// Any `Fn(&HeaderName, &HeaderValue) -> bool` is a policy:
///
/// ```
/// use idemkv::http::{DefaultStoredHeaders, IdempotencyLayer, StoredHeaders};
/// use idemkv::Store;
///
/// // The default, and also never store a session hint header.
/// let layer = IdempotencyLayer::new(Store::in_memory()).stored_headers(
///     |name: &http::HeaderName, value: &http::HeaderValue| {
///         DefaultStoredHeaders.store(name, value) && name != "x-session-hint"
///     },
/// );
/// # drop(layer);
/// ```
pub trait StoredHeaders: Send + Sync + 'static {
    /// Whether this header is stored (and replayed).
    fn store(&self, name: &HeaderName, value: &HeaderValue) -> bool;
}

impl<F> StoredHeaders for F
where
    F: Fn(&HeaderName, &HeaderValue) -> bool + Send + Sync + 'static,
{
    fn store(&self, name: &HeaderName, value: &HeaderValue) -> bool {
        self(name, value)
    }
}

/// The default [`StoredHeaders`]: everything but per-client credentials — `Set-Cookie`,
/// `Set-Cookie2`, `Authentication-Info` and `Proxy-Authentication-Info`. A replay to another
/// client of the same scope must not hand it the first client's session.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultStoredHeaders;

/// Credentials the default policy does not store.
const CREDENTIALS: &[&str] = &[
    "set-cookie",
    "set-cookie2",
    "authentication-info",
    "proxy-authentication-info",
];

impl StoredHeaders for DefaultStoredHeaders {
    fn store(&self, name: &HeaderName, _value: &HeaderValue) -> bool {
        !CREDENTIALS.contains(&name.as_str())
    }
}

/// Whether `name` is never stored (hop-by-hop, or `Content-Length`).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    NOT_STORED.contains(&name.as_str())
}

/// A decoded stored response.
pub(crate) struct Stored {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Option<Bytes>,
}

/// Encodes a response; if it would exceed `max` bytes, stores only status and headers with the
/// too-large flag.
pub(crate) fn encode(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    max: usize,
    policy: &dyn StoredHeaders,
) -> Vec<u8> {
    let kept = headers
        .iter()
        .filter(|(n, v)| !is_hop_by_hop(n) && policy.store(n, v))
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    reply::encode(status.as_u16(), kept, None, body, max)
}

/// Decodes a stored response; `None` if the bytes are not one (never panics).
pub(crate) fn decode(bytes: &[u8]) -> Option<Stored> {
    decode_shared(&Bytes::copy_from_slice(bytes))
}

/// Headers a replayed response gains after decoding: `Idempotent-Replayed`, `Idempotency-TTL`
/// and the server's `Content-Length`. The map is sized for them up front, so that none of them
/// makes it grow (each growth is an allocation and a rehash).
const ADDED_LATER: usize = 3;

/// [`decode`] of a record already in a shared buffer: header values and the body are views into
/// it, not copies.
fn decode_shared(bytes: &Bytes) -> Option<Stored> {
    let r = reply::decode(bytes).ok()?;
    let status = StatusCode::from_u16(r.status).ok()?;
    let mut headers = HeaderMap::with_capacity(r.headers.len() + ADDED_LATER);
    for (n, v) in r.headers {
        headers.append(
            HeaderName::from_bytes(n).ok()?,
            HeaderValue::from_maybe_shared(bytes.slice_ref(v)).ok()?,
        );
    }
    Some(Stored {
        status,
        headers,
        body: r.body.map(|b| bytes.slice_ref(b)),
    })
}

const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
const ORIGINAL_STATUS: HeaderName = HeaderName::from_static("idempotency-original-status");

/// The stored response as an HTTP response, with `Idempotent-Replayed: true` if `replayed`.
/// One whose body was too large to keep answers 410 (`response-too-large`) with
/// `Idempotency-Original-Status`; undecodable bytes answer 500.
pub(crate) fn replay<B: From<Bytes>>(record: Vec<u8>, replayed: bool) -> Response<B> {
    let Some(s) = decode_shared(&Bytes::from(record)) else {
        let why = "the stored response cannot be read";
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "stored-response-unreadable",
            why,
        );
    };
    let mut res = match s.body {
        Some(body) => {
            let mut r = Response::new(B::from(body));
            *r.status_mut() = s.status;
            *r.headers_mut() = s.headers;
            r
        }
        None => {
            let why = "the request was processed, but its response was too large to keep";
            let mut r = problem(StatusCode::GONE, "response-too-large", why);
            r.headers_mut()
                .insert(ORIGINAL_STATUS, HeaderValue::from(s.status.as_u16()));
            r
        }
    };
    if replayed {
        res.headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_multi_valued_headers_in_order_and_drops_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("link", HeaderValue::from_static("</a>"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.append("link", HeaderValue::from_static("</b>"));
        h.insert(
            "authentication-info",
            HeaderValue::from_static("nextnonce=1"),
        );
        h.insert("content-length", HeaderValue::from_static("5"));
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert("x-order", HeaderValue::from_static("o-1"));
        let bytes = encode(
            StatusCode::CREATED,
            &h,
            b"hello",
            1 << 20,
            &DefaultStoredHeaders,
        );
        let s = decode(&bytes).unwrap();
        assert_eq!(s.status, StatusCode::CREATED);
        let links: Vec<_> = s.headers.get_all("link").iter().collect();
        assert_eq!(links, ["</a>", "</b>"]);
        assert!(s.headers.get("set-cookie").is_none());
        assert!(s.headers.get("authentication-info").is_none());
        assert!(s.headers.get("content-length").is_none() && s.headers.get("connection").is_none());
        assert_eq!(s.headers["x-order"], "o-1");
        assert_eq!(s.body.as_deref(), Some(&b"hello"[..]));

        // A policy that keeps everything still never keeps hop-by-hop headers.
        let all = |_: &HeaderName, _: &HeaderValue| true;
        let s = decode(&encode(StatusCode::CREATED, &h, b"hello", 1 << 20, &all)).unwrap();
        let cookies: Vec<_> = s.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert!(s.headers.get("connection").is_none());

        let small = decode(&encode(
            StatusCode::OK,
            &h,
            &[0; 100],
            60,
            &DefaultStoredHeaders,
        ))
        .unwrap();
        assert_eq!(small.body, None);
        for cut in 0..bytes.len() {
            let _ = decode(&bytes[..cut]);
        }
        assert!(decode(&[9, 0, 0]).is_none());
    }

    #[test]
    fn the_fuzz_harness_accepts_what_the_layer_produces() {
        let mut h = HeaderMap::new();
        h.append("link", HeaderValue::from_static("</a>"));
        h.append("x-order", HeaderValue::from_static("o-1"));
        let rec = encode(
            StatusCode::CREATED,
            &h,
            b"body",
            1 << 20,
            &DefaultStoredHeaders,
        );
        let echo: [&[u8]; 2] = [b"x-a: 1", b"traceparent: 00-ab"];
        crate::fuzzing::http_parsers(b"\"k-1\"", b"wait=5, respond-async", &echo, &rec);
        for cut in 0..rec.len() {
            crate::fuzzing::http_parsers(&rec[..cut], &rec[cut..], &echo, &rec[..cut]);
        }
    }
}
