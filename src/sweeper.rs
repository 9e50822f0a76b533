//! The background sweeper: every interval, visits the shards one at a time and drops expired
//! records. It holds one shard lock at a time (and skips shards with nothing due), so callers
//! never wait behind a whole-store scan. It holds only a weak reference to the store: dropping
//! the last `Store` stops and joins it.

use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::store::Inner;
use crate::sync::Arc;

#[derive(Debug)]
pub(crate) struct Handle {
    stop: std::sync::Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[cfg(not(loom))]
pub(crate) fn start(inner: &Arc<Inner>, every: Duration) -> Option<Handle> {
    let weak = Arc::downgrade(inner);
    let stop = std::sync::Arc::new((Mutex::new(false), Condvar::new()));
    let stop2 = std::sync::Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("idemkv-sweeper".into())
        .spawn(move || {
            let (flag, cv) = &*stop2;
            loop {
                {
                    let Ok(guard) = flag.lock() else { return };
                    let Ok((guard, _)) = cv.wait_timeout_while(guard, every, |stop| !*stop) else {
                        return;
                    };
                    if *guard {
                        return;
                    }
                }
                let Some(inner) = weak.upgrade() else { return };
                for i in 0..inner.shard_count() {
                    inner.sweep_shard(i);
                }
                inner.maybe_checkpoint();
            }
        })
        .ok()?;
    Some(Handle {
        stop,
        thread: Some(thread),
    })
}

/// Under loom the sweeper is not started: loom cannot model a free-running std thread.
#[cfg(loom)]
pub(crate) fn start(_inner: &Arc<Inner>, _every: Duration) -> Option<Handle> {
    None
}

impl Drop for Handle {
    fn drop(&mut self) {
        let (flag, cv) = &*self.stop;
        if let Ok(mut stop) = flag.lock() {
            *stop = true;
        }
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
