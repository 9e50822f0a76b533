//! The log writer: callers append records to a shared buffer under their shard locks; one
//! writer thread takes the whole buffer, writes it as one batch and syncs it once (group
//! commit), then publishes the highest durable sequence number and wakes whoever waits for it.
//!
//! Invariant: `durable` only ever names a sequence number whose batch was written and synced;
//! after any write or sync error the log is poisoned and `durable` never moves again (fsync
//! errors are not retryable: the page cache may have dropped the pages).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::Durability;
use super::format::{self, BATCH_HEADER_LEN, Op, RecordWriter, SEGMENT_HEADER_LEN};
use super::io::{LogFile, LogStorage};
use super::segments;
use crate::error::Error;

/// A `Batched` writer writes early once this many bytes are waiting.
const BATCH_LIMIT: usize = 1 << 20;

struct State {
    /// Records waiting for the writer, after `BATCH_HEADER_LEN` bytes reserved for the header.
    buf: Vec<u8>,
    count: u32,
    first_seq: u64,
    next_seq: u64,
    shutdown: bool,
    /// Someone waits for durability: sync now, even in `Batched` mode.
    urgent: bool,
    /// Every record in the buffer was appended lazily (`Immediate` mode): nobody waits for
    /// them, so the writer has not been woken; it syncs them at the next eager record, at a
    /// wait, or after `LAZY_DELAY`.
    lazy: bool,
}

/// Longest time a lazily appended record (a deferred lease) waits for company before the
/// writer syncs it alone.
const LAZY_DELAY: Duration = Duration::from_millis(10);

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    durable: AtomicU64,
    /// Bytes written to the log since the store was opened.
    written: AtomicU64,
    /// Blocking waiters sleep on one condition variable: the writer wakes them all with one
    /// call per batch (a wake-up per waiter would cost the writer a syscall each).
    sync_mx: Mutex<()>,
    sync_cv: Condvar,
    /// Async waiters: the sequence number each waits for, and its task's waker.
    async_waiters: Mutex<Vec<(u64, Waker)>>,
    poisoned: OnceLock<(String, crate::error::Cause)>,
}

/// The log of one open store.
pub(crate) struct Wal {
    shared: Arc<Shared>,
    mode: Durability,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("mode", &self.mode)
            .field("durable", &self.shared.durable.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The writer thread's view of the segment it appends to.
struct Tail {
    dir: PathBuf,
    storage: Arc<dyn LogStorage>,
    file: Option<Box<dyn LogFile>>,
    offset: u64,
    size: u64,
    segment_size: u64,
}

impl Tail {
    /// Writes one batch at the end of the current segment (a new one if it does not fit) and
    /// syncs it: the batch is durable when this returns `Ok`.
    fn append(&mut self, batch: &[u8], first_seq: u64) -> io::Result<()> {
        let need = batch.len() as u64;
        if self.file.is_none() || self.offset + need > self.size {
            let size = self.segment_size.max(SEGMENT_HEADER_LEN as u64 + need);
            // Dropped first: a failed creation leaves no half-used segment to append to.
            self.file = None;
            self.file = Some(segments::create(
                self.storage.as_ref(),
                &self.dir,
                first_seq,
                size,
            )?);
            self.offset = SEGMENT_HEADER_LEN as u64;
            self.size = size;
        }
        let Some(file) = &mut self.file else {
            return Err(io::Error::other("no log segment"));
        };
        file.write_at(self.offset, batch)?;
        file.sync_data()?;
        self.offset += need;
        Ok(())
    }
}

impl Wal {
    /// Starts the log in `dir` (which holds the segments); the next record gets `next_seq`.
    /// New records always go into a new segment: recovery has cut any torn tail off the old ones.
    pub(crate) fn start(
        dir: &Path,
        next_seq: u64,
        mode: Durability,
        segment_size: u64,
        storage: Arc<dyn LogStorage>,
    ) -> io::Result<Wal> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buf: vec![0; BATCH_HEADER_LEN],
                count: 0,
                first_seq: next_seq,
                next_seq,
                shutdown: false,
                urgent: false,
                lazy: false,
            }),
            work: Condvar::new(),
            durable: AtomicU64::new(next_seq.saturating_sub(1)),
            written: AtomicU64::new(0),
            sync_mx: Mutex::new(()),
            sync_cv: Condvar::new(),
            async_waiters: Mutex::new(Vec::new()),
            poisoned: OnceLock::new(),
        });
        let tail = Tail {
            dir: dir.to_path_buf(),
            storage,
            file: None,
            offset: 0,
            size: 0,
            segment_size,
        };
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("idemkv-wal".into())
            .spawn(move || writer(&s, tail, mode))?;
        Ok(Wal {
            shared,
            mode,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub(crate) fn mode(&self) -> Durability {
        self.mode
    }

    fn poisoned_error(&self) -> Option<Error> {
        self.shared
            .poisoned
            .get()
            .map(|(reason, source)| Error::Poisoned {
                reason: reason.clone(),
                source: source.clone(),
            })
    }

    /// Fails if the log can no longer be written.
    pub(crate) fn check(&self) -> Result<(), Error> {
        self.poisoned_error().map_or(Ok(()), Err)
    }

    /// Appends one record; returns its sequence number. Called under the shard lock of every
    /// key the record touches, so records of one key are in the log in the order of changes.
    /// `lazy`: nobody will wait for this record by itself (a
    /// deferred lease, whose holder's next durable change covers it), so in `Immediate` mode
    /// the writer is not woken for it: the next eager record, a wait, or `LAZY_DELAY` takes it
    /// to the disk, in the same batch as what follows it when that comes soon.
    pub(crate) fn append_with(
        &self,
        op: Op,
        lazy: bool,
        items: impl FnOnce(&mut RecordWriter<'_>),
    ) -> Result<u64, Error> {
        let lazy = lazy && self.mode == Durability::Immediate;
        let mut st = self.shared.state.lock();
        if let Some(e) = self.poisoned_error() {
            return Err(e);
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let was_empty = st.count == 0;
        if was_empty {
            st.first_seq = seq;
        }
        st.count += 1;
        let mut w = RecordWriter::new(&mut st.buf, seq, op);
        items(&mut w);
        w.finish();
        let full = st.buf.len() >= BATCH_LIMIT;
        // The writer only needs waking when there is a first record to write (it then waits
        // up to `LAZY_DELAY` if that record is lazy), a first eager one after lazy ones, or a
        // full batch; a wake-up per record would cost a syscall each while it waits.
        let wake = full || was_empty || (!lazy && st.lazy);
        if was_empty {
            st.lazy = lazy;
        } else if !lazy {
            st.lazy = false;
        }
        drop(st);
        if wake {
            self.shared.work.notify_one();
        }
        Ok(seq)
    }

    /// The last sequence number handed out.
    pub(crate) fn appended(&self) -> u64 {
        self.shared.state.lock().next_seq - 1
    }

    /// Bytes written to the log since the store was opened.
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned_error().is_some()
    }

    pub(crate) fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Whether `seq` is durable; `Err` if it never will be.
    fn durable(&self, seq: u64) -> Result<bool, Error> {
        if self.shared.durable.load(Ordering::Acquire) >= seq {
            return Ok(true);
        }
        self.check().map(|()| false)
    }

    /// Tells the writer not to wait for more records (a caller waits).
    fn hurry(&self) {
        let mut st = self.shared.state.lock();
        if self.mode != Durability::Immediate {
            st.urgent = true;
        } else if st.lazy {
            st.lazy = false;
        } else {
            return;
        }
        drop(st);
        self.shared.work.notify_one();
    }

    /// Blocks until `seq` is durable.
    pub(crate) fn wait(&self, seq: u64) -> Result<(), Error> {
        if self.durable(seq)? {
            return Ok(());
        }
        self.hurry();
        let mut g = self.shared.sync_mx.lock();
        // Checked under the lock the writer takes before waking: no lost wake-up.
        while !self.durable(seq)? {
            self.shared.sync_cv.wait_for(&mut g, Duration::from_secs(1));
        }
        Ok(())
    }

    /// Waits, without blocking the thread, until `seq` is durable.
    pub(crate) fn wait_async(&self, seq: u64) -> Durable<'_> {
        if !matches!(self.durable(seq), Ok(true)) {
            self.hurry();
        }
        Durable { wal: self, seq }
    }
}

/// Future of [`Wal::wait_async`].
pub(crate) struct Durable<'a> {
    wal: &'a Wal,
    seq: u64,
}

impl Future for Durable<'_> {
    type Output = Result<(), Error>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.wal.durable(self.seq) {
            Ok(true) => return Poll::Ready(Ok(())),
            Err(e) => return Poll::Ready(Err(e)),
            Ok(false) => {}
        }
        let mut w = self.wal.shared.async_waiters.lock();
        // Checked again under the lock the writer takes to wake: no lost wake-up.
        match self.wal.durable(self.seq) {
            Ok(true) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e)),
            Ok(false) => {
                w.push((self.seq, cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.work.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

/// The writer thread: takes everything appended since its last round, writes it as one batch,
/// syncs, publishes. Exits on shutdown once the buffer is empty, or when poisoned.
fn writer(shared: &Shared, mut tail: Tail, mode: Durability) {
    let mut spare: Vec<u8> = Vec::new();
    loop {
        let (mut batch, first_seq, count) = {
            let mut st = shared.state.lock();
            while (st.count == 0 || st.lazy) && !st.shutdown {
                if st.count == 0 {
                    shared.work.wait(&mut st);
                } else if shared.work.wait_for(&mut st, LAZY_DELAY).timed_out() {
                    break;
                }
            }
            if st.count == 0 {
                return;
            }
            if let Durability::Batched { max_delay } = mode {
                // Let more records join, up to the delay or 1 MiB.
                let until = Instant::now() + max_delay;
                while !st.shutdown && !st.urgent && st.buf.len() < BATCH_LIMIT {
                    if shared.work.wait_until(&mut st, until).timed_out() {
                        break;
                    }
                }
            }
            spare.clear();
            spare.resize(BATCH_HEADER_LEN, 0);
            let batch = std::mem::replace(&mut st.buf, std::mem::take(&mut spare));
            let out = (batch, st.first_seq, st.count);
            st.count = 0;
            st.urgent = false;
            st.lazy = false;
            out
        };
        let header = format::batch_header(first_seq, count, &batch[BATCH_HEADER_LEN..]);
        batch[..BATCH_HEADER_LEN].copy_from_slice(&header);
        let last = first_seq + u64::from(count) - 1;
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        match tail.append(&batch, first_seq) {
            Ok(()) => {
                #[cfg(feature = "metrics")]
                crate::metrics::log_batch(started.elapsed(), count);
                shared
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                shared.durable.store(last, Ordering::Release);
            }
            Err(e) => {
                // fsync errors are not retryable: the page cache may have dropped the pages.
                let reason = format!("writing or syncing the log failed: {e}");
                tracing::error!(
                    target: "idemkv::wal",
                    error = %e,
                    "the log is poisoned: no write is acknowledged until the store is reopened"
                );
                let _ = shared.poisoned.set((reason, crate::error::Cause::new(e)));
            }
        }
        let poisoned = shared.poisoned.get().is_some();
        drop(shared.sync_mx.lock());
        shared.sync_cv.notify_all();
        let mut woken = Vec::new();
        shared.async_waiters.lock().retain(|(seq, w)| {
            if poisoned || *seq <= last {
                woken.push(w.clone());
                false
            } else {
                true
            }
        });
        woken.into_iter().for_each(Waker::wake);
        if poisoned {
            return;
        }
        spare = batch;
    }
}
