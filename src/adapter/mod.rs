//! What the adapters (HTTP, Kafka) share, so that each protocol is implemented once: the lease
//! runner ([`lease`]), the stored-reply codec ([`reply`]) and the outbox ([`outbox`]).
//!
//! Invariant: no adapter renews, releases or encodes a recorded reply by itself; each calls
//! these.

pub(crate) mod lease;
pub(crate) mod outbox;
pub(crate) mod reply;

/// Runs a future that never waits (the in-memory store's async face, the models' publishers)
/// to its end in one poll: the loom models call the adapters' async code from loom threads.
#[cfg(all(test, loom))]
pub(crate) fn ready<F: std::future::Future>(f: F) -> F::Output {
    let f = std::pin::pin!(f);
    match f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("a model's future waited"),
    }
}
