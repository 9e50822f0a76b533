//! Log storages that fail on purpose, for crash tests at the file boundary (after redb's
//! `StorageBackend` approach). Both wrap the operating system's files, so what they let through
//! is really on disk, and reopening the directory with the default storage shows what a machine
//! would find after the crash.
//!
//! - [`CrashAfter`]: the process dies right after the Nth call of one kind (a segment created,
//!   preallocated, its header written or synced, the directory synced, a file removed): that
//!   call succeeds, every later call fails, nothing more reaches the files.
//! - [`PowerCut`]: the Nth sync does not happen; the disk loses every write since the previous
//!   sync of that file, keeping the first `torn_bytes` bytes of the last one (a torn write).
//!   It can also hold every sync back ([`PowerCut::hold`]) until released, or cut the power at
//!   the sync being held ([`PowerCut::cut_now`]): a test then decides what was durable when.
//!
//! Used by `tests/crash_points.rs`, `tests/crash_consistency.rs` and `fuzz/`'s `ops_crash`.

#![allow(dead_code)]

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use idemkv::storage::{LogFile, LogStorage, OsFile, OsStorage};

/// A call at the file boundary that a crash can follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// A segment file created (empty).
    Create,
    /// A segment preallocated (zeros, no header).
    Allocate,
    /// A segment's header written (at offset 0), not yet synced.
    HeaderWrite,
    /// A segment's header synced (`sync_all`).
    HeaderSync,
    /// The log directory synced (after a creation or removals).
    DirSync,
    /// A batch written, not yet synced.
    BatchWrite,
    /// A batch synced (`sync_data`).
    BatchSync,
    /// A segment file removed (a checkpoint deleting covered segments, or recovery).
    Remove,
}

fn crashed() -> io::Error {
    io::Error::other("injected crash: the process is gone")
}

#[derive(Debug)]
struct CrashState {
    point: Point,
    nth: u64,
    seen: AtomicU64,
    dead: AtomicBool,
}

impl CrashState {
    /// Before a call: fails if the process has already "died".
    fn alive(&self) -> io::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            Err(crashed())
        } else {
            Ok(())
        }
    }

    /// After a call of kind `p` succeeded: the process "dies" if this was the chosen one.
    fn after(&self, p: Point) {
        if p == self.point && self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.nth {
            self.dead.store(true, Ordering::SeqCst);
        }
    }
}

/// The process dies right after the `nth` (1-based) call of kind `point` succeeds.
#[derive(Clone, Debug)]
pub struct CrashAfter(Arc<CrashState>);

impl CrashAfter {
    pub fn new(point: Point, nth: u64) -> Self {
        CrashAfter(Arc::new(CrashState {
            point,
            nth,
            seen: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        }))
    }

    /// Whether the crash happened.
    pub fn crashed(&self) -> bool {
        self.0.dead.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct CrashFile {
    file: OsFile,
    state: Arc<CrashState>,
}

impl LogStorage for CrashAfter {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn LogFile>> {
        self.0.alive()?;
        let file = OsStorage::create(path)?;
        self.0.after(Point::Create);
        Ok(Box::new(CrashFile {
            file,
            state: Arc::clone(&self.0),
        }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.0.alive()?;
        OsStorage.remove(path)?;
        self.0.after(Point::Remove);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.0.alive()?;
        OsStorage.sync_dir(dir)?;
        self.0.after(Point::DirSync);
        Ok(())
    }
}

impl LogFile for CrashFile {
    fn allocate(&mut self, len: u64) -> io::Result<()> {
        self.state.alive()?;
        self.file.allocate(len)?;
        self.state.after(Point::Allocate);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.state.alive()?;
        self.file.write_at(offset, buf)?;
        self.state.after(if offset == 0 {
            Point::HeaderWrite
        } else {
            Point::BatchWrite
        });
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.state.alive()?;
        self.file.sync_data()?;
        self.state.after(Point::BatchSync);
        Ok(())
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.state.alive()?;
        self.file.sync_all()?;
        self.state.after(Point::HeaderSync);
        Ok(())
    }
}

#[derive(Debug)]
struct CutState {
    at_sync: u64,
    torn_bytes: usize,
    syncs: AtomicU64,
    dead: AtomicBool,
    /// While true, a sync waits (until released or cut).
    held: Mutex<bool>,
    moved: std::sync::Condvar,
    /// The next sync (or the one held now) is the power cut.
    cut: AtomicBool,
    /// Syncs waiting in `hold` now.
    waiting: AtomicU64,
}

/// The `at_sync`th (1-based) sync of any log file is a power cut: see the module docs.
#[derive(Clone, Debug)]
pub struct PowerCut(Arc<CutState>);

impl PowerCut {
    pub fn new(at_sync: u64, torn_bytes: usize) -> Self {
        PowerCut(Arc::new(CutState {
            at_sync,
            torn_bytes,
            syncs: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            held: Mutex::new(false),
            moved: std::sync::Condvar::new(),
            cut: AtomicBool::new(false),
            waiting: AtomicU64::new(0),
        }))
    }

    /// No scheduled cut: only [`hold`](Self::hold) and [`cut_now`](Self::cut_now) act.
    pub fn manual() -> Self {
        Self::new(u64::MAX, 0)
    }

    /// From now on every sync waits until [`release`](Self::release) or [`cut_now`](Self::cut_now).
    pub fn hold(&self) {
        *self.0.held.lock().expect("hold lock") = true;
    }

    /// Lets the held syncs (and later ones) through.
    pub fn release(&self) {
        *self.0.held.lock().expect("hold lock") = false;
        self.0.moved.notify_all();
    }

    /// The power goes at the sync held now, or the next one: nothing written since each file's
    /// last sync survives.
    pub fn cut_now(&self) {
        self.0.cut.store(true, Ordering::SeqCst);
        self.release();
    }

    /// Waits (up to 10 s) until a sync is held, that is, the log is waiting for the disk;
    /// false if none came.
    pub fn wait_for_held_sync(&self) -> bool {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.0.waiting.load(Ordering::SeqCst) == 0 {
            if std::time::Instant::now() > until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// Whether the power cut happened.
    pub fn happened(&self) -> bool {
        self.0.dead.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct CutFile {
    file: OsFile,
    state: Arc<CutState>,
    /// What each write since the last sync overwrote: (offset, old bytes).
    undo: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl CutState {
    fn alive(&self) -> io::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            Err(io::Error::other("injected power cut: the machine is off"))
        } else {
            Ok(())
        }
    }
}

impl LogStorage for PowerCut {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn LogFile>> {
        self.0.alive()?;
        Ok(Box::new(CutFile {
            file: OsStorage::create(path)?,
            state: Arc::clone(&self.0),
            undo: Mutex::new(Vec::new()),
        }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.0.alive()?;
        OsStorage.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.0.alive()?;
        OsStorage.sync_dir(dir)
    }
}

impl CutFile {
    fn sync(&mut self, data_only: bool) -> io::Result<()> {
        self.state.alive()?;
        {
            let mut held = self.state.held.lock().expect("hold lock");
            self.state.waiting.fetch_add(1, Ordering::SeqCst);
            while *held {
                held = self.state.moved.wait(held).expect("hold lock");
            }
            self.state.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        let n = self.state.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        let mut undo = self.undo.lock().expect("undo lock");
        if n < self.state.at_sync && !self.state.cut.load(Ordering::SeqCst) {
            undo.clear();
            return if data_only {
                self.file.sync_data()
            } else {
                self.file.sync_all()
            };
        }
        // The power cut: unsynced writes are lost, the last one possibly torn.
        self.state.dead.store(true, Ordering::SeqCst);
        let last = undo.len().saturating_sub(1);
        for (i, (offset, old)) in undo.iter().enumerate().rev() {
            let keep = if i == last {
                self.state.torn_bytes.min(old.len())
            } else {
                0
            };
            self.file
                .file()
                .write_all_at(&old[keep..], offset + keep as u64)?;
        }
        undo.clear();
        self.file.file().sync_all()?;
        Err(io::Error::other("injected power cut"))
    }
}

impl LogFile for CutFile {
    fn allocate(&mut self, len: u64) -> io::Result<()> {
        self.state.alive()?;
        self.file.allocate(len)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.state.alive()?;
        let mut old = vec![0u8; buf.len()];
        let f = self.file.file();
        let len = f.metadata()?.len();
        // Past the end reads as zeros (the file is preallocated, so this is rare).
        let have = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        if have > 0 {
            f.read_exact_at(&mut old[..have], offset)?;
        }
        self.undo.lock().expect("undo lock").push((offset, old));
        self.file.write_at(offset, buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.sync(true)
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.sync(false)
    }
}
