//! Reading the log back on open.
//!
//! Invariant: recovery never drops a record that a synced batch holds, unless told to drop
//! damage (`OnCorruption::DropDamaged`), and then reports it.
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
use super::io::LogStorage;
use super::segments;

/// How recovery treats damage in the middle of the log.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnCorruption {
    /// Refuse to open, naming the file and offset (the default).
    #[default]
    Fail,
    /// Open anyway: drop the damaged batch and everything logged after it, and report it.
    DropDamaged,
}

/// What recovery found and did.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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
    /// A torn tail that was cut off.
    pub torn_tail: Option<TornTail>,
    /// Damage that was dropped (with `OnCorruption::DropDamaged`).
    pub dropped: Option<DroppedDamage>,
    /// Segment files that held no valid batch (their creation was cut short by a crash, or
    /// their only batch was torn), removed so that the log can be written again.
    pub empty_segments_removed: Vec<PathBuf>,
}

/// The end of the log that a crash cut short and recovery cut off: never acknowledged.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TornTail {
    /// The segment file.
    pub path: PathBuf,
    /// Where the torn batch started.
    pub offset: u64,
    /// How many bytes were cut off (preallocated zeros included).
    pub bytes: u64,
}

/// Damage in the middle of the log that `OnCorruption::DropDamaged` dropped, with everything
/// logged after it.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DroppedDamage {
    /// The damaged segment file.
    pub path: PathBuf,
    /// Where the damaged batch started.
    pub offset: u64,
    /// What was wrong with it.
    pub reason: String,
    /// The later segments removed with it.
    pub removed_segments: Vec<PathBuf>,
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

/// Replays every record with a sequence number above `after` (the checkpoint's), in order,
/// through `apply`; cuts a torn tail; removes segment files that hold no valid batch (see
/// `segments`), so that the writer, which starts a new segment at `last_seq + 1`, finds its
/// name free. With `modify` false (reading a directory for inspection) nothing is cut or
/// removed: the report says what an open would cut and remove.
pub(crate) fn replay(
    dir: &Path,
    after: u64,
    on_corruption: OnCorruption,
    storage: &dyn LogStorage,
    modify: bool,
    mut apply: impl FnMut(&RecordAt<'_>),
) -> Result<RecoveryReport, LogError> {
    let segments = segments::list(dir).map_err(io_err(dir))?;
    let mut report = RecoveryReport {
        last_seq: after,
        ..RecoveryReport::default()
    };
    let mut expected: Option<u64> = None;
    let mut empty: Vec<PathBuf> = Vec::new();
    for (i, (name_seq, path)) in segments.iter().enumerate() {
        report.segments += 1;
        let later = &segments[i + 1..];
        let Some(m) = map(path)? else {
            // A segment whose creation was cut short by a crash (empty): nothing in it.
            empty.push(path.clone());
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
        let mut offset = SEGMENT_HEADER_LEN;
        let mut batches = 0usize;
        let mut bad: Option<(u64, String)> = None;
        if !segments::header_names(&m, *name_seq) {
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
                    // A gap is damage unless all of it is covered by the checkpoint: removing
                    // covered segments may reach the disk out of order after a power cut.
                    let gap_ok =
                        |e: u64| first_seq == e || (first_seq > e && first_seq <= after + 1);
                    if expected.is_some_and(|e| !gap_ok(e)) || count == 0 {
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
                    batches += 1;
                }
                Err(e) => bad = Some((offset as u64, e.0.to_owned())),
            }
        }
        if batches == 0 {
            // Whether it ends cleanly, torn or damaged: nothing in it was ever acknowledged.
            empty.push(path.clone());
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
            if modify {
                cut(path, at.max(SEGMENT_HEADER_LEN as u64).min(len))?;
            }
            report.torn_tail = Some(TornTail {
                path: path.clone(),
                offset: at,
                bytes: len.saturating_sub(at),
            });
            // Nothing valid follows a torn tail: later segments (if a crash left any) are empty.
            empty.extend(later.iter().map(|(_, p)| p.clone()));
        } else {
            let removed: Vec<PathBuf> = later.iter().map(|(_, p)| p.clone()).collect();
            if modify {
                cut(path, at)?;
                for p in &removed {
                    storage.remove(p).map_err(io_err(p))?;
                }
                storage.sync_dir(dir).map_err(io_err(dir))?;
            }
            report.dropped = Some(DroppedDamage {
                path: path.clone(),
                offset: at,
                reason,
                removed_segments: removed,
            });
        }
        break;
    }
    if modify {
        segments::remove_empty(storage, dir, &empty).map_err(io_err(dir))?;
    }
    report.empty_segments_removed = empty;
    Ok(report)
}
