//! Log segments as files: naming, listing, creating and removing them. Every creation and
//! removal of a segment happens here, each step with what a crash right after it leaves behind
//! and why recovery copes.
//!
//! Invariant: a segment holds acknowledged records only once its header, its directory entry
//! and its first batch are all synced. So a segment file with no valid batch holds nothing that
//! was ever acknowledged, whatever step its creation reached, and recovery removes it
//! ([`remove_empty`]) before the writer starts: the writer's next segment is named after the
//! next sequence number, which is exactly the name such a leftover has, so keeping it would make
//! every later write fail with "file exists".

use std::io;
use std::path::{Path, PathBuf};

use super::format::{self, SEGMENT_HEADER_LEN};
use super::io::{LogFile, LogStorage};

/// The file of the segment whose first record is `first_seq`: `<first_seq, 20 digits>.wal`,
/// so that names sort by sequence number.
pub(crate) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.wal"))
}

/// The segment files in `dir`, by first sequence number. Other files are ignored.
pub(crate) fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".wal") else {
            continue;
        };
        if let Ok(seq) = stem.parse::<u64>() {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Creates the segment whose first record will be `first_seq`, `size` bytes preallocated.
///
/// A crash after each step leaves:
/// 1. `create_new`: an empty file;
/// 2. `allocate`: `size` zero bytes, no header;
/// 3. the header write: a header (or part of one) and zeros;
/// 4. `sync_all` of the file: a durable header and zeros;
/// 5. `sync_dir`: the same, with a durable name.
///
/// In every case the file has no valid batch: recovery removes it (see the module invariant),
/// and nothing in it was acknowledged, since the batch that asked for the segment is only
/// acknowledged after its own write and `fdatasync` into it.
pub(crate) fn create(
    storage: &dyn LogStorage,
    dir: &Path,
    first_seq: u64,
    size: u64,
) -> io::Result<Box<dyn LogFile>> {
    let path = segment_path(dir, first_seq);
    let mut file = storage.create_new(&path)?;
    file.allocate(size)?;
    file.write_at(0, &format::segment_header(first_seq))?;
    file.sync_all()?;
    storage.sync_dir(dir)?;
    Ok(file)
}

/// Removes the segments wholly covered by a checkpoint that reflects every record up to
/// `covered`, oldest first; the newest segment always stays, so the next sequence number can be
/// read back. Returns how many were removed.
///
/// A crash between two removals leaves the newer covered segments; recovery reads them and
/// skips their records (the checkpoint has them). Should the directory lose the removals out
/// of order (a power cut before `sync_dir`), the gap left is wholly below the checkpoint, which
/// recovery accepts (see `recovery::replay`).
pub(crate) fn remove_covered(
    storage: &dyn LogStorage,
    dir: &Path,
    covered: u64,
) -> io::Result<usize> {
    let segments = list(dir)?;
    let mut removed = 0;
    for pair in segments.windows(2) {
        let (next_first, _) = pair[1];
        if next_first.saturating_sub(1) > covered {
            break;
        }
        storage.remove(&pair[0].1).map_err(|e| {
            io::Error::new(e.kind(), format!("removing {}: {e}", pair[0].1.display()))
        })?;
        removed += 1;
    }
    if removed > 0 {
        storage.sync_dir(dir)?;
    }
    Ok(removed)
}

/// Removes segment files that hold no valid batch (see the module invariant), then syncs the
/// directory. Called by recovery, before the writer starts.
///
/// A crash part way leaves some of them; the next recovery removes the rest.
pub(crate) fn remove_empty(
    storage: &dyn LogStorage,
    dir: &Path,
    empty: &[PathBuf],
) -> io::Result<()> {
    for path in empty {
        match storage.remove(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if !empty.is_empty() {
        storage.sync_dir(dir)?;
    }
    Ok(())
}

/// Whether `bytes` starts with a segment header naming `first_seq`.
pub(crate) fn header_names(bytes: &[u8], first_seq: u64) -> bool {
    bytes.len() >= SEGMENT_HEADER_LEN
        && format::decode_segment_header(bytes).is_ok_and(|s| s == first_seq)
}
