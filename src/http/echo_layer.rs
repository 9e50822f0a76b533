//! The echo layer: `X-Request-Id` on a request is echoed on its response, and each
//! `X-Echo-Set-Header: Name: value` (repeatable; `X-Reply-Set-Header` is a synonym) becomes the
//! header `Name: value` on the response — replacing one the handler set. Refused names (framing,
//! hop-by-hop, security-sensitive: see [`crate::echo`]) and malformed values are answered with
//! 400 and problem+json, and the handler does not run.
//!
//! Invariant: the handler never runs for a request whose echo headers are refused.
//!
//! Placed outside [`IdempotencyLayer`](super::IdempotencyLayer), replays carry the headers the
//! *current* request asked for.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use super::problem::problem;

/// Adds [`Echo`] to a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct EchoLayer {
    _private: (),
}

impl EchoLayer {
    /// The layer.
    pub fn new() -> Self {
        EchoLayer::default()
    }
}

impl<S> Layer<S> for EchoLayer {
    type Service = Echo<S>;
    fn layer(&self, inner: S) -> Echo<S> {
        Echo { inner }
    }
}

/// The service made by [`EchoLayer`].
#[derive(Clone, Debug)]
pub struct Echo<S> {
    inner: S,
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
fn requested<B>(req: &Request<B>) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut out = Vec::new();
    if let Some(id) = req.headers().get(REQUEST_ID) {
        out.push((HeaderName::from_static(REQUEST_ID), id.clone()));
    }
    for name in ["x-echo-set-header", "x-reply-set-header"] {
        for raw in req.headers().get_all(name) {
            let (n, v) = crate::echo::parse(raw.as_bytes()).map_err(|e| format!("{name}: {e}"))?;
            let n = HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("{name}: {e}"))?;
            let v = HeaderValue::from_str(&v).map_err(|e| format!("{name}: {e}"))?;
            out.push((n, v));
        }
    }
    Ok(out)
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
        let echo = match requested(&req) {
            Ok(h) => h,
            Err(why) => {
                let res = problem(StatusCode::BAD_REQUEST, "invalid-echo-header", &why);
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
