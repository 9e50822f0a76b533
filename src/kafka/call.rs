//! The caller side of the exactly-once HTTP protocol (token-based deduplication): a handler
//! calls a remote service with side effects exactly once, in the middle of processing a message.
//!
//! The four phases, and where each runs:
//! 1. **PUT** — in the handler ([`Incoming::invoke_http`](super::Incoming::invoke_http)): a
//!    fresh id per attempt (a digest of the processor's scope, the message's id and the
//!    attempt's fencing token) replaces `{uniqueId}` in the URL; the URL is recorded in the
//!    store under the message (the *calls* record) before the request is stored on the server.
//! 2. **POST** — the handler puts the call in its [`Outcome`](super::Outcome::follow_up); the
//!    completion then records a *follow-up message* in the outbox, produced to the follow-up
//!    topic after the completion commits. Processing the follow-up POSTs the URL (the server runs
//!    it at most once, so the POST is safe to retry).
//! 3. **GET** — if a POST's answer is lost (a timeout, a broken connection), the stored response
//!    is fetched instead. The response (status, headers, body) is handed to the handler as the
//!    follow-up's [`FollowUp`].
//! 4. **DELETE** — after the follow-up's completion commits, the URL is deleted, retried until it
//!    answers 2xx or 404. The URLs of attempts that did not win (taken over, released, cut by a
//!    crash) are deleted when the winning attempt's completion commits; the calls record goes
//!    after them.
//!
//! A 4xx is the service's answer: handed to the handler, never retried (409 "in progress" is the
//! protocol's "not yet", and is waited out). A 5xx, a refused connection or a timeout is retried
//! with the processor's backoff, for as long as the message's lease is held; a committed attempt
//! is never PUT again under a new id, because its URL travels in the follow-up message.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Header of a follow-up message: the URL of the call it completes.
pub(crate) const CALL_URL: &str = "idemkv-call-url";
/// Header of a follow-up message: the tag the handler gave the call.
pub(crate) const FOLLOW_UP: &str = "idemkv-follow-up";
/// The placeholder in a URL template.
const UNIQUE_ID: &str = "{uniqueId}";

/// An HTTP response, as a follow-up sees it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HttpResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// What a follow-up message brings its handler: the call's tag, its URL (whose last segment is
/// the unique id) and the service's response.
#[derive(Clone, Debug)]
pub struct FollowUp {
    pub(crate) tag: String,
    pub(crate) url: String,
    pub(crate) response: HttpResponse,
}

impl FollowUp {
    /// The tag given to [`invoke_http`](super::Incoming::invoke_http).
    pub fn tag(&self) -> &str {
        &self.tag
    }
    /// The URL called, with its unique id.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// The unique id: the URL's last path segment.
    pub fn unique_id(&self) -> &str {
        unique_of(&self.url)
    }
    /// The service's response.
    pub fn response(&self) -> &HttpResponse {
        &self.response
    }
}

pub(crate) fn unique_of(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or_default()
}

/// A call whose request is stored on the service (phase 1 done). Return it in the outcome
/// ([`Outcome::follow_up`](super::Outcome::follow_up)); the rest happens after the outcome
/// commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingCall {
    pub(crate) url: String,
    pub(crate) tag: String,
}

impl PendingCall {
    /// The URL, with its unique id.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// The unique id: the URL's last path segment.
    pub fn unique_id(&self) -> &str {
        unique_of(&self.url)
    }
}

/// Why one HTTP exchange did not give an answer to act on.
#[derive(Debug)]
pub(crate) enum Transient {
    /// Connection refused or broken, or the request could not be sent.
    Transport(String),
    /// No answer within the timeout.
    Timeout,
    /// 5xx.
    Server(StatusCode),
}

impl std::fmt::Display for Transient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transient::Transport(e) => write!(f, "transport: {e}"),
            Transient::Timeout => f.write_str("no answer within the timeout"),
            Transient::Server(s) => write!(f, "server error {s}"),
        }
    }
}

/// The pooled HTTP/1 client the processor makes its calls with.
#[derive(Clone)]
pub(crate) struct HttpCaller {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    backoff: (Duration, Duration),
}

impl HttpCaller {
    pub(crate) fn new(timeout: Duration, backoff: (Duration, Duration)) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        HttpCaller {
            client,
            timeout,
            backoff,
        }
    }

    /// One exchange: the response, or why there is none to act on (5xx counts as none).
    pub(crate) async fn exchange(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
    ) -> Result<HttpResponse, Transient> {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(body))
            .map_err(|e| Transient::Transport(e.to_string()))?;
        let exchange = async {
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| Transient::Transport(e.to_string()))?;
            let (parts, body) = res.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| Transient::Transport(e.to_string()))?
                .to_bytes();
            Ok(HttpResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let res = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Transient::Timeout)??;
        if res.status.is_server_error() {
            return Err(Transient::Server(res.status));
        }
        Ok(res)
    }

    fn pause(&self, failures: u32) -> Duration {
        super::processor::backoff(self.backoff.0, self.backoff.1, failures)
    }

    /// Phase 1: stores `body` under `url`. `Err` with the service's answer if it refuses (a
    /// 4xx other than 409, which means the request is stored and already running or done).
    pub(crate) async fn put(&self, url: &str, body: Bytes) -> Result<(), HttpResponse> {
        let mut failures = 0;
        loop {
            match self.exchange(Method::PUT, url, body.clone()).await {
                Ok(r) if r.status.is_success() || r.status == StatusCode::CONFLICT => return Ok(()),
                Ok(r) => return Err(r),
                Err(e) => {
                    failures += 1;
                    tracing::warn!(target: "idemkv::kafka", url, error = %e, "PUT of an exactly-once call failed; retrying");
                    tokio::time::sleep(self.pause(failures)).await;
                }
            }
        }
    }

    /// Phases 2 and 3: the service's answer to running the stored request, by POST, or by GET
    /// when a POST's answer was lost; 409 (still running) is waited out.
    pub(crate) async fn run(&self, url: &str) -> HttpResponse {
        let mut failures = 0;
        let mut answer_lost = false;
        loop {
            if answer_lost {
                match self.exchange(Method::GET, url, Bytes::new()).await {
                    // Not processed yet, or nothing stored: POST (again).
                    Ok(r)
                        if r.status == StatusCode::CONFLICT
                            || r.status == StatusCode::NOT_FOUND => {}
                    Ok(r) => {
                        tracing::info!(target: "idemkv::kafka", url, status = r.status.as_u16(), "GET: the stored response of a call whose POST answer was lost");
                        return r;
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(target: "idemkv::kafka", url, error = %e, "GET of an exactly-once call failed; retrying");
                        tokio::time::sleep(self.pause(failures)).await;
                        continue;
                    }
                }
            }
            match self.exchange(Method::POST, url, Bytes::new()).await {
                Ok(r) if r.status == StatusCode::CONFLICT => {
                    answer_lost = false;
                    failures += 1;
                    tokio::time::sleep(self.pause(failures)).await;
                }
                Ok(r) => {
                    tracing::info!(target: "idemkv::kafka", url, status = r.status.as_u16(), "POST: the call ran (or replayed)");
                    return r;
                }
                Err(e) => {
                    failures += 1;
                    answer_lost = true;
                    tracing::warn!(target: "idemkv::kafka", url, error = %e, "POST of an exactly-once call got no answer; fetching the stored response");
                    tokio::time::sleep(self.pause(failures)).await;
                }
            }
        }
    }

    /// Phase 4: deletes `url` until it answers 2xx or 404.
    pub(crate) async fn delete(&self, url: &str) {
        let mut failures = 0;
        loop {
            match self.exchange(Method::DELETE, url, Bytes::new()).await {
                Ok(r) if r.status.is_success() || r.status == StatusCode::NOT_FOUND => {
                    tracing::info!(target: "idemkv::kafka", url, "DELETE: the call is forgotten on the service");
                    return;
                }
                Ok(r) => {
                    tracing::warn!(target: "idemkv::kafka", url, status = r.status.as_u16(), "DELETE refused; retrying")
                }
                Err(e) => {
                    tracing::warn!(target: "idemkv::kafka", url, error = %e, "DELETE failed; retrying")
                }
            }
            failures += 1;
            tokio::time::sleep(self.pause(failures)).await;
        }
    }
}

/// The URL of this attempt's call: `{uniqueId}` replaced by a digest of the processor's scope,
/// the message's id, the attempt's token and the call's index in the attempt. `Err` if the
/// template has no `{uniqueId}` or does not make an absolute http URL.
pub(crate) fn url_for(
    template: &str,
    scope: &str,
    id: &[u8],
    token: u64,
    index: u32,
) -> Result<String, String> {
    if template.matches(UNIQUE_ID).count() != 1 {
        return Err(format!(
            "the URL template {template:?} must contain {UNIQUE_ID} once"
        ));
    }
    let mut seed = Vec::with_capacity(scope.len() + id.len() + 16);
    for part in [scope.as_bytes(), id] {
        seed.extend_from_slice(&(part.len() as u32).to_le_bytes());
        seed.extend_from_slice(part);
    }
    seed.extend_from_slice(&token.to_le_bytes());
    seed.extend_from_slice(&index.to_le_bytes());
    let unique = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&seed));
    let url = template.replace(UNIQUE_ID, &unique);
    match url.parse::<Uri>() {
        Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() && !url.contains('\n') => {
            Ok(url)
        }
        _ => Err(format!("{url:?} is not an absolute http:// URL")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_attempt_gets_its_own_url_and_bad_templates_are_refused() {
        let t = "http://127.0.0.1:8080/payments/authorize/{uniqueId}";
        let a = url_for(t, "s", b"m-1", 7, 0).unwrap();
        assert_eq!(a, url_for(t, "s", b"m-1", 7, 0).unwrap());
        assert_ne!(a, url_for(t, "s", b"m-1", 8, 0).unwrap());
        assert_ne!(a, url_for(t, "s", b"m-1", 7, 1).unwrap());
        assert_ne!(a, url_for(t, "s", b"m-2", 7, 0).unwrap());
        assert_ne!(a, url_for(t, "s2", b"m-1", 7, 0).unwrap());
        assert_eq!(unique_of(&a).len(), 32);
        assert!(url_for("http://h/x", "s", b"m", 1, 0).is_err());
        assert!(url_for("http://h/{uniqueId}/{uniqueId}", "s", b"m", 1, 0).is_err());
        assert!(url_for("/relative/{uniqueId}", "s", b"m", 1, 0).is_err());
        assert!(url_for("https://h/{uniqueId}", "s", b"m", 1, 0).is_err());
        assert_eq!(unique_of("http://h/a/b?x=1"), "b");
    }
}
