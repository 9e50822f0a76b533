//! The file boundary of the log: every byte the log writer and the segment manager put on disk,
//! and every file they create or remove, goes through [`LogStorage`]. Production uses
//! [`OsStorage`]; crash tests and the fuzz targets wrap it to fail, tear writes or lose unsynced
//! data at a chosen call (as redb's `StorageBackend` does). Nothing here knows about faults.
//!
//! Invariant: the log calls `sync_data`/`sync_all` on a file before it reports anything written
//! to it as durable, and `sync_dir` after it creates or removes a file and before it relies on
//! that entry being (or no longer being) there.
//!
//! Reading back (recovery) maps the segment files read-only with the operating system directly:
//! a storage decides what reaches the files, and recovery reads whatever did.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where the log's files live: creating, removing and syncing them.
///
/// Implement it to inject faults (a power cut at the Nth sync, a crash after a chosen call);
/// see `tests/support/storage.rs` in the repository for two such implementations. Every method
/// may fail; a failure while writing poisons the store, a failure while removing old segments
/// fails that checkpoint.
pub trait LogStorage: Send + Sync + fmt::Debug + 'static {
    /// Creates a new, empty file at `path`, failing if one exists.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn LogFile>>;
    /// Removes the file at `path`.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the creations and removals of entries in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// One open log segment, written at explicit offsets.
pub trait LogFile: Send + fmt::Debug {
    /// Reserves `len` bytes on disk, reading as zeros (`fallocate`, else a sparse extension).
    fn allocate(&mut self, len: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes the written bytes durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Makes the written bytes and the file's metadata durable (`fsync`).
    fn sync_all(&mut self) -> io::Result<()>;
}

/// The operating system's files: what every store uses unless told otherwise.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsStorage;

/// A segment file of [`OsStorage`].
#[derive(Debug)]
pub struct OsFile(File);

impl OsFile {
    /// The underlying file (for storages that wrap this one and need to read back).
    pub fn file(&self) -> &File {
        &self.0
    }
}

impl LogStorage for OsStorage {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn LogFile>> {
        Ok(Box::new(OsStorage::create(path)?))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl OsStorage {
    /// [`LogStorage::create_new`] with the concrete type, for wrapping storages.
    pub fn create(path: &Path) -> io::Result<OsFile> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map(OsFile)
    }
}

impl LogFile for OsFile {
    #[cfg(target_os = "linux")]
    fn allocate(&mut self, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            // Filesystems without fallocate: a sparse file still reads as zeros.
            Err(_) => self.0.set_len(len),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn allocate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
}
