//! HTTP adapter (feature `http`, on by default): tower layers, so they work with axum, hyper
//! and tonic alike.
//!
//! Invariant: no handler runs without a lease, and every store error is answered through the
//! one mapping in `problem.rs`.
//!
//! - [`IdempotencyLayer`]: the `Idempotency-Key` header (IETF httpapi draft, Stripe's
//!   behaviour): the first request runs, repeats get the stored response with
//!   `Idempotent-Replayed: true`, a repeat while the first runs gets 409 (or waits, with
//!   `Prefer: wait=N`), the same key with another payload gets 422.
//! - [`EchoLayer`]: `X-Request-Id` echoed, `X-Echo-Set-Header: Name: value` set on the response.
//! - [`ExactlyOnce`]: the PUT / POST / GET / DELETE exactly-once protocol on one URL.
//!
//! Put the echo layer outside the idempotency layer, so replays carry the headers the
//! *current* request asked for:
//!
//! ```
//! use idemkv::http::{EchoLayer, IdempotencyLayer};
//! use idemkv::Store;
//! use tower::ServiceBuilder;
//! # use http::{Request, Response};
//! # use http_body_util::Full;
//! # use bytes::Bytes;
//!
//! let store = Store::in_memory();
//! let svc = ServiceBuilder::new()
//!     .layer(EchoLayer::new())
//!     .layer(IdempotencyLayer::new(store))
//!     .service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("created"))))
//!     });
//! # drop(svc);
//! ```

mod echo_layer;
mod exactly_once;
pub(crate) mod idempotency;
mod problem;
pub(crate) mod request_key;
pub(crate) mod stored;

pub use crate::echo::EchoPolicy;
pub use echo_layer::{Echo, EchoLayer};
pub use exactly_once::{ExactlyOnce, ExactlyOnceHandler, Processed, StoredRequest};
pub use idempotency::{CompleteWith, Idempotency, IdempotencyInfo, IdempotencyLayer};
pub use stored::{DefaultStoredHeaders, StoredHeaders};

/// Errors of bodies, as tower-http boxes them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
