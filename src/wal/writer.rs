//! The log writer: callers append records to a shared buffer under their shard locks; a round
//! takes the whole buffer, writes it as one batch and syncs it once (group commit), then
//! publishes the highest durable sequence number and wakes whoever waits for it.
//!
//! Rounds are run by the writer thread, and by a blocking waiter itself: a thread that waits
//! for its record and finds no round running runs one (the leader), so a lone caller's wait
//! is its own write and `fdatasync`, with no hand-over to the writer thread and back. Async
//! waiters never run a round (a sync must not block an executor thread): the writer thread
//! runs it for them.
//!
//! Invariants:
//! - `durable` only ever names a sequence number whose batch was written and synced; after any
//!   write or sync error the log is poisoned and `durable` never moves again (fsync errors are
//!   not retryable: the page cache may have dropped the pages).
//! - One round at a time (the `tail` lock), and a round takes the buffer while holding it: so
//!   batches reach the disk in sequence order.
//! - Whoever ran a round wakes the waiters after releasing `tail`, under `sync_mx`: a blocking
//!   waiter that found `tail` held checked so under `sync_mx`, so it is waiting by then.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// The segment being appended to; held for a whole round (see the module's invariants).
    tail: Mutex<Tail>,
    work: Condvar,
    durable: AtomicU64,
    /// Bytes written to the log since the store was opened.
    written: AtomicU64,
    /// Blocking waiters sleep on one condition variable: the writer wakes them all with one
    /// call per batch (a wake-up per waiter would cost the writer a syscall each).
    sync_mx: Mutex<()>,
    sync_cv: Condvar,
    /// Threads blocked in [`Wal::wait`]: one alone may lead a round.
    blocking_waiters: AtomicUsize,
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

/// The segment the log appends to, and the buffer the next round leaves in `State::buf`.
struct Tail {
    dir: PathBuf,
    storage: Arc<dyn LogStorage>,
    file: Option<Box<dyn LogFile>>,
    offset: u64,
    size: u64,
    segment_size: u64,
    spare: Vec<u8>,
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
            tail: Mutex::new(Tail {
                dir: dir.to_path_buf(),
                storage,
                file: None,
                offset: 0,
                size: 0,
                segment_size,
                spare: Vec::new(),
            }),
            work: Condvar::new(),
            durable: AtomicU64::new(next_seq.saturating_sub(1)),
            written: AtomicU64::new(0),
            sync_mx: Mutex::new(()),
            sync_cv: Condvar::new(),
            blocking_waiters: AtomicUsize::new(0),
            async_waiters: Mutex::new(Vec::new()),
            poisoned: OnceLock::new(),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("idemkv-wal".into())
            .spawn(move || writer(&s, mode))?;
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

    /// Blocks until `seq` is durable. A lone waiter with no round running runs one itself (it
    /// leads); otherwise the writer thread's back-to-back rounds serve everyone (a leader per
    /// round would leave a wake-up's gap between rounds), and this waits for them.
    pub(crate) fn wait(&self, seq: u64) -> Result<(), Error> {
        let shared = &*self.shared;
        if self.durable(seq)? {
            return Ok(());
        }
        shared.blocking_waiters.fetch_add(1, Ordering::AcqRel);
        let waiting = Waiting(&shared.blocking_waiters);
        let mut hurried = false;
        loop {
            if self.durable(seq)? {
                return Ok(());
            }
            let mut g = shared.sync_mx.lock();
            if self.durable(seq)? {
                return Ok(());
            }
            let alone = waiting.0.load(Ordering::Acquire) == 1;
            if !alone && !hurried {
                drop(g);
                self.hurry();
                hurried = true;
                continue;
            }
            if let Some(mut tail) = shared.tail.try_lock().filter(|_| alone) {
                drop(g);
                let wrote = round(shared, &mut tail);
                drop(tail);
                wake(shared);
                if wrote.is_some() {
                    continue;
                }
                // Nothing to write and `seq` is not durable: it is not appended yet (or the
                // round that took it failed, which `durable` reports). Wait for the writer.
                self.hurry();
                hurried = true;
                g = shared.sync_mx.lock();
                if self.durable(seq)? {
                    return Ok(());
                }
            }
            // A round is running (or `seq` is not appended yet). Whoever runs it wakes us
            // under `sync_mx` after releasing `tail`, and we hold `sync_mx` from the look at
            // `tail` to the wait: no lost wake-up. The timeout is a second look, not a need.
            shared.sync_cv.wait_for(&mut g, Duration::from_secs(1));
        }
    }

    /// Waits, without blocking the thread, until `seq` is durable.
    pub(crate) fn wait_async(&self, seq: u64) -> Durable<'_> {
        if !matches!(self.durable(seq), Ok(true)) {
            self.hurry();
        }
        Durable { wal: self, seq }
    }
}

/// Counts a blocking waiter while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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

/// One round: takes everything appended so far, writes it as one batch, syncs, publishes
/// the highest durable sequence number. Called with `tail` locked. `None` when there was
/// nothing to write, or when the log is (or becomes) poisoned; else the batch's last sequence
/// number.
fn round(shared: &Shared, tail: &mut Tail) -> Option<u64> {
    if shared.poisoned.get().is_some() {
        return None;
    }
    let (mut batch, first_seq, count) = {
        let mut st = shared.state.lock();
        if st.count == 0 {
            return None;
        }
        let mut spare = std::mem::take(&mut tail.spare);
        spare.clear();
        spare.resize(BATCH_HEADER_LEN, 0);
        let batch = std::mem::replace(&mut st.buf, spare);
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
    let done = match tail.append(&batch, first_seq) {
        Ok(()) => {
            #[cfg(feature = "metrics")]
            crate::metrics::log_batch(started.elapsed(), count);
            shared
                .written
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            shared.durable.store(last, Ordering::Release);
            Some(last)
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
            None
        }
    };
    tail.spare = batch;
    done
}

/// Wakes the waiters a round made durable (all of them once the log is poisoned). Called by
/// whoever ran the round, after releasing `tail`, whether or not it wrote anything.
fn wake(shared: &Shared) {
    let durable = shared.durable.load(Ordering::Acquire);
    let poisoned = shared.poisoned.get().is_some();
    drop(shared.sync_mx.lock());
    shared.sync_cv.notify_all();
    let mut woken = Vec::new();
    shared.async_waiters.lock().retain(|(seq, w)| {
        if poisoned || *seq <= durable {
            woken.push(w.clone());
            false
        } else {
            true
        }
    });
    woken.into_iter().for_each(Waker::wake);
}

/// The writer thread: runs a round whenever there are records and nobody else runs one. Exits
/// on shutdown once the buffer is empty, or when poisoned.
fn writer(shared: &Shared, mode: Durability) {
    loop {
        {
            let mut st = shared.state.lock();
            while (st.count == 0 || st.lazy) && !st.shutdown {
                if st.count == 0 {
                    shared.work.wait(&mut st);
                } else if shared.work.wait_for(&mut st, LAZY_DELAY).timed_out() {
                    break;
                }
            }
            if st.count == 0 || shared.poisoned.get().is_some() {
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
        }
        // A blocking waiter may have run the round meanwhile; then this one finds less, or
        // nothing, to write.
        let mut tail = shared.tail.lock();
        round(shared, &mut tail);
        drop(tail);
        wake(shared);
        if shared.poisoned.get().is_some() {
            return;
        }
    }
}
