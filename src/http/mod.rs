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

/// A body's data as one buffer, as `http_body_util`'s `collect().await?.to_bytes()` gives it
/// (trailers are dropped), without `Collected`'s queue of frames for the usual body of one data
/// frame (a small request, a handler's `String` or `Bytes`): that frame is handed over as it
/// is. Later frames, if any, are appended to one growing buffer.
pub(crate) async fn body_bytes<B: http_body::Body>(body: B) -> Result<bytes::Bytes, B::Error> {
    use bytes::{Buf as _, BufMut as _};
    use http_body_util::BodyExt as _;
    let mut body = std::pin::pin!(body);
    let mut first: Option<bytes::Bytes> = None;
    let mut more: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(mut data) = frame?.into_data() else {
            continue;
        };
        if !data.has_remaining() {
            continue;
        }
        match &first {
            None => first = Some(data.copy_to_bytes(data.remaining())),
            Some(head) => {
                if more.is_empty() {
                    more.extend_from_slice(head);
                }
                more.put(data);
            }
        }
    }
    Ok(if more.is_empty() {
        first.unwrap_or_default()
    } else {
        more.into()
    })
}

#[cfg(test)]
mod tests {
    use super::body_bytes;
    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    type Frames = std::collections::VecDeque<Result<http_body::Frame<Bytes>, std::io::Error>>;

    /// A body that yields the given frames, one a poll.
    struct Framed(Frames);
    impl http_body::Body for Framed {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            std::task::Poll::Ready(self.0.pop_front())
        }
    }

    /// A body of the given data frames, then trailers if asked.
    fn framed(chunks: &[&'static [u8]], trailers: bool) -> Framed {
        let mut frames: Frames = chunks
            .iter()
            .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c))))
            .collect();
        if trailers {
            let mut t = http::HeaderMap::new();
            t.insert("x-sum", http::HeaderValue::from_static("1"));
            frames.push_back(Ok(http_body::Frame::trailers(t)));
        }
        Framed(frames)
    }

    #[test]
    fn gives_what_collect_gives() {
        let cases: &[&[&[u8]]] = &[
            &[],
            &[b""],
            &[b"one frame"],
            &[b"", b"after an empty frame"],
            &[b"two ", b"frames"],
            &[b"a", b"", b"b", b"cdef", b""],
        ];
        for chunks in cases {
            for trailers in [false, true] {
                let ours = block(body_bytes(framed(chunks, trailers))).expect("body");
                let theirs = block(framed(chunks, trailers).collect())
                    .expect("body")
                    .to_bytes();
                assert_eq!(ours, theirs, "{chunks:?}, trailers {trailers}");
            }
        }
    }

    #[test]
    fn one_frame_is_handed_over_without_a_copy() {
        let data = Bytes::from(vec![7u8; 64]);
        let ours = block(body_bytes(Full::new(data.clone()))).expect("body");
        assert_eq!(ours.as_ptr(), data.as_ptr());
    }

    #[test]
    fn an_error_is_passed_on() {
        let frames: Frames = [
            Ok(http_body::Frame::data(Bytes::from_static(b"part"))),
            Err(std::io::Error::other("reset")),
        ]
        .into();
        let got = block(body_bytes(Framed(frames)));
        assert_eq!(got.expect_err("an error").to_string(), "reset");
    }
}
