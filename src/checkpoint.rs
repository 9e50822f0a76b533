//! Checkpoints into redb: the live records, written in the background, so that the log
//! segments they cover can be deleted and recovery replays only the log written since.
//!
//! Invariant: a checkpoint claims `checkpoint_seq` only for records durable in the log, and is
//! committed whole (one redb transaction) before any segment it covers is removed.
//!
//! ```text
//! checkpoint.redb
//!   table "meta"    (&str -> u64)
//!     "format"          checkpoint format version (1)
//!     "checkpoint_seq"  every log record up to this sequence number is reflected
//!     "token_high"      high bits of the largest token/version ever handed out
//!   table "records" (&[u8] -> &[u8])
//!     key:   scope length (1) | scope | id
//!     value: crc32 of the rest (4) | kind (1) | a (8) | b (8) | fingerprint (16) | value bytes
//! ```
//! All integers little-endian. redb checksums its own pages; the crc32 per value also catches
//! damage to a value itself, and a value that does not decode is a hard error naming the key.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::key::{Fingerprint, Key};
use crate::record::Kind;
use crate::wal::format::{Cursor, Item, Malformed, kind_from_u8};

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FORMAT: u64 = 1;

/// A checkpoint that cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// redb failed.
    #[error("checkpoint database {path}: {source}")]
    Redb {
        /// The database file.
        path: PathBuf,
        /// redb's error.
        source: Box<redb::Error>,
    },
    /// A stored record does not decode or fails its checksum.
    #[error(
        "checkpoint database {path} is damaged: {reason} (record key {key:?}); restore it from a backup or delete it to recover from the log alone, if the log still covers everything"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The record's key bytes.
        key: Vec<u8>,
        /// What is wrong.
        reason: &'static str,
    },
    /// The checkpoint was written by a newer format.
    #[error("checkpoint database {path} has format {found}; this version reads format {FORMAT}")]
    Version {
        /// The database file.
        path: PathBuf,
        /// The format found.
        found: u64,
    },
}

fn redb_err(path: &Path) -> impl Fn(redb::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Redb {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// Appends the checkpoint encoding of `key` to `out`.
pub(crate) fn encode_key(key: Key<'_>, out: &mut Vec<u8>) {
    out.push(key.scope().len() as u8);
    out.extend_from_slice(key.scope());
    out.extend_from_slice(key.id());
}

/// The key of [`encode_key`]'s bytes; `None` if they are too short for their scope length.
pub(crate) fn decode_key(k: &[u8]) -> Option<Key<'_>> {
    let (&scope_len, rest) = k.split_first()?;
    let (scope, id) = rest.split_at_checked(usize::from(scope_len))?;
    Some(Key::new(scope, id))
}

/// Appends the checkpoint encoding of a record's value to `out`.
pub(crate) fn encode_value(
    kind: Kind,
    a: u64,
    b: u64,
    fp: Fingerprint,
    value: &[u8],
    out: &mut Vec<u8>,
) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(kind as u8);
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    out.extend_from_slice(fp.as_bytes());
    out.extend_from_slice(value);
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Where an encoded key or value lies in a [`Packed`] buffer.
type Span = (usize, usize);

/// Records for a checkpoint to write, packed: keys in one buffer, values in another (two
/// allocations in all, not two per record). Each entry is a key and its value, or a key
/// without one: remove it.
#[derive(Debug, Default)]
pub(crate) struct Packed {
    keys: Vec<u8>,
    values: Vec<u8>,
    entries: Vec<(Span, Option<Span>)>,
}

impl Packed {
    /// Adds `key`, without a value (yet).
    pub(crate) fn push_key(&mut self, key: Key<'_>) {
        let start = self.keys.len();
        encode_key(key, &mut self.keys);
        self.entries.push(((start, self.keys.len() - start), None));
    }

    /// Adds `key` with the value of `record`.
    pub(crate) fn push(&mut self, key: Key<'_>, record: &crate::record::Record) {
        self.push_key(key);
        let last = self.entries.len() - 1;
        self.set_value(last, record);
    }

    /// Sets entry `i`'s value to `record`'s.
    pub(crate) fn set_value(&mut self, i: usize, record: &crate::record::Record) {
        let start = self.values.len();
        let h = record.header();
        encode_value(
            record.kind(),
            h.a,
            h.b,
            h.fingerprint,
            record.value(),
            &mut self.values,
        );
        if let Some(e) = self.entries.get_mut(i) {
            e.1 = Some((start, self.values.len() - start));
        }
    }

    /// Sorts the entries by key (redb inserts in key order touch each page once) and keeps
    /// one entry per key.
    pub(crate) fn sort_dedup(&mut self) {
        let keys = &self.keys;
        let at = |s: Span| &keys[s.0..s.0 + s.1];
        self.entries.sort_by(|a, b| at(a.0).cmp(at(b.0)));
        self.entries.dedup_by(|a, b| at(a.0) == at(b.0));
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries without a value: keys to remove.
    pub(crate) fn removals(&self) -> usize {
        self.entries.iter().filter(|e| e.1.is_none()).count()
    }

    /// Entry `i`'s key bytes.
    pub(crate) fn key(&self, i: usize) -> &[u8] {
        self.entries
            .get(i)
            .map_or(&[][..], |&((s, l), _)| &self.keys[s..s + l])
    }

    /// The entries in order: each key's bytes and its value's, if it has one.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.entries.iter().map(|&((ks, kl), v)| {
            (
                &self.keys[ks..ks + kl],
                v.map(|(vs, vl)| &self.values[vs..vs + vl]),
            )
        })
    }
}

/// Decodes one stored record into the same item a log put would give.
pub(crate) fn decode<'a>(k: &'a [u8], v: &'a [u8]) -> Result<Item<'a>, Malformed> {
    let mut c = Cursor::new(k);
    let scope_len = c.u8("key truncated")? as usize;
    let scope = c.take(scope_len, "key truncated")?;
    let id = c.take(c.remaining(), "key truncated")?;
    if id.is_empty() {
        return Err(Malformed("empty key id"));
    }
    let mut c = Cursor::new(v);
    let crc = c.u32("value truncated")?;
    if crc32fast::hash(&v[4..]) != crc {
        return Err(Malformed("value checksum mismatch"));
    }
    let kind = kind_from_u8(c.u8("value truncated")?).ok_or(Malformed("unknown record kind"))?;
    let a = c.u64("value truncated")?;
    let b = c.u64("value truncated")?;
    let mut fp = [0u8; 16];
    fp.copy_from_slice(c.take(16, "value truncated")?);
    let value = c.take(c.remaining(), "value truncated")?;
    Ok(Item::Put {
        key: Key::new(scope, id),
        kind,
        a,
        b,
        fingerprint: Fingerprint::from_bytes(fp),
        value,
    })
}

/// What a checkpoint held.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Loaded {
    pub(crate) seq: u64,
    pub(crate) token_high: u64,
    pub(crate) records: u64,
}

/// The checkpoint database of a store directory.
pub(crate) struct Checkpoints {
    path: PathBuf,
    db: Database,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("path", &self.path)
            .finish()
    }
}

impl Checkpoints {
    pub(crate) fn open(path: PathBuf) -> Result<Checkpoints, CheckpointError> {
        let db = Database::create(&path).map_err(|e| redb_err(&path)(e.into()))?;
        Ok(Checkpoints { path, db })
    }

    /// Feeds every stored record to `apply`; returns what the checkpoint covers.
    /// Feeds every record to `apply`, after telling `expect` how many there are.
    pub(crate) fn load(
        &self,
        expect: impl FnOnce(u64),
        apply: impl FnMut(&Item<'_>),
    ) -> Result<Loaded, CheckpointError> {
        load_from(&self.db, &self.path, expect, apply)
    }

    /// Writes `records` into the checkpoint, covering the log up to `seq`, in one transaction
    /// that is durable when this returns. `whole`: they are every live record, and replace
    /// the table; otherwise they update it in place: each key's value is replaced, or the key
    /// removed where it has no value.
    pub(crate) fn write(
        &self,
        seq: u64,
        token_high: u64,
        records: &Packed,
        whole: bool,
    ) -> Result<(), CheckpointError> {
        let e = redb_err(&self.path);
        let txn = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            if whole {
                txn.delete_table(RECORDS).map_err(|x| e(x.into()))?;
            }
            let mut t = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
            for (k, v) in records.iter() {
                match v {
                    Some(v) => {
                        t.insert(k, v).map_err(|x| e(x.into()))?;
                    }
                    None => {
                        t.remove(k).map_err(|x| e(x.into()))?;
                    }
                }
            }
            let mut m = txn.open_table(META).map_err(|x| e(x.into()))?;
            m.insert("format", FORMAT).map_err(|x| e(x.into()))?;
            m.insert("checkpoint_seq", seq).map_err(|x| e(x.into()))?;
            m.insert("token_high", token_high)
                .map_err(|x| e(x.into()))?;
        }
        txn.commit().map_err(|x| e(x.into()))
    }
}

/// Feeds every record of the checkpoint database `db` (at `path`) to `apply`, after telling
/// `expect` how many there are (so the index can be sized once).
fn load_from(
    db: &impl ReadableDatabase,
    path: &Path,
    expect: impl FnOnce(u64),
    mut apply: impl FnMut(&Item<'_>),
) -> Result<Loaded, CheckpointError> {
    let e = redb_err(path);
    let txn = db.begin_read().map_err(|x| e(x.into()))?;
    let mut loaded = Loaded::default();
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(loaded),
        Err(x) => return Err(e(x.into())),
    };
    let get = |name: &str| -> Result<u64, CheckpointError> {
        Ok(meta
            .get(name)
            .map_err(|x| e(x.into()))?
            .map_or(0, |g| g.value()))
    };
    let format = get("format")?;
    if format > FORMAT {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            found: format,
        });
    }
    loaded.seq = get("checkpoint_seq")?;
    loaded.token_high = get("token_high")?;
    let records = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
    expect(records.len().map_err(|x| e(x.into()))?);
    for entry in records.iter().map_err(|x| e(x.into()))? {
        let (k, v) = entry.map_err(|x| e(x.into()))?;
        let item = decode(k.value(), v.value()).map_err(|m| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            key: k.value().to_vec(),
            reason: m.0,
        })?;
        apply(&item);
        loaded.records += 1;
    }
    Ok(loaded)
}

/// Reads the checkpoint at `path` without creating or changing it (redb's read-only mode,
/// which a process holding the database excludes); `Ok(None)` if there is none.
#[cfg_attr(loom, allow(dead_code))] // its one user, `tools`, is not built under loom
pub(crate) fn load_read_only(
    path: &Path,
    apply: impl FnMut(&Item<'_>),
) -> Result<Option<Loaded>, CheckpointError> {
    if !path.exists() {
        return Ok(None);
    }
    let db = redb::ReadOnlyDatabase::open(path).map_err(|e| redb_err(path)(e.into()))?;
    load_from(&db, path, |_| {}, apply).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_caught() {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        encode_key(Key::new("scope", "id"), &mut k);
        encode_value(
            Kind::Completed,
            1,
            2,
            Fingerprint::from_bytes([5; 16]),
            b"resp",
            &mut v,
        );
        assert_eq!(
            decode(&k, &v).unwrap(),
            Item::Put {
                key: Key::new("scope", "id"),
                kind: Kind::Completed,
                a: 1,
                b: 2,
                fingerprint: Fingerprint::from_bytes([5; 16]),
                value: b"resp",
            }
        );
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 1;
            assert!(decode(&k, &bad).is_err(), "flip at {i}");
        }
        for cut in 0..v.len() {
            assert!(decode(&k, &v[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode(&[5, b'a'], &v).is_err());
        assert!(decode(&[], &v).is_err());
    }

    #[test]
    fn packed_entries_decode_sort_and_keep_one_per_key() {
        use crate::record::{NewRecord, Record};
        let rec = |value: &[u8]| {
            Record::new(NewRecord {
                kind: Kind::Completed,
                a: 7,
                b: 9,
                fingerprint: Fingerprint::from_bytes([1; 16]),
                key: Key::new("s", "x"),
                value,
            })
        };
        let mut p = Packed::default();
        p.push(Key::new("s", "b"), &rec(b"first"));
        p.push_key(Key::new("s", "a"));
        p.push_key(Key::new("s", "b"));
        p.push(Key::new("s", "c"), &rec(b"third"));
        p.sort_dedup();
        assert_eq!(p.len(), 3);
        assert_eq!(p.removals(), 1);
        let got: Vec<_> = p.iter().collect();
        assert_eq!(got[0], (&[1, b's', b'a'][..], None));
        assert_eq!(got[1].0, &[1, b's', b'b'][..]);
        assert_eq!(p.key(2), &[1, b's', b'c'][..]);
        // Values appended after others carry their own checksum.
        for (k, v) in p.iter() {
            if let Some(v) = v {
                assert!(matches!(decode(k, v), Ok(Item::Put { a: 7, b: 9, .. })));
            }
        }
    }
}
