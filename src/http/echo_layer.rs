//! The echo layer: `X-Request-Id` on a request is echoed on its response, and each
//! `X-Echo-Set-Header: Name: value` (repeatable; `X-Reply-Set-Header` is a synonym) becomes the
//! header `Name: value` on the response — replacing one the handler set. Which names may be
//! echoed is an [`EchoPolicy`] (default: custom names only, every IANA-registered field name
//! refused; see [`crate::echo`]). A refused name or a malformed value is answered with 400, more
//! echo headers than the policy's bounds (16, 4 KiB) with 431, both problem+json, and the
//! handler does not run.
//!
//! Invariant: the handler never runs for a request whose echo headers are refused.
//!
//! Placed outside [`IdempotencyLayer`](super::IdempotencyLayer), replays carry the headers the
//! *current* request asked for.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use super::problem::problem;
use crate::echo::{EchoError, EchoPolicy};

/// Adds [`Echo`] to a service.
#[derive(Clone, Debug, Default)]
pub struct EchoLayer {
    policy: Arc<EchoPolicy>,
}

impl EchoLayer {
    /// The layer, with the default [`EchoPolicy`].
    pub fn new() -> Self {
        EchoLayer::default()
    }

    /// The layer with this policy (for example [`EchoPolicy::allow_only`]).
    pub fn policy(policy: EchoPolicy) -> Self {
        EchoLayer {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for EchoLayer {
    type Service = Echo<S>;
    fn layer(&self, inner: S) -> Echo<S> {
        Echo {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

/// The service made by [`EchoLayer`].
#[derive(Clone, Debug)]
pub struct Echo<S> {
    inner: S,
    policy: Arc<EchoPolicy>,
}

impl<S> Echo<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

const REQUEST_ID: &str = "x-request-id";

/// The headers a request asks to have echoed, or why it may not.
fn requested<B>(
    policy: &EchoPolicy,
    req: &Request<B>,
) -> Result<Vec<(HeaderName, HeaderValue)>, EchoError> {
    let mut out = Vec::new();
    if let Some(id) = req.headers().get(REQUEST_ID) {
        out.push((HeaderName::from_static(REQUEST_ID), id.clone()));
    }
    let raws = ["x-echo-set-header", "x-reply-set-header"]
        .into_iter()
        .flat_map(|name| req.headers().get_all(name))
        .map(HeaderValue::as_bytes);
    for (n, v) in policy.parse_all(raws)? {
        // `parse` checked both: a token name, a visible-ASCII value.
        let n = HeaderName::from_bytes(n.as_bytes()).map_err(|_| EchoError::BadName(n))?;
        let v = HeaderValue::from_str(&v).map_err(|_| EchoError::BadValue(n.to_string()))?;
        out.push((n, v));
    }
    Ok(out)
}

/// The refusal of a request's echo headers: 431 for too many or too large, else 400.
fn refusal<B: From<Bytes>>(e: &EchoError) -> Response<B> {
    let why = format!("x-echo-set-header: {e}");
    if e.is_too_large() {
        problem(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "echo-headers-too-large",
            &why,
        )
    } else {
        problem(StatusCode::BAD_REQUEST, "invalid-echo-header", &why)
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Echo<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Future: Send + 'static,
    ResB: From<Bytes> + Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let echo = match requested(&self.policy, &req) {
            Ok(h) => h,
            Err(e) => {
                let res = refusal(&e);
                return Box::pin(async move { Ok(res) });
            }
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut res = fut.await?;
            let headers = res.headers_mut();
            // Names asked for more than once get every value, in order.
            let mut seen = Vec::new();
            for (n, v) in echo {
                if seen.contains(&n) {
                    headers.append(n, v);
                } else {
                    headers.insert(n.clone(), v);
                    seen.push(n);
                }
            }
            Ok(res)
        })
    }
}
