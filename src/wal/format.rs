//! The log's byte layout: segment headers, batches, records and their items. All integers are
//! little-endian; every decoder is total (any input gives a value or a `Malformed`, never a
//! panic), which the `fuzz/` targets check.
//!
//! Invariant: every decoder is total: any bytes give a value or a `Malformed`, never a panic.
//!
//! ```text
//! segment header (32 bytes, at offset 0 of every segment file)
//!   0  8  magic "IDEMKVWL"
//!   8  4  format version (1)
//!  12  4  reserved, 0
//!  16  8  first sequence number the segment may hold
//!  24  4  crc32 of bytes 0..24
//!  28  4  reserved, 0
//!
//! batch (one per group commit: one write, one fdatasync)
//!   0  4  magic 0x4B415442 ("BTAK")
//!   4  4  length of the records that follow, in bytes
//!   8  8  sequence number of the first record
//!  16  4  number of records
//!  20  4  crc32 of bytes 0..20 and of the records
//!  24  …  records
//!
//! record (one per state change; a completion with its batch of writes is one record)
//!   0  4  body length
//!   4  4  crc32 of bytes 8..16+body length (sequence number and body)
//!   8  8  sequence number
//!  16  1  operation (1 begin, 2 complete, 3 release, 4 renew, 5 remove, 6 cas,
//!                     7 put-pending, 8 take-pending, 9 expire)
//!  17  2  number of items
//!  19  …  items
//!
//! item: the new state of one key (a redo image: replaying it twice changes nothing)
//!   0  1  1 = put, 2 = delete
//!   1  1  scope length S
//!   2  2  id length I
//!   4  S  scope, then I bytes of id
//!   put only:
//!      1  kind (1 in flight, 2 in flight on a stored request, 3 completed, 4 pending, 5 value)
//!      8  a (token | completed-at | created-at | version)
//!      8  b (lease deadline | expires-at)
//!     16  fingerprint
//!      4  value length V, then V bytes of value
//! ```
//! A zero where a batch magic should be is the end of a segment's data (segments are
//! preallocated with zeros).

use crate::key::{Fingerprint, Key};
use crate::record::Kind;
#[cfg(test)]
use crate::record::Record;

pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"IDEMKVWL";
pub(crate) const FORMAT_VERSION: u32 = 1;
pub(crate) const SEGMENT_HEADER_LEN: usize = 32;
pub(crate) const BATCH_MAGIC: u32 = 0x4B41_5442;
pub(crate) const BATCH_HEADER_LEN: usize = 24;
pub(crate) const RECORD_HEADER_LEN: usize = 16;

/// Why a state change was logged; kept for diagnostics, replay does not depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Op {
    Begin = 1,
    Complete = 2,
    Release = 3,
    Renew = 4,
    Remove = 5,
    Cas = 6,
    PutPending = 7,
    TakePending = 8,
    Expire = 9,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Begin,
            2 => Op::Complete,
            3 => Op::Release,
            4 => Op::Renew,
            5 => Op::Remove,
            6 => Op::Cas,
            7 => Op::PutPending,
            8 => Op::TakePending,
            9 => Op::Expire,
            _ => return None,
        })
    }
}

pub(crate) fn kind_from_u8(b: u8) -> Option<Kind> {
    Some(match b {
        1 => Kind::InFlight,
        2 => Kind::InFlightPending,
        3 => Kind::Completed,
        4 => Kind::Pending,
        5 => Kind::Value,
        _ => return None,
    })
}

/// Why bytes did not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) &'static str);

/// A decoded item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Item<'a> {
    Put {
        key: Key<'a>,
        kind: Kind,
        a: u64,
        b: u64,
        fingerprint: Fingerprint,
        value: &'a [u8],
    },
    Delete {
        key: Key<'a>,
    },
}

impl<'a> Item<'a> {
    pub(crate) fn key(&self) -> Key<'a> {
        match self {
            Item::Put { key, .. } | Item::Delete { key } => *key,
        }
    }
}

// ------------------------------------------------------------------ encoding

pub(crate) fn segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The header of a batch holding `records` (already encoded records, `count` of them).
pub(crate) fn batch_header(first_seq: u64, count: u32, records: &[u8]) -> [u8; BATCH_HEADER_LEN] {
    let mut h = [0u8; BATCH_HEADER_LEN];
    h[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(records.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&first_seq.to_le_bytes());
    h[16..20].copy_from_slice(&count.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[0..20]);
    crc.update(records);
    h[20..24].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Appends one record to `buf`: call [`RecordWriter::put`] / [`RecordWriter::delete`] for its
/// items, then [`RecordWriter::finish`].
pub(crate) struct RecordWriter<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
    items: u16,
}

impl<'b> RecordWriter<'b> {
    pub(crate) fn new(buf: &'b mut Vec<u8>, seq: u64, op: Op) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&[0u8; 8]); // length and crc, patched by `finish`
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.push(op as u8);
        buf.extend_from_slice(&[0u8; 2]); // item count, patched by `finish`
        RecordWriter {
            buf,
            start,
            items: 0,
        }
    }

    fn key(&mut self, tag: u8, key: Key<'_>) {
        self.items += 1;
        self.buf.push(tag);
        self.buf.push(key.scope().len() as u8);
        self.buf
            .extend_from_slice(&(key.id().len() as u16).to_le_bytes());
        self.buf.extend_from_slice(key.scope());
        self.buf.extend_from_slice(key.id());
    }

    /// The record's current state, as a put.
    #[cfg(test)]
    pub(crate) fn put(&mut self, rec: &Record) {
        let h = rec.header();
        self.put_parts(rec.key(), rec.kind(), h.a, h.b, h.fingerprint, rec.value());
    }

    /// A key's new state, as a put.
    pub(crate) fn put_parts(
        &mut self,
        key: Key<'_>,
        kind: Kind,
        a: u64,
        b: u64,
        fingerprint: Fingerprint,
        value: &[u8],
    ) {
        self.key(1, key);
        self.buf.push(kind as u8);
        self.buf.extend_from_slice(&a.to_le_bytes());
        self.buf.extend_from_slice(&b.to_le_bytes());
        self.buf.extend_from_slice(fingerprint.as_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(value);
    }

    pub(crate) fn delete(&mut self, key: Key<'_>) {
        self.key(2, key);
    }

    pub(crate) fn finish(self) {
        let body_len = self.buf.len() - self.start - RECORD_HEADER_LEN;
        let s = self.start;
        self.buf[s + 17..s + 19].copy_from_slice(&self.items.to_le_bytes());
        self.buf[s..s + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
        let crc = crc32fast::hash(&self.buf[s + 8..]);
        self.buf[s + 4..s + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

// ------------------------------------------------------------------ decoding

/// A bounds-checked little-endian reader.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.remaining() < n {
            return Err(Malformed(what));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Malformed> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        Ok(self.take(1, what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

/// Checks a segment header; returns its first sequence number.
pub(crate) fn decode_segment_header(bytes: &[u8]) -> Result<u64, Malformed> {
    let mut c = Cursor::new(bytes);
    if c.take(8, "segment header truncated")? != SEGMENT_MAGIC {
        return Err(Malformed("not an idemkv log segment (bad magic)"));
    }
    let version = c.u32("segment header truncated")?;
    c.u32("segment header truncated")?;
    let first_seq = c.u64("segment header truncated")?;
    let crc = c.u32("segment header truncated")?;
    if crc != crc32fast::hash(&bytes[0..24]) {
        return Err(Malformed("segment header checksum mismatch"));
    }
    if version != FORMAT_VERSION {
        return Err(Malformed("unsupported log format version"));
    }
    Ok(first_seq)
}

/// A batch as found at some offset of a segment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BatchAt<'a> {
    /// Zeros: the end of the segment's data.
    End,
    /// A whole, checksummed batch.
    Batch {
        first_seq: u64,
        count: u32,
        records: &'a [u8],
        /// Bytes the batch takes, header included.
        len: usize,
    },
}

/// Decodes the batch at the start of `bytes`.
pub(crate) fn decode_batch(bytes: &[u8]) -> Result<BatchAt<'_>, Malformed> {
    if bytes.len() < 4 || bytes[..4] == [0, 0, 0, 0] {
        // Fewer than 4 bytes left, or zeros: nothing was written here.
        if bytes.iter().take(BATCH_HEADER_LEN).all(|&b| b == 0) {
            return Ok(BatchAt::End);
        }
        return Err(Malformed("garbage where a batch should start"));
    }
    let mut c = Cursor::new(bytes);
    if c.u32("batch header truncated")? != BATCH_MAGIC {
        return Err(Malformed("bad batch magic"));
    }
    let len = c.u32("batch header truncated")? as usize;
    let first_seq = c.u64("batch header truncated")?;
    let count = c.u32("batch header truncated")?;
    let crc = c.u32("batch header truncated")?;
    let records = c.take(len, "batch truncated")?;
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[0..20]);
    h.update(records);
    if h.finalize() != crc {
        return Err(Malformed("batch checksum mismatch"));
    }
    Ok(BatchAt::Batch {
        first_seq,
        count,
        records,
        len: BATCH_HEADER_LEN + len,
    })
}

/// A decoded record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RecordAt<'a> {
    pub(crate) seq: u64,
    pub(crate) op: Op,
    pub(crate) items: Vec<Item<'a>>,
    /// Bytes the record takes.
    pub(crate) len: usize,
}

/// Decodes the record at the start of `bytes`, checking its own checksum.
pub(crate) fn decode_record(bytes: &[u8]) -> Result<RecordAt<'_>, Malformed> {
    let mut c = Cursor::new(bytes);
    let body_len = c.u32("record header truncated")? as usize;
    let crc = c.u32("record header truncated")?;
    let covered = c.take(8 + body_len, "record truncated")?;
    if crc32fast::hash(covered) != crc {
        return Err(Malformed("record checksum mismatch"));
    }
    let mut c = Cursor::new(covered);
    let seq = c.u64("record truncated")?;
    let op = Op::from_u8(c.u8("record truncated")?).ok_or(Malformed("unknown operation"))?;
    let n = c.u16("record truncated")?;
    let mut items = Vec::with_capacity(usize::from(n).min(c.remaining() / 4));
    for _ in 0..n {
        items.push(decode_item(&mut c)?);
    }
    if c.remaining() != 0 {
        return Err(Malformed("trailing bytes in record"));
    }
    Ok(RecordAt {
        seq,
        op,
        items,
        len: RECORD_HEADER_LEN + body_len,
    })
}

fn decode_item<'a>(c: &mut Cursor<'a>) -> Result<Item<'a>, Malformed> {
    let tag = c.u8("item truncated")?;
    let scope_len = c.u8("item truncated")? as usize;
    let id_len = c.u16("item truncated")? as usize;
    let scope = c.take(scope_len, "item key truncated")?;
    let id = c.take(id_len, "item key truncated")?;
    if id.is_empty() {
        return Err(Malformed("item with an empty key id"));
    }
    let key = Key::new(scope, id);
    match tag {
        2 => Ok(Item::Delete { key }),
        1 => {
            let kind =
                kind_from_u8(c.u8("item truncated")?).ok_or(Malformed("unknown record kind"))?;
            let a = c.u64("item truncated")?;
            let b = c.u64("item truncated")?;
            let mut fp = [0u8; 16];
            fp.copy_from_slice(c.take(16, "item truncated")?);
            let value_len = c.u32("item truncated")? as usize;
            let value = c.take(value_len, "item value truncated")?;
            Ok(Item::Put {
                key,
                kind,
                a,
                b,
                fingerprint: Fingerprint::from_bytes(fp),
                value,
            })
        }
        _ => Err(Malformed("unknown item tag")),
    }
}

/// All records of a batch, in order; checks that sequence numbers follow each other.
pub(crate) fn decode_records(
    first_seq: u64,
    count: u32,
    mut records: &[u8],
) -> Result<Vec<RecordAt<'_>>, Malformed> {
    let mut out = Vec::with_capacity((count as usize).min(records.len() / RECORD_HEADER_LEN));
    for i in 0..count as u64 {
        let r = decode_record(records)?;
        if r.seq != first_seq + i {
            return Err(Malformed("record sequence number out of order"));
        }
        records = &records[r.len..];
        out.push(r);
    }
    if !records.is_empty() {
        return Err(Malformed("trailing bytes in batch"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::NewRecord;

    fn sample_records() -> Vec<u8> {
        let rec = Record::new(NewRecord {
            kind: Kind::Completed,
            a: 5,
            b: 6,
            fingerprint: Fingerprint::from_bytes([9; 16]),
            key: Key::new("scope", "id-1"),
            value: b"response",
        });
        let mut buf = Vec::new();
        let mut w = RecordWriter::new(&mut buf, 7, Op::Complete);
        w.put(&rec);
        w.delete(Key::new("", "gone"));
        w.finish();
        let mut w = RecordWriter::new(&mut buf, 8, Op::Remove);
        w.delete(Key::new("s", "x"));
        w.finish();
        buf
    }

    #[test]
    fn records_round_trip() {
        let buf = sample_records();
        let recs = decode_records(7, 2, &buf).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].op, Op::Complete);
        assert_eq!(
            recs[0].items[0],
            Item::Put {
                key: Key::new("scope", "id-1"),
                kind: Kind::Completed,
                a: 5,
                b: 6,
                fingerprint: Fingerprint::from_bytes([9; 16]),
                value: b"response",
            }
        );
        assert_eq!(
            recs[0].items[1],
            Item::Delete {
                key: Key::new("", "gone")
            }
        );
        assert_eq!((recs[1].seq, recs[1].op), (8, Op::Remove));
        assert!(
            decode_records(6, 2, &buf).is_err(),
            "sequence numbers are checked"
        );
    }

    #[test]
    fn batch_round_trip_and_end_marker() {
        let records = sample_records();
        let mut seg = segment_header(7).to_vec();
        seg.extend_from_slice(&batch_header(7, 2, &records));
        seg.extend_from_slice(&records);
        seg.extend_from_slice(&[0u8; 64]);
        assert_eq!(decode_segment_header(&seg).unwrap(), 7);
        let BatchAt::Batch {
            first_seq,
            count,
            records: r,
            len,
        } = decode_batch(&seg[SEGMENT_HEADER_LEN..]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (first_seq, count, r, len),
            (7, 2, &records[..], BATCH_HEADER_LEN + records.len())
        );
        assert_eq!(
            decode_batch(&seg[SEGMENT_HEADER_LEN + len..]).unwrap(),
            BatchAt::End
        );
        assert_eq!(decode_batch(&[]).unwrap(), BatchAt::End);
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_caught() {
        let records = sample_records();
        let mut batch = batch_header(7, 2, &records).to_vec();
        batch.extend_from_slice(&records);
        for cut in 1..batch.len() {
            // A torn batch: a prefix, then zeros (the preallocated rest).
            let mut torn = batch[..cut].to_vec();
            torn.extend_from_slice(&[0u8; 32]);
            assert!(
                !matches!(decode_batch(&torn), Ok(BatchAt::Batch { .. })),
                "prefix of {cut} bytes decoded as a whole batch"
            );
        }
        for byte in 0..batch.len() {
            for bit in 0..8 {
                let mut bad = batch.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    !matches!(decode_batch(&bad), Ok(BatchAt::Batch { .. })),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
        for byte in 0..records.len() {
            let mut bad = records.clone();
            bad[byte] ^= 0x10;
            assert!(decode_records(7, 2, &bad).is_err(), "record flip at {byte}");
        }
    }

    #[test]
    fn bad_segment_headers() {
        let h = segment_header(1);
        assert!(decode_segment_header(&h[..10]).is_err());
        let mut bad = h;
        bad[0] = b'X';
        assert_eq!(
            decode_segment_header(&bad),
            Err(Malformed("not an idemkv log segment (bad magic)"))
        );
        let mut bad = h;
        bad[17] ^= 1;
        assert_eq!(
            decode_segment_header(&bad),
            Err(Malformed("segment header checksum mismatch"))
        );
        let mut future = h;
        future[8] = 2;
        let crc = crc32fast::hash(&future[0..24]);
        future[24..28].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_segment_header(&future),
            Err(Malformed("unsupported log format version"))
        );
    }
}
