//! What the example services share: the `--durability` flag and the wait for Ctrl-C or
//! SIGTERM. Included by each example with `#[path = "support/common.rs"] mod common;`.

use std::time::Duration;

use idemkv::Durability;

/// `--durability immediate|batched|none`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DurabilityArg {
    Immediate,
    Batched,
    None,
}

impl DurabilityArg {
    /// The store's setting: `batched` syncs within 10 ms.
    pub fn durability(self) -> Durability {
        match self {
            DurabilityArg::Immediate => Durability::Immediate,
            DurabilityArg::Batched => Durability::Batched {
                max_delay: Duration::from_millis(10),
            },
            DurabilityArg::None => Durability::None,
        }
    }
}

/// Returns at Ctrl-C or SIGTERM, saying so.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    println!("shutting down");
}
