//! The exactly-once protocol on one URL (token-based deduplication), for endpoints like
//! `/payments/authorize/{id}` where only the processing is user code:
//!
//! Invariant: the handler runs only under the stored request's lease, held through the shared
//! lease runner, and its writes commit atomically with "processed".
//!
//! | method | effect | answers |
//! |---|---|---|
//! | `PUT` | stores the request body under the id (repeatable until processed) | 202; 409 once processing started or done |
//! | `POST` | processes the stored request **at most once**, atomically with the state changes the handler returns, and stores the response | the handler's response; a replay (`Idempotent-Replayed: true`) after that; 404 for an unknown or deleted id (nothing runs); 409 + `Retry-After` while it runs |
//! | `GET` | the stored response | it; 404 unknown id; 409 not processed yet |
//! | `DELETE` | forgets everything about the id (repeatable) | 204 |
//!
//! The id is the last path segment. The handler gets a [`StoredRequest`] (the id, the stored
//! payload, and the POST's headers, to authenticate the caller) and returns a [`Processed`]:
//! the response, a batch of versioned [`Write`]s (an account balance, a stock count) that the
//! store's `complete` applies together with "processed", all or none, and the messages to send
//! ([`Processed::send`]). If a write conflicts (another request changed the balance meanwhile),
//! the handler runs again on fresh state, under the same lease, up to 8 times. An `Err` from
//! the handler records nothing: the request goes back to waiting, and the POST answers 503
//! with `Retry-After`, to be retried.
//!
//! Sent messages go through the outbox (as in the Kafka adapter): recorded in the same batch as
//! the response, published through the endpoint's [`Publisher`] after it commits, each under
//! the id `{request id}/{index}`. A publication that fails is retried by the next POST or GET
//! of the same id, and DELETE publishes what is left before it forgets the id (503 if it
//! cannot: DELETE is retried until it answers 2xx or 404).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Limited;
use tower_service::Service;

use super::BoxError;
use super::problem::{problem, retry_after, store_error};
use super::stored::{self, DefaultStoredHeaders, StoredHeaders};
use crate::adapter::lease::{Held, run_to_end};
use crate::adapter::outbox::{self, FlushError, Outgoing, Publisher};
use crate::{Error, IdempotencyStore, Key, OwnedKey, PutPending, Take, Write};

/// What the handler made of a request.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Processed {
    /// The response status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The response body.
    pub body: Bytes,
    /// State changes committed atomically with "processed".
    pub writes: Vec<Write>,
    /// Messages published after "processed" commits (see [`Processed::send`]).
    pub outgoing: Vec<Outgoing>,
}

impl Processed {
    /// A response with `status` and `body`, no writes.
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Processed {
            status,
            headers: HeaderMap::new(),
            body: body.into(),
            writes: Vec::new(),
            outgoing: Vec::new(),
        }
    }

    /// Sends `msg` through the endpoint's outbox: recorded with "processed", published through
    /// the [`Publisher`] given to [`ExactlyOnce::publisher`] after it commits, under the id
    /// `{request id}/{index}`. Without a publisher the request is not processed (500).
    pub fn send(mut self, msg: Outgoing) -> Self {
        self.outgoing.push(msg);
        self
    }

    /// Adds a state change to commit with the response.
    pub fn write(mut self, w: Write) -> Self {
        self.writes.push(w);
        self
    }

    /// Adds a response header.
    pub fn header(mut self, name: http::HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }
}

/// A stored request being processed: its id, its payload (from the PUT) and the headers of
/// the POST that runs it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StoredRequest {
    /// The id (the last path segment).
    pub id: String,
    /// The body stored by the PUT.
    pub payload: Bytes,
    /// The POST's headers (`Authorization` and the like: the handler authenticates).
    pub headers: HeaderMap,
}

/// The user code of an exactly-once endpoint: processes one stored request. It may read state
/// from the store; it runs again if its writes conflict. An `Err` records nothing (the POST
/// answers 503 and may be retried).
///
/// Implemented for every `Fn(StoredRequest) -> impl Future<Output = Result<Processed, E>>`, so
/// an async closure is a handler:
///
/// ```
/// use http::StatusCode;
/// use idemkv::http::{ExactlyOnce, Processed, StoredRequest};
/// use idemkv::Store;
///
/// let svc = ExactlyOnce::new(Store::in_memory(), "payments", |req: StoredRequest| async move {
///     if !req.headers.contains_key(http::header::AUTHORIZATION) {
///         return Ok(Processed::new(StatusCode::UNAUTHORIZED, "who are you?"));
///     }
///     Ok::<_, std::io::Error>(Processed::new(StatusCode::OK, format!("paid {}", req.id)))
/// });
/// # drop(svc);
/// ```
pub trait ExactlyOnceHandler: Send + Sync + 'static {
    /// Processes one stored request.
    fn process(
        &self,
        req: StoredRequest,
    ) -> impl Future<Output = Result<Processed, BoxError>> + Send;
}

impl<F, Fut, E> ExactlyOnceHandler for F
where
    F: Fn(StoredRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Processed, E>> + Send,
    E: Into<BoxError>,
{
    async fn process(&self, req: StoredRequest) -> Result<Processed, BoxError> {
        self(req).await.map_err(Into::into)
    }
}

/// [`Publisher`] behind a pointer, so the service keeps one type whatever publishes.
trait DynPublisher: Send + Sync {
    fn publish_boxed<'a>(
        &'a self,
        msg: &'a Outgoing,
        id: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>>;
}

impl<P: Publisher> DynPublisher for P {
    fn publish_boxed<'a>(
        &'a self,
        msg: &'a Outgoing,
        id: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>> {
        Box::pin(self.publish(msg, id))
    }
}

struct Boxed(Arc<dyn DynPublisher>);

impl Publisher for Boxed {
    async fn publish(&self, msg: &Outgoing, id: &[u8]) -> Result<(), BoxError> {
        self.0.publish_boxed(msg, id).await
    }
}

/// The exactly-once service for one endpoint; see the module docs.
pub struct ExactlyOnce<St, H> {
    store: St,
    scope: Arc<str>,
    handler: Arc<H>,
    lease: Duration,
    max_body: usize,
    stored_headers: Arc<dyn StoredHeaders>,
    publisher: Option<Arc<dyn DynPublisher>>,
}

impl<St: Clone, H> Clone for ExactlyOnce<St, H> {
    fn clone(&self) -> Self {
        ExactlyOnce {
            store: self.store.clone(),
            scope: Arc::clone(&self.scope),
            handler: Arc::clone(&self.handler),
            lease: self.lease,
            max_body: self.max_body,
            stored_headers: Arc::clone(&self.stored_headers),
            publisher: self.publisher.clone(),
        }
    }
}

impl<St, H> std::fmt::Debug for ExactlyOnce<St, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExactlyOnce")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl<St: IdempotencyStore + Clone, H: ExactlyOnceHandler> ExactlyOnce<St, H> {
    /// The endpoint's records live under `scope` (give each endpoint its own).
    pub fn new(store: St, scope: impl Into<Arc<str>>, handler: H) -> Self {
        ExactlyOnce {
            store,
            scope: scope.into(),
            handler: Arc::new(handler),
            lease: Duration::from_secs(30),
            max_body: 1 << 20,
            stored_headers: Arc::new(DefaultStoredHeaders),
            publisher: None,
        }
    }

    /// Publishes the messages handlers send ([`Processed::send`]); a Kafka producer is one
    /// (`idemkv::kafka::ProducerPublisher`).
    pub fn publisher(mut self, p: impl Publisher + 'static) -> Self {
        self.publisher = Some(Arc::new(p));
        self
    }

    /// Largest stored request body (default 1 MiB); a larger PUT gets 413.
    pub fn max_body(mut self, n: usize) -> Self {
        self.max_body = n;
        self
    }

    /// Which response headers are stored for GET and replays (default
    /// [`DefaultStoredHeaders`]: no `Set-Cookie` or other per-client credentials).
    pub fn stored_headers(mut self, policy: impl StoredHeaders) -> Self {
        self.stored_headers = Arc::new(policy);
        self
    }

    /// The lease a running handler holds (default 30 s).
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }
}

const RETRIES: usize = 8;

/// Responses have a `Full<Bytes>` body (axum takes it through `Router::route_service`).
type ResB = http_body_util::Full<Bytes>;

impl<St, H, ReqB> Service<Request<ReqB>> for ExactlyOnce<St, H>
where
    St: IdempotencyStore + Clone,
    H: ExactlyOnceHandler,
    ReqB: Body + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<BoxError>,
{
    type Response = Response<ResB>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResB>, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let id = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            if id.is_empty() {
                return Ok(problem(
                    StatusCode::NOT_FOUND,
                    "unknown-id",
                    "no id in the path",
                ));
            }
            let key = Key::new(&*me.scope, id.as_bytes());
            let res = match *req.method() {
                Method::PUT => {
                    let body =
                        match super::body_bytes(Limited::new(req.into_body(), me.max_body)).await {
                            Ok(b) => b,
                            Err(_) => {
                                return Ok(problem(
                                    StatusCode::PAYLOAD_TOO_LARGE,
                                    "body-too-large",
                                    "the request body is too large or unreadable",
                                ));
                            }
                        };
                    match me.store.put_pending(key, &body, None).await {
                        Ok(PutPending::Stored) => {
                            let mut r = Response::new(ResB::from(Bytes::from(format!(
                                "{{\"id\":\"{}\",\"state\":\"pending\"}}",
                                id.escape_default()
                            ))));
                            *r.status_mut() = StatusCode::ACCEPTED;
                            r.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                HeaderValue::from_static("application/json"),
                            );
                            r
                        }
                        Ok(PutPending::InProgress { deadline }) => retry_after(
                            problem(
                                StatusCode::CONFLICT,
                                "in-progress",
                                "this request is being processed; it can no longer change",
                            ),
                            deadline,
                        ),
                        Ok(PutPending::Completed) => problem(
                            StatusCode::CONFLICT,
                            "already-processed",
                            "this request was processed; it can no longer change",
                        ),
                        Err(e) => store_error(&e),
                    }
                }
                Method::POST => {
                    let headers = req.headers().clone();
                    me.process(key, &id, headers).await
                }
                Method::GET => match me.store.get(key).await {
                    Ok(Some(crate::Snapshot::Completed(c))) => {
                        let _ = me.flush(&id).await;
                        stored::replay(c.response, false)
                    }
                    Ok(Some(
                        crate::Snapshot::Pending { .. } | crate::Snapshot::InFlight { .. },
                    )) => problem(
                        StatusCode::CONFLICT,
                        "not-processed-yet",
                        "this request is stored but not processed yet",
                    ),
                    Ok(_) => problem(
                        StatusCode::NOT_FOUND,
                        "unknown-id",
                        "no request is stored under this id",
                    ),
                    Err(e) => store_error(&e),
                },
                Method::DELETE => match me.flush(&id).await {
                    Err(FlushError::Store(e)) => store_error(&e),
                    Err(_) => problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "messages-not-published",
                        "messages this request sent are not all published yet; retry the DELETE",
                    ),
                    Ok(()) => match me.store.remove(key).await {
                        Ok(_) => {
                            let mut r = Response::new(ResB::from(Bytes::new()));
                            *r.status_mut() = StatusCode::NO_CONTENT;
                            r
                        }
                        Err(e) => store_error(&e),
                    },
                },
                _ => {
                    let mut r = problem(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method-not-allowed",
                        "use PUT, POST, GET or DELETE",
                    );
                    r.headers_mut().insert(
                        http::header::ALLOW,
                        HeaderValue::from_static("PUT, POST, GET, DELETE"),
                    );
                    r
                }
            };
            Ok(res)
        })
    }
}

impl<St: IdempotencyStore + Clone, H: ExactlyOnceHandler> ExactlyOnce<St, H> {
    fn outbox_key(&self, id: &str) -> OwnedKey {
        OwnedKey::new(format!("{}#outbox", self.scope), id)
    }

    /// Publishes what the outbox of `id` has not published yet (nothing without a publisher,
    /// or with no outbox). A failure is logged; the messages stay recorded for the next try.
    async fn flush(&self, id: &str) -> Result<(), FlushError> {
        let Some(p) = &self.publisher else {
            return Ok(());
        };
        let publisher = Boxed(Arc::clone(p));
        let ttl = Duration::from_secs(24 * 3600);
        match outbox::flush(
            &self.store,
            &self.outbox_key(id),
            id.as_bytes(),
            ttl,
            &publisher,
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                match &e {
                    FlushError::Publish { topic, source } => {
                        tracing::warn!(target: "idemkv::http", topic = %topic, error = %source, "outbox message not published; the next POST, GET or DELETE of this id retries");
                    }
                    FlushError::Store(err) => {
                        tracing::error!(target: "idemkv::http", error = %err, "outbox not readable");
                    }
                    FlushError::Corrupt(why) => {
                        tracing::error!(target: "idemkv::http", reason = why, "outbox record damaged");
                    }
                }
                Err(e)
            }
        }
    }

    async fn process<B: From<Bytes>>(
        &self,
        key: Key<'_>,
        id: &str,
        headers: HeaderMap,
    ) -> Response<B> {
        let (lease, payload) = match self.store.take_pending(key, self.lease).await {
            Ok(Take::Acquired { lease, payload }) => (lease, payload),
            Ok(Take::Completed(c)) => {
                let _ = self.flush(id).await;
                return stored::replay(c.response, true);
            }
            Ok(Take::InProgress { deadline }) => {
                return retry_after(
                    problem(
                        StatusCode::CONFLICT,
                        "in-progress",
                        "this request is being processed",
                    ),
                    deadline,
                );
            }
            Ok(Take::NotFound) => {
                return problem(
                    StatusCode::NOT_FOUND,
                    "unknown-id",
                    "no request is stored under this id; nothing was run",
                );
            }
            Err(e) => return store_error(&e),
        };
        let payload = Bytes::from(payload);
        // Held under the shared lease runner: renewed while the handler runs, released at once
        // if the request is cancelled or the handler panics.
        let mut held = Held::new(self.store.clone(), lease);
        let mut runs = 0;
        loop {
            runs += 1;
            let req = StoredRequest {
                id: id.to_owned(),
                payload: payload.clone(),
                headers: headers.clone(),
            };
            let work = self.handler.process(req);
            let done;
            (done, held) = match run_to_end(&self.store, held, self.lease, work).await {
                Ok(ran) => ran,
                Err(e) => return store_error(&e),
            };
            let mut done = match done {
                Ok(done) => done,
                Err(e) => {
                    tracing::warn!(target: "idemkv::http", error = %e, "exactly-once handler failed; nothing recorded, the request waits for a retried POST");
                    let _ = self.store.release(held.take()).await;
                    let mut r = problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "processing-failed",
                        "the request could not be processed now; nothing was recorded, POST again",
                    );
                    r.headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return r;
                }
            };
            let sends = !done.outgoing.is_empty();
            if sends {
                let refused = match (&self.publisher, outbox::check(&done.outgoing)) {
                    (None, _) => {
                        Some("the handler sent messages, but the endpoint has no publisher")
                    }
                    (Some(_), Err(why)) => Some(why),
                    (Some(_), Ok(())) => None,
                };
                if let Some(why) = refused {
                    tracing::error!(target: "idemkv::http", reason = why, "exactly-once result not recorded");
                    let _ = self.store.release(held.take()).await;
                    return problem(StatusCode::INTERNAL_SERVER_ERROR, "not-recorded", why);
                }
                // An outbox left by an earlier, since forgotten, result of this id: out first.
                if self.flush(id).await.is_err() {
                    let _ = self.store.release(held.take()).await;
                    return problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "messages-not-published",
                        "earlier messages of this id are not published yet; POST again",
                    );
                }
                let ttl = Duration::from_secs(24 * 3600);
                done.writes.push(
                    Write::put_if_absent(self.outbox_key(id), outbox::encode(0, &done.outgoing))
                        .with_ttl(ttl),
                );
                done.writes
                    .extend(outbox::token_writes(id.as_bytes(), &done.outgoing, ttl));
            }
            let record = stored::encode(
                done.status,
                &done.headers,
                &done.body,
                usize::MAX,
                &*self.stored_headers,
            );
            match self
                .store
                .complete(held.lease(), &record, None, &done.writes)
                .await
            {
                Ok(_) => {
                    drop(held.take());
                    if sends {
                        let _ = self.flush(id).await;
                    }
                    let mut r = Response::new(B::from(done.body));
                    *r.status_mut() = done.status;
                    *r.headers_mut() = done.headers;
                    return r;
                }
                // The state the handler read changed meanwhile: run it again on fresh state.
                Err(Error::BatchConflict { .. }) if runs < RETRIES => {}
                // Still conflicting after RETRIES runs (409 contention), or another failure.
                Err(e) => {
                    let _ = self.store.release(held.take()).await;
                    return store_error(&e);
                }
            }
        }
    }
}
