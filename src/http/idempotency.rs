//! The `Idempotency-Key` layer.
//!
//! # Behaviour
//! - Applies to the configured methods (default `POST` and `PATCH`) when the request carries
//!   the key header (default `Idempotency-Key`; a quoted value, as the IETF draft writes it, is
//!   unquoted). Without a key the request passes through, or gets 400 when a key is required.
//! - A key is 1–255 visible ASCII characters (optionally a UUID only); anything else is 400.
//! - **Scope**: the key only matches requests with the same method, path and credentials (a
//!   SHA-256 digest of the `Authorization` header); replace it with [`IdempotencyLayer::scope_with`].
//! - **Fingerprint**: method, path and query, content type and body; another payload under the
//!   same key is 422. Replace it with [`IdempotencyLayer::fingerprint_with`].
//! - First request: the handler runs under a lease, renewed in the background while it runs;
//!   it can read [`IdempotencyInfo`] from the request extensions (was this a takeover of an
//!   attempt whose process died?). Its response (status, headers except hop-by-hop ones,
//!   multi-valued headers in order, body) is stored and returned.
//! - Repeat after completion: the stored response, plus `Idempotent-Replayed: true`.
//! - Repeat while the first runs: 409 with `Retry-After`, or — with `Prefer: wait=N` (RFC 7240)
//!   or [`IdempotencyLayer::wait`] — it waits up to that long (at most 60 s) and replays.
//! - Kept outcomes: every status except 408, 409, 425, 429 and 5xx ([`IdempotencyLayer::keep_if`]
//!   changes it). For those, and when the handler panics, fails or is cancelled, the lease is
//!   released so a retry runs again.
//! - Limits: a body over [`IdempotencyLayer::max_body`] is 413. A response over
//!   [`IdempotencyLayer::max_stored_response`] is still recorded as done (never run again), and
//!   a replay answers **410 Gone** (problem type `response-too-large`) with
//!   `Idempotency-Original-Status` — the documented way to say the original was not kept.
//! - Store failures are 503 with problem+json; no handler runs without a lease.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use sha2::Digest;
use tower_layer::Layer;
use tower_service::Service;

use super::BoxError;
use super::problem::{problem, retry_after, store_error};
use super::stored;
use crate::adapter::lease::{Held, run_to_end};
use crate::{Begin, Error, Fingerprint, IdempotencyStore, Key};

/// What the handler of a first (or taken-over) request can learn, from its extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyInfo {
    /// The idempotency key.
    pub key: String,
    /// True when an earlier attempt held the key and its lease ran out (its process may have
    /// died part-way): the handler may want to check for its partial effects.
    pub takeover: bool,
}

/// State changes a handler wants committed **atomically with** its idempotent completion: put
/// it in the response's extensions. Either the key is recorded as done and every write applied,
/// or neither — so a crash between "order written" and "request completed" cannot make a retry
/// create a second order. If a write's version check fails, nothing is applied, the key is
/// released, and the client gets 409 (problem type `contention`) to retry.
#[derive(Clone, Debug, Default)]
pub struct CompleteWith(pub Vec<crate::Write>);

type ScopeFn = dyn Fn(&Parts) -> Vec<u8> + Send + Sync;
type FingerprintFn = dyn Fn(&Parts, &[u8]) -> Fingerprint + Send + Sync;
type KeepFn = dyn Fn(StatusCode) -> bool + Send + Sync;

#[derive(Clone)]
struct Config {
    header: HeaderName,
    methods: Vec<Method>,
    required: bool,
    uuid_only: bool,
    lease: Duration,
    ttl: Option<Duration>,
    wait: Option<Duration>,
    max_body: usize,
    max_stored: usize,
    keep: Arc<KeepFn>,
    scope: Arc<ScopeFn>,
    fingerprint: Arc<FingerprintFn>,
}

/// Makes a service idempotent under the `Idempotency-Key` header. See the module docs.
#[derive(Clone)]
pub struct IdempotencyLayer<St> {
    store: St,
    config: Arc<Config>,
}

impl<St> std::fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("header", &self.config.header)
            .finish_non_exhaustive()
    }
}

/// The default kept outcomes: everything but 408, 409, 425, 429 and 5xx.
fn default_keep(s: StatusCode) -> bool {
    !(s.is_server_error() || [408, 409, 425, 429].contains(&s.as_u16()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Method, path, and a digest of the `Authorization` header; hashed if over 255 bytes.
fn default_scope(parts: &Parts) -> Vec<u8> {
    let creds = parts.headers.get(http::header::AUTHORIZATION).map_or_else(
        || "-".to_owned(),
        |v| hex(&sha2::Sha256::digest(v.as_bytes())[..16]),
    );
    let scope = format!("{} {} {}", parts.method, parts.uri.path(), creds);
    if scope.len() <= crate::MAX_SCOPE_LEN {
        scope.into_bytes()
    } else {
        format!("h:{}", hex(&sha2::Sha256::digest(scope.as_bytes()))).into_bytes()
    }
}

fn default_fingerprint(parts: &Parts, body: &[u8]) -> Fingerprint {
    let mut buf = Vec::with_capacity(body.len() + 128);
    buf.extend_from_slice(parts.method.as_str().as_bytes());
    buf.push(0);
    buf.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("", |p| p.as_str())
            .as_bytes(),
    );
    buf.push(0);
    if let Some(ct) = parts.headers.get(http::header::CONTENT_TYPE) {
        buf.extend_from_slice(ct.as_bytes());
    }
    buf.push(0);
    buf.extend_from_slice(body);
    Fingerprint::of(&buf)
}

impl<St: IdempotencyStore + Clone> IdempotencyLayer<St> {
    /// The layer over `store`, with the defaults described in the module docs.
    pub fn new(store: St) -> Self {
        IdempotencyLayer {
            store,
            config: Arc::new(Config {
                header: HeaderName::from_static("idempotency-key"),
                methods: vec![Method::POST, Method::PATCH],
                required: false,
                uuid_only: false,
                lease: Duration::from_secs(30),
                ttl: None,
                wait: None,
                max_body: 1 << 20,
                max_stored: 1 << 20,
                keep: Arc::new(default_keep),
                scope: Arc::new(default_scope),
                fingerprint: Arc::new(default_fingerprint),
            }),
        }
    }

    /// Changes this layer's configuration only: a clone keeps its own (copy on write).
    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The header carrying the key (default `Idempotency-Key`).
    pub fn header(self, name: HeaderName) -> Self {
        self.with(|c| c.header = name)
    }
    /// The methods the layer applies to (default POST and PATCH).
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let m = methods.into_iter().collect();
        self.with(|c| c.methods = m)
    }
    /// Answer 400 to requests of those methods that carry no key (default: pass them through).
    pub fn require_key(self, yes: bool) -> Self {
        self.with(|c| c.required = yes)
    }
    /// Accept only UUIDs as keys.
    pub fn uuid_keys(self, yes: bool) -> Self {
        self.with(|c| c.uuid_only = yes)
    }
    /// The lease a running handler holds (default 30 s; renewed every third of it while the
    /// handler runs). After a crash, a retry takes over once it has run out.
    pub fn lease(self, d: Duration) -> Self {
        self.with(|c| c.lease = d)
    }
    /// How long stored responses are kept (default: the store's, 24 h).
    pub fn ttl(self, d: Duration) -> Self {
        self.with(|c| c.ttl = Some(d))
    }
    /// Wait this long for a running original before answering 409 (default: don't; a request
    /// can still ask with `Prefer: wait=N`).
    pub fn wait(self, d: Duration) -> Self {
        self.with(|c| c.wait = Some(d))
    }
    /// Largest request body fingerprinted (default 1 MiB); larger gets 413.
    pub fn max_body(self, n: usize) -> Self {
        self.with(|c| c.max_body = n)
    }
    /// Largest response stored (default 1 MiB); see the module docs for larger ones.
    pub fn max_stored_response(self, n: usize) -> Self {
        self.with(|c| c.max_stored = n)
    }
    /// Which responses are recorded; others release the key so a retry runs again.
    pub fn keep_if(self, f: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.with(|c| c.keep = Arc::new(f))
    }
    /// The scope of a request's key (at most 255 bytes; longer ones are refused by the store).
    pub fn scope_with(self, f: impl Fn(&Parts) -> Vec<u8> + Send + Sync + 'static) -> Self {
        self.with(|c| c.scope = Arc::new(f))
    }
    /// The fingerprint of a request, from its head and body.
    pub fn fingerprint_with(
        self,
        f: impl Fn(&Parts, &[u8]) -> Fingerprint + Send + Sync + 'static,
    ) -> Self {
        self.with(|c| c.fingerprint = Arc::new(f))
    }
}

impl<S, St: Clone> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;
    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            store: self.store.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Clone)]
pub struct Idempotency<S, St> {
    inner: S,
    store: St,
    config: Arc<Config>,
}

impl<S: std::fmt::Debug, St> std::fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St> Idempotency<S, St> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The key from the headers: `Ok(None)` if absent, `Err(why)` if malformed.
fn extract_key(cfg: &Config, headers: &HeaderMap) -> Result<Option<String>, String> {
    let mut values = headers.get_all(&cfg.header).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(format!("more than one {} header", cfg.header));
    }
    let raw = v.as_bytes();
    let raw = match raw {
        [b'"', inner @ .., b'"'] => inner,
        other => other,
    };
    if raw.is_empty() || raw.len() > 255 {
        return Err(format!(
            "the key must be 1 to 255 characters, not {}",
            raw.len()
        ));
    }
    if !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err("the key must be visible ASCII characters only".into());
    }
    let key = String::from_utf8_lossy(raw).into_owned();
    if cfg.uuid_only && !is_uuid(&key) {
        return Err("the key must be a UUID".into());
    }
    Ok(Some(key))
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `Prefer: wait=N` (RFC 7240), capped at 60 s.
fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix("wait="))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .map(|n| Duration::from_secs(n.min(60)))
        .next()
}

impl<S, St, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S, St>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    St: IdempotencyStore + Clone,
    ReqB: Body + From<Bytes> + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<BoxError>,
    ResB: Body + From<Bytes> + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The clone is not ready; the ready one goes into the future (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cfg = Arc::clone(&self.config);
        let store = self.store.clone();
        Box::pin(async move {
            if !cfg.methods.contains(req.method()) {
                return inner.call(req).await;
            }
            let key = match extract_key(&cfg, req.headers()) {
                Ok(Some(k)) => k,
                Ok(None) if cfg.required => {
                    let why = format!("this endpoint requires an {} header", cfg.header);
                    return Ok(problem(StatusCode::BAD_REQUEST, "missing-key", &why));
                }
                Ok(None) => return inner.call(req).await,
                Err(why) => return Ok(problem(StatusCode::BAD_REQUEST, "invalid-key", &why)),
            };
            let (mut parts, body) = req.into_parts();
            let body = match Limited::new(body, cfg.max_body).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    let why = format!("request bodies are limited to {} bytes", cfg.max_body);
                    return Ok(problem(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body-too-large",
                        &why,
                    ));
                }
                Err(e) => {
                    return Ok(problem(
                        StatusCode::BAD_REQUEST,
                        "unreadable-body",
                        &e.to_string(),
                    ));
                }
            };
            let scope = (cfg.scope)(&parts);
            let fp = (cfg.fingerprint)(&parts, &body);
            let k = Key::new(&scope, key.as_bytes());
            let begun = match prefer_wait(&parts.headers).or(cfg.wait) {
                Some(w) => store.begin_wait(k, fp, cfg.lease, w).await,
                None => store.begin(k, fp, cfg.lease).await,
            };
            let lease = match begun {
                Err(e) => return Ok(store_error(&e)),
                Ok(Begin::Mismatch) => {
                    let why = "this idempotency key was used with a different request";
                    return Ok(problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused", why));
                }
                Ok(Begin::InProgress { deadline }) => {
                    let why = "a request with this idempotency key is still being processed";
                    let res = problem(StatusCode::CONFLICT, "in-progress", why);
                    return Ok(retry_after(res, deadline));
                }
                Ok(Begin::Completed(done)) => return Ok(stored::replay(&done.response, true)),
                Ok(Begin::Acquired(lease)) => lease,
            };

            // First request: run the handler under the lease (renewed while it runs, released
            // if it fails, panics or the request is cancelled: dropping this future drops `held`).
            parts.extensions.insert(IdempotencyInfo {
                key: key.clone(),
                takeover: lease.is_takeover(),
            });
            let held = Held::new(store.clone(), lease);
            let handler = inner.call(Request::from_parts(parts, ReqB::from(body)));
            let (res, held) = match run_to_end(&store, held, cfg.lease, handler).await {
                Ok((res, held)) => (res?, held),
                Err(e) => return Ok(store_error(&e)),
            };
            let (mut rparts, rbody) = res.into_parts();
            let writes = rparts
                .extensions
                .remove::<CompleteWith>()
                .unwrap_or_default()
                .0;
            let rbytes = match rbody.collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    let why = format!("the handler's response body failed: {}", e.into());
                    return Ok(problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "response-failed",
                        &why,
                    ));
                }
            };
            {
                let lease = held.take();
                if (cfg.keep)(rparts.status) {
                    let record =
                        stored::encode(rparts.status, &rparts.headers, &rbytes, cfg.max_stored);
                    match store.complete(&lease, &record, cfg.ttl, &writes).await {
                        Ok(_) => {}
                        Err(e @ Error::BatchConflict { .. }) => {
                            let _ = store.release(lease).await;
                            return Ok(store_error(&e));
                        }
                        Err(e) if !writes.is_empty() => {
                            // The writes were not applied: the response must not claim they were.
                            let _ = store.release(lease).await;
                            return Ok(store_error(&e));
                        }
                        // The lease was taken over or the store is down: the key is left to a
                        // retry; this response (which changed nothing in the store) still goes out.
                        Err(_) => {}
                    }
                } else {
                    let _ = store.release(lease).await;
                }
            }
            Ok(Response::from_parts(rparts, ResB::from(rbytes)))
        })
    }
}
