//! The write-ahead log: every state change is appended as a record (see [`format`]) before
//! it is applied in memory; one writer thread batches the records of all callers into one
//! write and one `fdatasync` (group commit).
//!
//! Write path:
//! 1. The operation, under its shard lock, decides the change and reserves the limits.
//! 2. It encodes the change as a record into the shared buffer (taking a sequence number) —
//!    refused if the log is poisoned — and applies the change in memory; then unlocks.
//! 3. The writer thread takes the whole buffer, prefixes a batch header, writes it at the end
//!    of the current segment (`pwrite`), and calls `fdatasync` on the segment (**fsync 1**).
//!    A new segment is preallocated, its header written and synced (**fsync 2**), and the
//!    directory synced (**fsync 3**) before any batch goes into it.
//! 4. It publishes the highest durable sequence number and wakes the callers waiting for it.
//! 5. With `Durability::Immediate` a caller returns only once its shard's last record is
//!    durable; with `Batched` it returns at step 2 and step 3 happens within `max_delay`.

pub(crate) mod format;
pub(crate) mod recovery;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::error::Error;
use format::{BATCH_HEADER_LEN, Op, RecordWriter, SEGMENT_HEADER_LEN};

/// What survives a crash of the process or a power cut, per store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// An operation returns once the log record of its change — and of every change it could
    /// have observed — is on disk (`fdatasync`). A power cut loses nothing acknowledged.
    /// Concurrent callers share one `fdatasync` (group commit).
    Immediate,
    /// An operation returns at once; its record is written and synced within `max_delay`
    /// (like Redis' `appendfsync everysec`). A crash of the process loses nothing once the
    /// record is written (the page cache survives it); a power cut can lose the last
    /// `max_delay` of acknowledged changes, never a torn one.
    Batched {
        /// Longest time between a change and its `fdatasync`.
        max_delay: Duration,
    },
    /// Memory only: a restart loses everything. (The store is not opened on a directory.)
    None,
}

/// A `Batched` writer writes early once this many bytes are waiting.
const BATCH_LIMIT: usize = 1 << 20;

/// Default size of a new log segment, preallocated (a larger batch gets a segment of its own).
pub(crate) const SEGMENT_SIZE: u64 = 64 << 20;

struct State {
    /// Records waiting for the writer, after `BATCH_HEADER_LEN` bytes reserved for the header.
    buf: Vec<u8>,
    count: u32,
    first_seq: u64,
    next_seq: u64,
    shutdown: bool,
    /// Someone waits for durability: sync now, even in `Batched` mode.
    urgent: bool,
}

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
    poisoned: OnceLock<String>,
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

pub(crate) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.wal"))
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates a preallocated segment whose first record will be `first_seq`, synced, with its
/// directory entry synced.
fn create_segment(dir: &Path, first_seq: u64, size: u64) -> io::Result<File> {
    let path = segment_path(dir, first_seq);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    preallocate(&file, size)?;
    file.write_all_at(&format::segment_header(first_seq), 0)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(file)
}

#[cfg(target_os = "linux")]
fn preallocate(file: &File, size: u64) -> io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        // Filesystems without fallocate: a sparse file still reads as zeros.
        Err(_) => file.set_len(size),
    }
}

#[cfg(not(target_os = "linux"))]
fn preallocate(file: &File, size: u64) -> io::Result<()> {
    file.set_len(size)
}

/// Simulated disk faults, for tests of the write path (see [`LogFaults`]).
#[derive(Debug, Default)]
struct FaultState {
    syncs: u64,
    /// Bytes each write since the last sync overwrote: (file, offset, old bytes).
    undo: Vec<(usize, u64, Vec<u8>)>,
}

/// Faults to inject into a store's log, for crash-consistency tests at the file boundary:
/// the log's `N`th data sync does not happen; instead the "disk" loses everything written since
/// the previous sync (as a power cut would), keeping the first `torn_bytes` bytes of the last
/// write, and the write fails, so the store is poisoned. Reopening the directory then shows what
/// a machine would find after the power cut.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogFaults {
    /// Which data sync (1-based) fails.
    pub power_cut_at_sync: u64,
    /// How much of the last unsynced write survives (a torn write).
    pub torn_bytes: usize,
}

/// The writer thread's view of the segment it appends to.
struct Tail {
    dir: PathBuf,
    file: Option<File>,
    offset: u64,
    size: u64,
    segment_size: u64,
    faults: Option<(LogFaults, FaultState)>,
}

impl Tail {
    fn append(&mut self, batch: &[u8], first_seq: u64) -> io::Result<()> {
        let need = batch.len() as u64;
        if self.file.is_none() || self.offset + need > self.size {
            let size = self.segment_size.max(SEGMENT_HEADER_LEN as u64 + need);
            self.file = Some(create_segment(&self.dir, first_seq, size)?);
            self.offset = SEGMENT_HEADER_LEN as u64;
            self.size = size;
        }
        let Some(file) = &self.file else {
            return Err(io::Error::other("no log segment"));
        };
        if let Some((_, state)) = &mut self.faults {
            let mut old = vec![0u8; batch.len()];
            file.read_exact_at(&mut old, self.offset)?;
            state.undo.push((0, self.offset, old));
        }
        file.write_all_at(batch, self.offset)?;
        self.sync()?;
        self.offset += need;
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Err(io::Error::other("no log segment"));
        };
        let Some((faults, state)) = &mut self.faults else {
            return file.sync_data();
        };
        state.syncs += 1;
        if state.syncs < faults.power_cut_at_sync {
            state.undo.clear();
            return file.sync_data();
        }
        // The power cut: unsynced writes are lost, the last one possibly torn.
        let last = state.undo.len().saturating_sub(1);
        for (i, (_, offset, old)) in state.undo.iter().enumerate().rev() {
            let keep = if i == last {
                faults.torn_bytes.min(old.len())
            } else {
                0
            };
            file.write_all_at(&old[keep..], offset + keep as u64)?;
        }
        file.sync_all()?;
        Err(io::Error::other("injected power cut"))
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
        faults: Option<LogFaults>,
    ) -> io::Result<Wal> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buf: vec![0; BATCH_HEADER_LEN],
                count: 0,
                first_seq: next_seq,
                next_seq,
                shutdown: false,
                urgent: false,
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
            file: None,
            offset: 0,
            size: 0,
            segment_size,
            faults: faults.map(|f| (f, FaultState::default())),
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
        self.shared.poisoned.get().map(|reason| Error::Poisoned {
            reason: reason.clone(),
        })
    }

    /// Fails if the log can no longer be written.
    pub(crate) fn check(&self) -> Result<(), Error> {
        self.poisoned_error().map_or(Ok(()), Err)
    }

    /// Appends one record; returns its sequence number. Called under the shard lock of every
    /// key the record touches, so records of one key are in the log in the order of changes.
    pub(crate) fn append(
        &self,
        op: Op,
        items: impl FnOnce(&mut RecordWriter<'_>),
    ) -> Result<u64, Error> {
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
        drop(st);
        // The writer only needs waking when there is a first record to write, or the batch is
        // full; a wake-up per record would cost a syscall each while it waits out a delay.
        if was_empty || full {
            self.shared.work.notify_one();
        }
        Ok(seq)
    }

    /// The last sequence number handed out.
    pub(crate) fn appended(&self) -> u64 {
        self.shared.state.lock().next_seq - 1
    }

    /// Bytes written to the log since the store was opened.
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
        if self.mode != Durability::Immediate {
            self.shared.state.lock().urgent = true;
            self.shared.work.notify_one();
        }
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
            while st.count == 0 && !st.shutdown {
                shared.work.wait(&mut st);
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
            out
        };
        let header = format::batch_header(first_seq, count, &batch[BATCH_HEADER_LEN..]);
        batch[..BATCH_HEADER_LEN].copy_from_slice(&header);
        let last = first_seq + u64::from(count) - 1;
        match tail.append(&batch, first_seq) {
            Ok(()) => {
                shared
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                shared.durable.store(last, Ordering::Release);
            }
            Err(e) => {
                // fsync errors are not retryable: the page cache may have dropped the pages.
                let _ = shared
                    .poisoned
                    .set(format!("writing or syncing the log failed: {e}"));
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
