//! For operators' tools, such as the `idemkv` command: read a store directory without
//! changing a byte of it, verify it, and describe what its records hold.
//!
//! Invariant: nothing here writes to the directory. A directory that a store has open is
//! refused with [`OpenError::Locked`] (naming the process when it can), because its files
//! change under the reader; read a stopped directory, or a copy taken while stopped.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::embedded::OpenError;
use crate::{OnCorruption, RecoveryReport, Store, StoreBuilder};

/// A store directory read into memory: changing [`DirCopy::store`] changes nothing on disk.
#[derive(Debug)]
#[non_exhaustive]
pub struct DirCopy {
    /// The records, in an in-memory store.
    pub store: Store,
    /// What recovery found; its torn tail, dropped damage and empty segments are what an open
    /// *would* cut and remove.
    pub report: RecoveryReport,
    /// The checkpoint database, if there is one.
    pub checkpoint: Option<CheckpointInfo>,
    /// The log segments and their sizes in bytes, oldest first.
    pub segments: Vec<(PathBuf, u64)>,
}

/// The checkpoint database of a directory.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CheckpointInfo {
    /// Its path.
    pub path: PathBuf,
    /// The log sequence number it covers.
    pub covers_seq: u64,
    /// The records it holds.
    pub records: u64,
    /// Its size in bytes.
    pub bytes: u64,
    /// When it was last written.
    pub modified: Option<SystemTime>,
}

/// Reads `dir` into memory, read-only (see the module docs). Damage in the middle of the log
/// fails with [`OpenError::Log`] naming the file and offset, as an open would.
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// let store = idemkv::Store::builder().open(dir.path())?;
/// let w = idemkv::Write::put_if_absent(idemkv::OwnedKey::new("s", "a"), "v");
/// let _ = store.blocking_cas(&w)?;
/// drop(store); // a directory a store holds is refused
///
/// let copy = idemkv::tools::read_dir(dir.path())?;
/// assert_eq!(copy.store.stats().records, 1);
/// assert_eq!(copy.report.records, 1); // from the log
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_dir(dir: impl AsRef<Path>) -> Result<DirCopy, OpenError> {
    read(dir.as_ref(), OnCorruption::Fail)
}

fn read(dir: &Path, on_corruption: OnCorruption) -> Result<DirCopy, OpenError> {
    let (store, loaded) = StoreBuilder::default()
        .on_corruption(on_corruption)
        .read_only_copy(dir)?;
    let report = store.recovery_report().cloned().unwrap_or_default();
    let path = dir.join("checkpoint.redb");
    let checkpoint = loaded.map(|l| {
        let meta = std::fs::metadata(&path).ok();
        CheckpointInfo {
            covers_seq: l.seq,
            records: l.records,
            bytes: meta.as_ref().map_or(0, std::fs::Metadata::len),
            modified: meta.and_then(|m| m.modified().ok()),
            path: path.clone(),
        }
    });
    let segments = crate::wal::segments::list(&dir.join("wal"))
        .unwrap_or_default()
        .into_iter()
        .map(|(_, p)| {
            let len = std::fs::metadata(&p).map_or(0, |m| m.len());
            (p, len)
        })
        .collect();
    Ok(DirCopy {
        store,
        report,
        checkpoint,
        segments,
    })
}

/// Damage that [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Damage {
    /// The damaged file.
    pub path: PathBuf,
    /// Where in it (the damaged batch of a log segment); `None` for a checkpoint record.
    pub offset: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// What [`verify`] found.
#[derive(Debug)]
#[non_exhaustive]
pub struct Verified {
    /// The directory's contents, when it could be read to the end.
    pub copy: Option<DirCopy>,
    /// The first damage found, if any. A torn tail is not damage: it is reported in
    /// `copy.report.torn_tail`, and left as it is.
    pub damage: Option<Damage>,
}

/// Checks every record of the checkpoint and every batch of the log (crc32, framing,
/// sequence), read-only. Damage is returned in [`Verified::damage`]; other failures (the
/// directory in use, unreadable files) are errors.
pub fn verify(dir: impl AsRef<Path>) -> Result<Verified, OpenError> {
    match read(dir.as_ref(), OnCorruption::Fail) {
        Ok(copy) => Ok(Verified {
            copy: Some(copy),
            damage: None,
        }),
        Err(OpenError::Log(crate::LogError::Corrupt {
            path,
            offset,
            reason,
        })) => Ok(Verified {
            copy: None,
            damage: Some(Damage {
                path,
                offset: Some(offset),
                reason,
            }),
        }),
        Err(OpenError::Checkpoint(crate::checkpoint::CheckpointError::Corrupt {
            path,
            key,
            reason,
        })) => Ok(Verified {
            copy: None,
            damage: Some(Damage {
                path,
                offset: None,
                reason: format!("{reason} (record key {})", String::from_utf8_lossy(&key)),
            }),
        }),
        Err(e) => Err(e),
    }
}

/// A stored HTTP response, as [`decode_http_response`] reads it.
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredHttp {
    /// The status.
    pub status: u16,
    /// The headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body's length; `None` when it was too large to keep.
    pub body_len: Option<usize>,
}

/// A stored HTTP response (from the idempotency layer or `ExactlyOnce`), decoded. `None` if
/// the bytes are not one.
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub fn decode_http_response(bytes: &[u8]) -> Option<StoredHttp> {
    let s = crate::http::stored::decode(bytes)?;
    let headers = s
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    Some(StoredHttp {
        status: s.status.as_u16(),
        headers,
        body_len: s.body.map(|b| b.len()),
    })
}
