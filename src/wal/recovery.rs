//! Reading the log back on open.
//!
//! Segments are read in order of their first sequence number, batch by batch. A batch that does
//! not decode is either
//! - a **torn tail**: it is in the last segment with data and nothing valid follows it anywhere
//!   (the crash interrupted the last write, which was never acknowledged). The segment is cut
//!   there and recovery goes on; or
//! - **damage in the middle**: a valid batch follows it. That cannot come from a crash (each
//!   batch is synced before the next is written), so it is an error naming the file and offset,
//!   unless the caller chose to drop the damaged part, in which case everything from the damage
//!   on is removed and reported.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::format::{self, BatchAt, RecordAt, SEGMENT_HEADER_LEN};

/// How recovery treats damage in the middle of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnCorruption {
    /// Refuse to open, naming the file and offset (the default).
    #[default]
    Fail,
    /// Open anyway: drop the damaged batch and everything logged after it, and report it.
    DropDamaged,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Segments read.
    pub segments: usize,
    /// Records replayed (after the checkpoint).
    pub records: u64,
    /// The last sequence number found.
    pub last_seq: u64,
    /// The checkpoint loaded covered the log up to this sequence number (0: none).
    pub checkpoint_seq: u64,
    /// Records loaded from the checkpoint.
    pub checkpoint_records: u64,
    /// A torn tail that was cut off: file, offset, bytes.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
    /// Damage that was dropped (with `OnCorruption::DropDamaged`): file, offset, reason, and
    /// the segments removed after it.
    pub dropped: Option<(PathBuf, u64, String, Vec<PathBuf>)>,
}

/// A log that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// Reading, cutting or listing the log failed.
    #[error("log I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Damage in the middle of the log: valid data follows a batch that does not decode.
    #[error(
        "the log is damaged in {path} at offset {offset}: {reason}; valid records follow, so this \
         is not a torn write. Restore from a backup, or open with OnCorruption::DropDamaged to \
         drop this batch and everything after it"
    )]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the damaged batch.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The segment files in `dir`, by first sequence number.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
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

fn map(path: &Path) -> Result<Option<memmap2::Mmap>, LogError> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: the store's directory is locked (the LOCK file), so no other idemkv process
    // writes this segment, and this process's writer only ever writes new segments, created
    // after recovery. The map is read-only and dropped before the file is cut.
    #[allow(unsafe_code)]
    let m = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    Ok(Some(m))
}

/// Whether any valid batch starts anywhere in `bytes` (used to tell damage from a torn tail).
fn any_batch_in(bytes: &[u8]) -> bool {
    let magic = format::BATCH_MAGIC.to_le_bytes();
    (0..bytes.len().saturating_sub(3)).any(|i| {
        bytes[i..i + 4] == magic
            && matches!(format::decode_batch(&bytes[i..]), Ok(BatchAt::Batch { .. }))
    })
}

/// Whether a segment holds at least one valid batch.
fn has_data(path: &Path) -> Result<bool, LogError> {
    let Some(m) = map(path)? else {
        return Ok(false);
    };
    if m.len() < SEGMENT_HEADER_LEN || format::decode_segment_header(&m).is_err() {
        return Ok(false);
    }
    Ok(any_batch_in(&m[SEGMENT_HEADER_LEN..]))
}

fn cut(path: &Path, at: u64) -> Result<(), LogError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(at).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Replays every record with a sequence number above `after`, in order, through `apply`.
pub(crate) fn replay(
    dir: &Path,
    after: u64,
    on_corruption: OnCorruption,
    mut apply: impl FnMut(&RecordAt<'_>),
) -> Result<RecoveryReport, LogError> {
    let segments = list_segments(dir)?;
    let mut report = RecoveryReport {
        last_seq: after,
        ..RecoveryReport::default()
    };
    let mut expected: Option<u64> = None;
    for (i, (name_seq, path)) in segments.iter().enumerate() {
        report.segments += 1;
        let later = &segments[i + 1..];
        let Some(m) = map(path)? else {
            // A segment whose creation was cut short by a crash (empty): nothing in it.
            continue;
        };
        let damage = |offset: u64, reason: &str, rest: &[u8]| -> Result<bool, LogError> {
            // True: a torn tail. False or Err: damage in the middle.
            let mut follows = any_batch_in(rest);
            for (_, p) in later {
                follows = follows || has_data(p)?;
            }
            if !follows {
                return Ok(true);
            }
            Err(LogError::Corrupt {
                path: path.clone(),
                offset,
                reason: reason.to_owned(),
            })
        };
        let header_ok = m.len() >= SEGMENT_HEADER_LEN
            && format::decode_segment_header(&m).is_ok_and(|s| s == *name_seq);
        let mut offset = SEGMENT_HEADER_LEN;
        let mut bad: Option<(u64, String)> = None;
        if !header_ok {
            bad = Some((0, "bad segment header".to_owned()));
        }
        while bad.is_none() {
            match format::decode_batch(&m[offset..]) {
                Ok(BatchAt::End) => break,
                Ok(BatchAt::Batch {
                    first_seq,
                    count,
                    records,
                    len,
                }) => {
                    if expected.is_some_and(|e| e != first_seq) || count == 0 {
                        bad = Some((offset as u64, "sequence numbers do not follow on".into()));
                        break;
                    }
                    let recs = match format::decode_records(first_seq, count, records) {
                        Ok(r) => r,
                        Err(e) => {
                            bad = Some((offset as u64, e.0.to_owned()));
                            break;
                        }
                    };
                    for r in &recs {
                        if r.seq > after {
                            apply(r);
                            report.records += 1;
                        }
                    }
                    let last = first_seq + u64::from(count) - 1;
                    report.last_seq = report.last_seq.max(last);
                    expected = Some(last + 1);
                    offset += len;
                }
                Err(e) => bad = Some((offset as u64, e.0.to_owned())),
            }
        }
        let Some((at, reason)) = bad else { continue };
        let rest = m.get(at as usize + 1..).unwrap_or(&[]);
        let torn = match damage(at, &reason, rest) {
            Ok(torn) => torn,
            Err(e) if on_corruption == OnCorruption::Fail => return Err(e),
            Err(_) => false,
        };
        drop(m);
        if torn {
            let len = std::fs::metadata(path).map_err(io_err(path))?.len();
            cut(path, at.max(SEGMENT_HEADER_LEN as u64).min(len))?;
            report.torn_tail = Some((path.clone(), at, len - at));
            if at < SEGMENT_HEADER_LEN as u64 {
                std::fs::remove_file(path).map_err(io_err(path))?;
            }
        } else {
            cut(path, at)?;
            let removed: Vec<PathBuf> = later.iter().map(|(_, p)| p.clone()).collect();
            for p in &removed {
                std::fs::remove_file(p).map_err(io_err(p))?;
            }
            report.dropped = Some((path.clone(), at, reason, removed));
        }
        super::sync_dir(dir).map_err(io_err(dir))?;
        break;
    }
    Ok(report)
}
