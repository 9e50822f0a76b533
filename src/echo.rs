//! Echoed headers, shared by the HTTP and Kafka adapters: a request may carry
//! `X-Echo-Set-Header: Name: value` (or the synonym `X-Reply-Set-Header`), asking that its
//! response or reply carry the header `Name: value` — so a reply can be matched to its request
//! without touching the payload.
//!
//! Which names may be echoed is an [`EchoPolicy`]:
//! - **Default**: custom names (`inventory-sku`, `x-trace`, …) are echoed; every name in the
//!   IANA HTTP Field Name Registry is refused, because a registered name is one some browser,
//!   cache or proxy gives a meaning to (`Alt-Svc`, `Refresh`, `Cache-Control`, `Vary`, `Link`,
//!   …). A short allow-list of registered names that change nothing about how a response is
//!   treated is echoed anyway: `traceparent` and `tracestate` (W3C Trace Context, which only
//!   tracing systems read). `x-request-id` is not registered and is echoed.
//! - Names that are not registered but that servers and proxies in front of the application
//!   act on (nginx's `X-Accel-Redirect`, `X-Sendfile`, `X-XSS-Protection`, `Report-To`, …) are
//!   refused too; so are our own protocol headers.
//! - [`EchoPolicy::allow_only`]: only the names listed, nothing else.
//!
//! Whatever the policy, framing, hop-by-hop and credential headers (`Content-Length`,
//! `Connection`, `Set-Cookie`, `Authorization`, …) are never echoed, and a request may ask for
//! at most [`EchoPolicy::max_headers`] echoes of at most [`EchoPolicy::max_bytes`] in total
//! (default 16 and 4 KiB).
//!
//! Invariant: the HTTP layer and the Kafka adapter accept and refuse exactly the same names
//! (one rule, here), and a name is refused unless the policy allows it.

use std::sync::Arc;

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
    /// The name is one the policy does not let a request set on its response.
    #[error(
        "{0:?} may not be set by a request: it is a registered HTTP field or one servers act on; use a custom name such as x-{0}"
    )]
    Refused(String),
    /// More echo headers than the policy allows.
    #[error("{count} echo headers; at most {max} are allowed")]
    TooMany {
        /// How many the request carried (counted up to the first one over the limit).
        count: usize,
        /// The policy's limit.
        max: usize,
    },
    /// The echo headers are larger, in total, than the policy allows.
    #[error("the echo headers hold more than {max} bytes")]
    TooLarge {
        /// The policy's limit.
        max: usize,
    },
}

impl EchoError {
    /// Whether this is a refusal for size (too many or too large), which HTTP answers with 431.
    pub fn is_too_large(&self) -> bool {
        matches!(self, EchoError::TooMany { .. } | EchoError::TooLarge { .. })
    }
}

/// The HTTP Field Name Registry, lower-cased: every name of
/// <https://www.iana.org/assignments/http-fields/field-names.csv> (permanent, provisional,
/// deprecated, obsoleted and reserved alike), in its revision that registers the Compression
/// Dictionary Transport fields (2025), copied 2026-12-01. Sorted, for `binary_search`; a unit
/// test checks the order.
const IANA_REGISTERED: &[&str] = &[
    "*",
    "a-im",
    "accept",
    "accept-additions",
    "accept-ch",
    "accept-charset",
    "accept-datetime",
    "accept-encoding",
    "accept-features",
    "accept-language",
    "accept-patch",
    "accept-post",
    "accept-ranges",
    "accept-signature",
    "access-control",
    "access-control-allow-credentials",
    "access-control-allow-headers",
    "access-control-allow-methods",
    "access-control-allow-origin",
    "access-control-expose-headers",
    "access-control-max-age",
    "access-control-request-headers",
    "access-control-request-method",
    "activate-storage-access",
    "age",
    "allow",
    "alpn",
    "alt-svc",
    "alt-used",
    "alternates",
    "amp-cache-transform",
    "apply-to-redirect-ref",
    "authentication-control",
    "authentication-info",
    "authorization",
    "available-dictionary",
    "c-ext",
    "c-man",
    "c-opt",
    "c-pep",
    "c-pep-info",
    "cache-control",
    "cache-status",
    "cal-managed-id",
    "caldav-timezones",
    "capsule-protocol",
    "cdn-cache-control",
    "cdn-loop",
    "cert-not-after",
    "cert-not-before",
    "clear-site-data",
    "client-cert",
    "client-cert-chain",
    "close",
    "cmcd-object",
    "cmcd-request",
    "cmcd-session",
    "cmcd-status",
    "cmsd-dynamic",
    "cmsd-static",
    "concealed-auth-export",
    "configuration-context",
    "connection",
    "content-base",
    "content-digest",
    "content-disposition",
    "content-encoding",
    "content-id",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-script-type",
    "content-security-policy",
    "content-security-policy-report-only",
    "content-style-type",
    "content-type",
    "content-version",
    "cookie",
    "cookie2",
    "cross-origin-embedder-policy",
    "cross-origin-embedder-policy-report-only",
    "cross-origin-opener-policy",
    "cross-origin-opener-policy-report-only",
    "cross-origin-resource-policy",
    "cta-common-access-token",
    "dasl",
    "date",
    "dav",
    "default-style",
    "delta-base",
    "deprecation",
    "depth",
    "derived-from",
    "destination",
    "detached-jws",
    "dictionary-id",
    "differential-id",
    "digest",
    "dpop",
    "dpop-nonce",
    "early-data",
    "ediint-features",
    "etag",
    "expect",
    "expect-ct",
    "expires",
    "ext",
    "forwarded",
    "from",
    "getprofile",
    "hobareg",
    "host",
    "http2-settings",
    "if",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-schedule-tag-match",
    "if-unmodified-since",
    "im",
    "include-referred-token-binding-id",
    "isolation",
    "keep-alive",
    "label",
    "last-event-id",
    "last-modified",
    "link",
    "link-template",
    "location",
    "lock-token",
    "man",
    "max-forwards",
    "memento-datetime",
    "meter",
    "method-check",
    "method-check-expires",
    "mime-version",
    "negotiate",
    "nel",
    "odata-entityid",
    "odata-isolation",
    "odata-maxversion",
    "odata-version",
    "opt",
    "optional-www-authenticate",
    "ordering-type",
    "origin",
    "origin-agent-cluster",
    "oscore",
    "oslc-core-version",
    "overwrite",
    "p3p",
    "pep",
    "pep-info",
    "permissions-policy",
    "pics-label",
    "ping-from",
    "ping-to",
    "position",
    "pragma",
    "prefer",
    "preference-applied",
    "priority",
    "profileobject",
    "protocol",
    "protocol-info",
    "protocol-query",
    "protocol-request",
    "proxy-authenticate",
    "proxy-authentication-info",
    "proxy-authorization",
    "proxy-features",
    "proxy-instruction",
    "proxy-status",
    "public",
    "public-key-pins",
    "public-key-pins-report-only",
    "range",
    "redirect-ref",
    "referer",
    "referer-root",
    "referrer-policy",
    "refresh",
    "repeatability-client-id",
    "repeatability-first-sent",
    "repeatability-request-id",
    "repeatability-result",
    "replay-nonce",
    "reporting-endpoints",
    "repr-digest",
    "retry-after",
    "safe",
    "schedule-reply",
    "schedule-tag",
    "sec-fetch-storage-access",
    "sec-gpc",
    "sec-purpose",
    "sec-token-binding",
    "sec-websocket-accept",
    "sec-websocket-extensions",
    "sec-websocket-key",
    "sec-websocket-protocol",
    "sec-websocket-version",
    "security-scheme",
    "server",
    "server-timing",
    "set-cookie",
    "set-cookie2",
    "setprofile",
    "signature",
    "signature-input",
    "slug",
    "soapaction",
    "status-uri",
    "strict-transport-security",
    "sunset",
    "surrogate-capability",
    "surrogate-control",
    "tcn",
    "te",
    "timeout",
    "timing-allow-origin",
    "topic",
    "traceparent",
    "tracestate",
    "trailer",
    "transfer-encoding",
    "ttl",
    "upgrade",
    "urgency",
    "uri",
    "use-as-dictionary",
    "user-agent",
    "variant-vary",
    "vary",
    "via",
    "want-content-digest",
    "want-digest",
    "want-repr-digest",
    "warning",
    "www-authenticate",
    "x-content-type-options",
    "x-frame-options",
];

/// Registered names the default policy echoes anyway: read only by tracing systems, they
/// change nothing about how a browser, cache or proxy treats the response.
const HARMLESS_REGISTERED: &[&str] = &["traceparent", "tracestate"];

/// Names that are not registered but that servers, proxies or browsers in front of the
/// application act on, and our own protocol headers. Refused by the default policy.
const ACTED_ON: &[&str] = &[
    "idempotent-replayed",
    "proxy-connection",
    "report-to",
    "x-cache-key",
    "x-dns-prefetch-control",
    "x-download-options",
    "x-http-method-override",
    "x-lighttpd-send-file",
    "x-original-url",
    "x-permitted-cross-domain-policies",
    "x-powered-by",
    "x-real-ip",
    "x-reply-set-header",
    "x-rewrite-url",
    "x-robots-tag",
    "x-sendfile",
    "x-ua-compatible",
    "x-xss-protection",
];

/// Prefixes refused by the default policy: families acted on by browsers (`sec-`,
/// `access-control-`), proxies (`proxy-`, `x-forwarded-`, nginx's `x-accel-`, LiteSpeed's
/// `x-litespeed-`), representation metadata (`content-`) and our own (`idempotency-`,
/// `x-echo-`).
const ACTED_ON_PREFIXES: &[&str] = &[
    "access-control-",
    "content-",
    "idempotency-",
    "proxy-",
    "sec-",
    "x-accel-",
    "x-echo-",
    "x-forwarded-",
    "x-litespeed-",
];

/// Never echoed, whatever the policy: framing, hop-by-hop and credentials.
const NEVER: &[&str] = &[
    "authentication-info",
    "authorization",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "cookie",
    "host",
    "idempotent-replayed",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authentication-info",
    "proxy-authorization",
    "proxy-connection",
    "set-cookie",
    "set-cookie2",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "www-authenticate",
    "x-echo-set-header",
    "x-reply-set-header",
];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Names {
    /// Custom names, minus the registry and the acted-on names.
    Default,
    /// Only these (lower-cased).
    Only(Arc<[String]>),
}

/// Which headers a request may ask to have echoed, and how many; see the module docs.
///
/// ```
/// use idemkv::echo::{EchoError, EchoPolicy};
///
/// let default = EchoPolicy::default();
/// assert!(default.check_name("Inventory-Sku").is_ok());
/// assert!(default.check_name("traceparent").is_ok());
/// assert!(matches!(default.check_name("Alt-Svc"), Err(EchoError::Refused(_))));
///
/// let strict = EchoPolicy::allow_only(["x-request-id", "x-trace"]);
/// assert!(strict.check_name("X-Trace").is_ok());
/// assert!(strict.check_name("inventory-sku").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoPolicy {
    names: Names,
    max_headers: usize,
    max_bytes: usize,
}

impl Default for EchoPolicy {
    fn default() -> Self {
        EchoPolicy {
            names: Names::Default,
            max_headers: 16,
            max_bytes: 4096,
        }
    }
}

impl EchoPolicy {
    /// Only these names may be echoed (any case). Framing, hop-by-hop and credential names are
    /// refused even if listed.
    pub fn allow_only<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let names: Vec<String> = names
            .into_iter()
            .map(|n| n.as_ref().to_ascii_lowercase())
            .collect();
        EchoPolicy {
            names: Names::Only(names.into()),
            ..EchoPolicy::default()
        }
    }

    /// At most `n` echo headers per request (default 16).
    pub fn max_headers(mut self, n: usize) -> Self {
        self.max_headers = n;
        self
    }

    /// At most `n` bytes of echo headers per request, names and values (default 4096).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// Whether `name` (any case, already a valid token) may be echoed.
    pub fn check_name(&self, name: &str) -> Result<(), EchoError> {
        let lower = name.to_ascii_lowercase();
        let l = lower.as_str();
        let allowed = !NEVER.contains(&l)
            && match &self.names {
                Names::Only(list) => list.iter().any(|n| n == l),
                Names::Default => {
                    (HARMLESS_REGISTERED.contains(&l) || !is_registered(l))
                        && !ACTED_ON.contains(&l)
                        && !ACTED_ON_PREFIXES.iter().any(|p| l.starts_with(p))
                }
            };
        if allowed {
            Ok(())
        } else {
            Err(EchoError::Refused(name.to_owned()))
        }
    }

    /// Parses one `Name: value` and checks the name; returns the name in lower case and the
    /// trimmed value.
    pub fn parse(&self, raw: &[u8]) -> Result<(String, String), EchoError> {
        let (name, value) = split(raw)?;
        self.check_name(&name)?;
        Ok((name.to_ascii_lowercase(), value))
    }

    /// Parses every echo request of one message, enforcing the count and size bounds before
    /// parsing past them.
    pub fn parse_all<'a>(
        &self,
        raws: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<(String, String)>, EchoError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for raw in raws {
            if out.len() == self.max_headers {
                return Err(EchoError::TooMany {
                    count: out.len() + 1,
                    max: self.max_headers,
                });
            }
            bytes = bytes.saturating_add(raw.len());
            if bytes > self.max_bytes {
                return Err(EchoError::TooLarge {
                    max: self.max_bytes,
                });
            }
            out.push(self.parse(raw)?);
        }
        Ok(out)
    }
}

/// Whether `lower` is in the IANA registry.
fn is_registered(lower: &str) -> bool {
    IANA_REGISTERED.binary_search(&lower).is_ok()
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `Name: value` split and validated, name as given.
fn split(raw: &[u8]) -> Result<(String, String), EchoError> {
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
    Ok((name_str, String::from_utf8_lossy(value).into_owned()))
}

/// Parses one `Name: value` under the default policy.
///
/// ```
/// use idemkv::echo::{parse, EchoError};
/// assert_eq!(parse(b"X-Correlation: abc 123").unwrap(), ("x-correlation".to_string(), "abc 123".to_string()));
/// assert!(matches!(parse(b"Set-Cookie: a=b"), Err(EchoError::Refused(_))));
/// assert!(matches!(parse(b"Cache-Control: public"), Err(EchoError::Refused(_))));
/// assert!(matches!(parse(b"X-A: evil\r\nX-B: c"), Err(EchoError::BadValue(_))));
/// ```
pub fn parse(raw: &[u8]) -> Result<(String, String), EchoError> {
    EchoPolicy::default().parse(raw)
}

/// Whether `name` (any case) is refused by the default policy.
pub fn is_refused(name: &str) -> bool {
    EchoPolicy::default().check_name(name).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_is_sorted_lower_case_and_unique() {
        for w in IANA_REGISTERED.windows(2) {
            assert!(w[0] < w[1], "{} before {}", w[0], w[1]);
        }
        for n in IANA_REGISTERED.iter().chain(ACTED_ON).chain(NEVER) {
            assert_eq!(*n, n.to_ascii_lowercase());
        }
        // Every never-echoed name is refused by the default policy too, and by allow_only.
        let all = EchoPolicy::allow_only(NEVER);
        for n in NEVER {
            assert!(is_refused(n), "{n}");
            assert!(all.check_name(n).is_err(), "{n}");
        }
        // The copy holds 246 names; a lost line shows here.
        assert_eq!(IANA_REGISTERED.len(), 246);
    }

    #[test]
    fn accepts_custom_names() {
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
        for ok in [
            "inventory-sku",
            "x-request-id",
            "X-Correlation-Id",
            "traceparent",
        ] {
            assert!(!is_refused(ok), "{ok}");
        }
    }

    #[test]
    fn refuses_every_name_that_changes_how_a_response_is_treated() {
        for bad in [
            "Alt-Svc",
            "Refresh",
            "Cache-Control",
            "Expires",
            "Vary",
            "X-Frame-Options",
            "X-Content-Type-Options",
            "Content-Disposition",
            "Link",
            "Clear-Site-Data",
            "Cross-Origin-Resource-Policy",
            "Report-To",
            "Location",
            "Strict-Transport-Security",
            "Content-Security-Policy",
            "Set-Cookie",
            "X-Accel-Redirect",
            "X-Sendfile",
            "Access-Control-Allow-Origin",
            "Idempotency-TTL",
            "Idempotent-Replayed",
            "*",
        ] {
            assert!(
                matches!(
                    parse(format!("{bad}: x").as_bytes()),
                    Err(EchoError::Refused(_))
                ),
                "{bad}"
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

    #[test]
    fn allow_only_and_bounds() {
        let p = EchoPolicy::allow_only(["X-Trace", "cache-control"]);
        assert!(p.parse(b"x-trace: 1").is_ok());
        // A registered name the operator chose to allow.
        assert!(p.parse(b"Cache-Control: no-store").is_ok());
        assert!(matches!(p.parse(b"x-other: 1"), Err(EchoError::Refused(_))));

        let p = EchoPolicy::default().max_headers(2).max_bytes(20);
        let two: [&[u8]; 2] = [b"x-a: 1", b"x-b: 2"];
        assert_eq!(p.parse_all(two).unwrap().len(), 2);
        let three: [&[u8]; 3] = [b"x-a: 1", b"x-b: 2", b"x-c: 3"];
        assert_eq!(
            p.parse_all(three),
            Err(EchoError::TooMany { count: 3, max: 2 })
        );
        let big: [&[u8]; 1] = [b"x-a: 0123456789012345678"];
        assert_eq!(p.parse_all(big), Err(EchoError::TooLarge { max: 20 }));
        assert!(EchoError::TooLarge { max: 1 }.is_too_large());
    }
}
