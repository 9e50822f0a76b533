//! The keys a stretch of the log changed: what an incremental checkpoint rewrites.
//!
//! Invariant: [`changed_keys`] either returns every key that a record with a sequence number in
//! `after + 1 ..= upto` touches, or an error; never a partial set. The checkpoint then falls
//! back to writing every live record.
//!
//! Reading happens while the writer appends to the newest segment. Only records up to `upto`
//! are needed, and the caller has waited for them to be durable, so their bytes are on disk and
//! never change again; whatever follows them may be a batch being written, which fails its
//! checksum or reads as zeros and ends the read.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::Path;

use super::format::{self, BATCH_HEADER_LEN, BatchAt, SEGMENT_HEADER_LEN};
use super::segments;
use crate::checkpoint::Packed;

/// Read buffer per segment: batches are read one at a time through it.
const READ_BUFFER: usize = 1 << 20;

/// Why the log could not say which keys changed (the checkpoint then writes everything).
#[derive(Debug)]
pub(crate) struct Unreadable(pub(crate) String);

/// Every key touched by a record with a sequence number in `after + 1 ..= upto`, in the
/// checkpoint's encoding, sorted, each once (and none with a value yet).
pub(crate) fn changed_keys(dir: &Path, after: u64, upto: u64) -> Result<Packed, Unreadable> {
    let mut keys = Packed::default();
    if upto <= after {
        return Ok(keys);
    }
    let segments =
        segments::list(dir).map_err(|e| Unreadable(format!("listing {}: {e}", dir.display())))?;
    // The next sequence number wanted: records must follow on from `after + 1` without a gap.
    let mut next = after + 1;
    for (i, (first, path)) in segments.iter().enumerate() {
        // A segment whose successor starts at or before `next` holds nothing wanted.
        if segments.get(i + 1).is_some_and(|(f, _)| *f <= next) {
            continue;
        }
        if *first > next {
            return Err(Unreadable(format!(
                "no segment holds record {next} (the next starts at {first})"
            )));
        }
        next = read_segment(path, *first, next, upto, &mut keys)?;
        if next > upto {
            break;
        }
    }
    if next <= upto {
        return Err(Unreadable(format!(
            "the log ends before record {upto} (at {next})"
        )));
    }
    keys.sort_dedup();
    Ok(keys)
}

/// Reads the batches of one segment (whose name says its first record is `first`), pushing
/// the keys of records numbered `next` and above (up to `upto`); returns the next sequence
/// number wanted.
fn read_segment(
    path: &Path,
    first: u64,
    mut next: u64,
    upto: u64,
    keys: &mut Packed,
) -> Result<u64, Unreadable> {
    let fail = |what: &str| Unreadable(format!("{}: {what}", path.display()));
    let file = File::open(path).map_err(|e| fail(&e.to_string()))?;
    let size = file.metadata().map_err(|e| fail(&e.to_string()))?.len();
    let mut pos = SEGMENT_HEADER_LEN as u64;
    let mut r = BufReader::with_capacity(READ_BUFFER, file);
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    r.read_exact(&mut header)
        .map_err(|e| fail(&e.to_string()))?;
    if !segments::header_names(&header, first) {
        return Err(fail("bad segment header"));
    }
    let mut batch = Vec::new();
    while next <= upto {
        batch.resize(BATCH_HEADER_LEN, 0);
        match r.read_exact(&mut batch[..BATCH_HEADER_LEN]) {
            Ok(()) => {}
            // The segment ends: the caller goes on with the next one.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(fail(&e.to_string())),
        }
        if batch[..4] == [0; 4] {
            break;
        }
        let len = u32::from_le_bytes([batch[4], batch[5], batch[6], batch[7]]);
        // A length read from a batch being written may be anything: never past the file.
        pos += BATCH_HEADER_LEN as u64;
        if u64::from(len) > size.saturating_sub(pos) {
            break;
        }
        pos += u64::from(len);
        let len = len as usize;
        batch.resize(BATCH_HEADER_LEN + len, 0);
        if r.read_exact(&mut batch[BATCH_HEADER_LEN..]).is_err() {
            break;
        }
        let Ok(BatchAt::Batch {
            first_seq,
            count,
            records,
            ..
        }) = format::decode_batch(&batch)
        else {
            // A batch still being written (beyond `upto`), or damage: either way the read
            // ends here, and the caller checks it got as far as `upto`.
            break;
        };
        let last = first_seq + u64::from(count).saturating_sub(1);
        if last < next {
            continue;
        }
        if first_seq > next {
            return Err(fail(&format!("records {next}..{first_seq} are missing")));
        }
        let recs = format::decode_records(first_seq, count, records).map_err(|m| fail(m.0))?;
        for rec in recs.iter().filter(|rec| rec.seq >= next) {
            for item in &rec.items {
                keys.push_key(item.key());
            }
        }
        next = last + 1;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_range_reads_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(changed_keys(dir.path(), 5, 5).expect("empty").len(), 0);
    }

    #[test]
    fn a_range_no_segment_holds_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(changed_keys(dir.path(), 0, 3).is_err());
    }
}
