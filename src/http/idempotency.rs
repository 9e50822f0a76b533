//! The `Idempotency-Key` layer.
//!
//! # Behaviour
//! - Applies to the configured methods (default `POST` and `PATCH`) when the request carries
//!   the key header (default `Idempotency-Key`; a quoted value, as the IETF draft writes it, is
//!   unquoted). Without a key the request passes through, or gets 400 when a key is required.
//! - A key is 1–255 visible ASCII characters (optionally a UUID only); anything else is 400.
//! - **Scope**: the key only matches requests with the same method, path and credentials: a
//!   SHA-256 digest of the `Authorization` **and** `Cookie` headers, so two clients with
//!   different sessions never share a key. The trade-off: a cookie that changes between a
//!   request and its retry (a rotated session, an analytics cookie a script rewrites) starts a
//!   new scope, and the retry runs again. Cookie-session applications should scope by the
//!   authenticated principal instead, with [`IdempotencyLayer::scope_by_extension`]; any other
//!   rule is [`IdempotencyLayer::scope_with`]. [`IdempotencyLayer::require_credentials`]
//!   refuses requests that carry none (401), instead of scoping them all together.
//! - **Fingerprint**: method, path and query, content type and body; another payload under the
//!   same key is 422. Replace it with [`IdempotencyLayer::fingerprint_with`].
//! - First request: the handler runs under a lease, renewed in the background while it runs;
//!   it can read [`IdempotencyInfo`] from the request extensions (was this a takeover of an
//!   attempt whose process died?). Its response (status, headers except hop-by-hop ones,
//!   multi-valued headers in order, body) is returned, and stored without per-client
//!   credentials: no `Set-Cookie` or `Authentication-Info` is stored or replayed (see
//!   [`StoredHeaders`]; [`IdempotencyLayer::stored_headers`] changes it).
//! - Repeat after completion: the stored response, plus `Idempotent-Replayed: true`.
//! - Repeat while the first runs: 409 with `Retry-After`, or — with `Prefer: wait=N` (RFC 7240)
//!   or [`IdempotencyLayer::wait`] — it waits up to that long (at most 60 s) and replays.
//! - **Retention is advertised**: every response to a request with a key carries
//!   `Idempotency-TTL: <seconds>`, how long a completed key is kept (default 86400, set with
//!   [`IdempotencyLayer::ttl`]); the 409 and 422 bodies say what the client can do.
//! - Kept outcomes: every status except 408, 409, 425, 429 and 5xx ([`IdempotencyLayer::keep_if`]
//!   changes it). For those, and when the handler panics, fails or is cancelled, the lease is
//!   released so a retry runs again.
//! - Limits: a body over [`IdempotencyLayer::max_body`] is 413. A response over
//!   [`IdempotencyLayer::max_stored_response`] is still recorded as done (never run again), and
//!   a replay answers **410 Gone** (problem type `response-too-large`) with
//!   `Idempotency-Original-Status` — the documented way to say the original was not kept.
//! - Store failures are 503 with problem+json and no internal error text (it is logged through
//!   `tracing`); a full store (record or byte budget) is 503 `store-full` with `Retry-After`,
//!   and nothing stored is evicted. No handler runs without a lease.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Limited;
use sha2::Digest;
use tower_layer::Layer;
use tower_service::Service;

use super::BoxError;
use super::problem::{problem, retry_after, store_error};
use super::request_key::{credentials, default_fingerprint, hex, parse_key, prefer_wait, scoped};
use super::stored::{self, DefaultStoredHeaders, StoredHeaders};
use crate::adapter::lease::{Held, run_to_end};
use crate::{Begin, BeginOptions, Error, Fingerprint, IdempotencyStore, Key, LeaseSync};

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

/// In an axum handler: `info: IdempotencyInfo` (rejected with 500 when the route is not behind
/// the layer: a wiring mistake) or `info: Option<IdempotencyInfo>` (`None` without a key).
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> axum_core::extract::FromRequestParts<S> for IdempotencyInfo {
    type Rejection = Response<axum_core::body::Body>;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<IdempotencyInfo>().cloned().ok_or_else(|| {
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no-idempotency-layer",
                "this handler needs IdempotencyInfo, but no IdempotencyLayer ran for this request",
            )
        })
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum_core::extract::OptionalFromRequestParts<S> for IdempotencyInfo {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<IdempotencyInfo>().cloned())
    }
}

/// In an axum handler's return value: `(StatusCode::CREATED, CompleteWith(writes), body)`.
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl axum_core::response::IntoResponseParts for CompleteWith {
    type Error = std::convert::Infallible;

    fn into_response_parts(
        self,
        mut res: axum_core::response::ResponseParts,
    ) -> Result<axum_core::response::ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

type ScopeFn = dyn Fn(&Parts) -> Vec<u8> + Send + Sync;
type PrincipalFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// How a request's scope is made.
#[derive(Clone)]
enum ScopeRule {
    /// Method, path and a digest of `Authorization` and `Cookie`.
    Credentials,
    /// Method, path and a digest of the principal an earlier layer put in the extensions.
    Principal(Arc<PrincipalFn>),
    /// The user's function.
    Custom(Arc<ScopeFn>),
}
type FingerprintFn = dyn Fn(&Parts, &[u8]) -> Fingerprint + Send + Sync;
type KeepFn = dyn Fn(StatusCode) -> bool + Send + Sync;

#[derive(Clone)]
struct Config {
    header: HeaderName,
    methods: Vec<Method>,
    required: bool,
    uuid_only: bool,
    lease: Duration,
    ttl: Duration,
    /// `ttl` in whole seconds, as the `Idempotency-TTL` value: built once, so that each
    /// response clones a shared value instead of formatting a new one.
    ttl_header: HeaderValue,
    wait: Option<Duration>,
    lease_sync: LeaseSync,
    max_body: usize,
    max_stored: usize,
    keep: Arc<KeepFn>,
    scope: ScopeRule,
    require_credentials: Option<HeaderValue>,
    stored_headers: Arc<dyn StoredHeaders>,
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

/// Who is asking, as digest input, by the layer's rule; `None` for an anonymous request.
fn principal(rule: &ScopeRule, parts: &Parts) -> Option<Vec<u8>> {
    match rule {
        ScopeRule::Credentials | ScopeRule::Custom(_) => credentials(parts),
        ScopeRule::Principal(f) => f(parts).map(|p| {
            let mut m = b"p".to_vec();
            m.extend_from_slice(p.as_bytes());
            m
        }),
    }
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
                ttl: crate::limits::DAY,
                ttl_header: HeaderValue::from(crate::limits::DAY.as_secs()),
                wait: None,
                lease_sync: LeaseSync::Deferred,
                max_body: 1 << 20,
                max_stored: 1 << 20,
                keep: Arc::new(default_keep),
                scope: ScopeRule::Credentials,
                require_credentials: None,
                stored_headers: Arc::new(DefaultStoredHeaders),
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
    /// When a request's lease must be durable (default [`LeaseSync::Deferred`]: with
    /// `Durability::Immediate` the request waits for one `fdatasync`, its completion's, which
    /// covers the lease; after a crash, a retry whose lease never reached the disk runs as
    /// fresh). `LeaseSync::Synced` waits for the lease too, so that after a crash a retry
    /// always sees the attempt and takes it over ([`IdempotencyInfo::takeover`]) once the
    /// lease has run out.
    pub fn lease_sync(self, sync: LeaseSync) -> Self {
        self.with(|c| c.lease_sync = sync)
    }
    /// How long completed keys and their responses are kept (default 24 h), advertised on
    /// every keyed response as `Idempotency-TTL` (whole seconds). Zero is refused by the store.
    pub fn ttl(self, d: Duration) -> Self {
        self.with(|c| {
            c.ttl = d;
            c.ttl_header = HeaderValue::from(d.as_secs());
        })
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
    /// With [`require_credentials`](Self::require_credentials), a request without
    /// `Authorization` or `Cookie` is still refused before this runs.
    pub fn scope_with(self, f: impl Fn(&Parts) -> Vec<u8> + Send + Sync + 'static) -> Self {
        self.with(|c| c.scope = ScopeRule::Custom(Arc::new(f)))
    }

    /// Scopes keys by the authenticated principal an earlier layer (your authentication
    /// middleware) put in the request extensions as a `T`: its `Display` form must identify
    /// the principal uniquely. Requests without a `T` are anonymous: they share one scope, or
    /// are refused with [`require_credentials`](Self::require_credentials).
    ///
    /// ```
    /// use idemkv::http::IdempotencyLayer;
    /// use idemkv::Store;
    ///
    /// #[derive(Clone)]
    /// struct UserId(u64);
    /// impl std::fmt::Display for UserId {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         write!(f, "user:{}", self.0)
    ///     }
    /// }
    ///
    /// let layer = IdempotencyLayer::new(Store::in_memory()).scope_by_extension::<UserId>();
    /// # drop(layer);
    /// ```
    pub fn scope_by_extension<T>(self) -> Self
    where
        T: std::fmt::Display + Clone + Send + Sync + 'static,
    {
        let f = |parts: &Parts| parts.extensions.get::<T>().map(ToString::to_string);
        self.with(|c| c.scope = ScopeRule::Principal(Arc::new(f)))
    }

    /// Refuses keyed requests that carry no credentials (no `Authorization` or `Cookie`; with
    /// [`scope_by_extension`](Self::scope_by_extension), no principal) with 401,
    /// problem type `credentials-required`, and `WWW-Authenticate: <challenge>` (RFC 9110
    /// asks a 401 to carry one: `Bearer`, `Basic realm="api"`, …). By default such requests
    /// are served in one shared anonymous scope per method and path.
    pub fn require_credentials(self, challenge: HeaderValue) -> Self {
        self.with(|c| c.require_credentials = Some(challenge))
    }

    /// Which response headers are stored and replayed (default [`DefaultStoredHeaders`]:
    /// everything but `Set-Cookie`, `Authentication-Info` and other per-client credentials).
    pub fn stored_headers(self, policy: impl StoredHeaders) -> Self {
        self.with(|c| c.stored_headers = Arc::new(policy))
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
    parse_key(v.as_bytes(), cfg.uuid_only).map(Some)
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
        // One span per request: method, path, a digest of the key (never the key or any
        // credential), and how it ended. A disabled span costs one callsite check.
        let span = tracing::info_span!(
            "idempotency",
            method = %req.method(),
            path = %req.uri().path(),
            key = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let here = span.clone();
        Box::pin(tracing::Instrument::instrument(
            async move {
                #[cfg(feature = "metrics")]
                let started = std::time::Instant::now();
                #[cfg(feature = "metrics")]
                let mut handler_time = Duration::ZERO;
                let mut outcome = "refused";
                let res = async {
            if !cfg.methods.contains(req.method()) {
                outcome = "passthrough";
                return inner.call(req).await;
            }
            let key = match extract_key(&cfg, req.headers()) {
                Ok(Some(k)) => k,
                Ok(None) if cfg.required => {
                    let why = format!("this endpoint requires an {} header", cfg.header);
                    return Ok(problem(StatusCode::BAD_REQUEST, "missing-key", &why));
                }
                Ok(None) => {
                    outcome = "passthrough";
                    return inner.call(req).await;
                }
                Err(why) => return Ok(problem(StatusCode::BAD_REQUEST, "invalid-key", &why)),
            };
            if !here.is_disabled() {
                here.record("key", hex(&sha2::Sha256::digest(key.as_bytes())[..8]));
            }
            let (mut parts, body) = req.into_parts();
            let body = match super::body_bytes(Limited::new(body, cfg.max_body)).await {
                Ok(b) => b,
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
            let who = principal(&cfg.scope, &parts);
            if let (None, Some(challenge)) = (&who, &cfg.require_credentials) {
                let why = "this endpoint needs an authenticated request for idempotency keys";
                let mut res = problem(StatusCode::UNAUTHORIZED, "credentials-required", why);
                res.headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, challenge.clone());
                return Ok(res);
            }
            let scope = match &cfg.scope {
                ScopeRule::Custom(f) => f(&parts),
                _ => scoped(&parts, who.as_deref()),
            };
            let fp = (cfg.fingerprint)(&parts, &body);
            let k = Key::new(&scope, key.as_bytes());
            let options = BeginOptions::new()
                .wait_opt(prefer_wait(&parts.headers).or(cfg.wait))
                .lease_sync(cfg.lease_sync);
            let begun = store.begin_with(k, fp, cfg.lease, options).await;
            let lease = match begun {
                Err(e) => {
                    outcome = "store-error";
                    return Ok(store_error(&e));
                }
                Ok(Begin::Mismatch) => {
                    outcome = "mismatch";
                    let why = format!(
                        "this idempotency key was already used with a different request \
                         (method, path, content type or body); send this request under a new key \
                         (a key is kept for {} s after its request completed)",
                        cfg.ttl.as_secs()
                    );
                    let res = problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused", &why);
                    return Ok(advertise(res, &cfg));
                }
                Ok(Begin::InProgress { deadline }) => {
                    outcome = "conflict";
                    let why = "a request with this idempotency key is still being processed; \
                               retry after Retry-After seconds, or send `Prefer: wait=N` to \
                               wait up to N seconds (at most 60) for its response";
                    let res = problem(StatusCode::CONFLICT, "in-progress", why);
                    return Ok(advertise(retry_after(res, deadline), &cfg));
                }
                Ok(Begin::Completed(done)) => {
                    outcome = "replayed";
                    return Ok(advertise(stored::replay(done.response, true), &cfg));
                }
                Ok(Begin::Acquired(lease)) => {
                    outcome = if lease.is_takeover() { "takeover" } else { "fresh" };
                    lease
                }
            };

            // First request: run the handler under the lease (renewed while it runs, released
            // if it fails, panics or the request is cancelled: dropping this future drops `held`).
            parts.extensions.insert(IdempotencyInfo {
                key,
                takeover: lease.is_takeover(),
            });
            let held = Held::new(store.clone(), lease);
            let handler = inner.call(Request::from_parts(parts, ReqB::from(body)));
            #[cfg(feature = "metrics")]
            let handler_started = std::time::Instant::now();
            let ran = run_to_end(&store, held, cfg.lease, handler).await;
            #[cfg(feature = "metrics")]
            {
                handler_time = handler_started.elapsed();
            }
            let (res, held) = match ran {
                Ok((res, held)) => (res?, held),
                Err(e) => return Ok(store_error(&e)),
            };
            let (mut rparts, rbody) = res.into_parts();
            let writes = rparts
                .extensions
                .remove::<CompleteWith>()
                .unwrap_or_default()
                .0;
            let rbytes = match super::body_bytes(rbody).await {
                Ok(b) => b,
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
                    let record = stored::encode(
                        rparts.status,
                        &rparts.headers,
                        &rbytes,
                        cfg.max_stored,
                        &*cfg.stored_headers,
                    );
                    match store
                        .complete(&lease, &record, Some(cfg.ttl), &writes)
                        .await
                    {
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
                        Err(e) => {
                            tracing::warn!(target: "idemkv::http", error = %e, "the response could not be recorded; a retry runs the handler again");
                        }
                    }
                } else {
                    let _ = store.release(lease).await;
                }
            }
            Ok(advertise(
                Response::from_parts(rparts, ResB::from(rbytes)),
                &cfg,
            ))
          }
          .await;
                here.record("outcome", outcome);
                #[cfg(feature = "metrics")]
                if outcome != "passthrough" {
                    crate::metrics::http_overhead(started.elapsed().saturating_sub(handler_time));
                }
                res
            },
            span,
        ))
    }
}

/// Adds `Idempotency-TTL`: how long a completed key is kept, in whole seconds.
fn advertise<B>(mut res: Response<B>, cfg: &Config) -> Response<B> {
    res.headers_mut().insert(TTL_HEADER, cfg.ttl_header.clone());
    res
}

/// The response header advertising key retention (as proposed in the IETF httpapi working
/// group's idempotency draft repository, issue 49).
const TTL_HEADER: HeaderName = HeaderName::from_static("idempotency-ttl");
