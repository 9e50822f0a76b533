//! One record = one heap allocation: a 40-byte header followed by the scope, the id and the
//! value bytes. The shard's hash table holds only the 8-byte thin pointer.
//!
//! Invariant: a `Record` owns exactly one allocation, whose layout only this module knows;
//! every `unsafe` block states why it is sound, and Miri runs the tests.
//!
//! This is the one module with `unsafe` code. It exists for memory: a `Box<[u8]>` per part plus
//! a header inline in the table would cost more than 100 bytes a record at the table's typical
//! load; a thin pointer to a single block costs the header plus about 9 / load bytes of table.
//!
//! ```text
//! offset  size  field
//!      0     8  a        token (in flight) | completed-at | created-at (pending) | version (value)
//!      8     8  b        lease deadline | expires-at (u64::MAX = never)
//!     16    16  fingerprint
//!     32     4  value_len
//!     36     2  id_len
//!     38     1  scope_len
//!     39     1  kind
//!     40     …  scope bytes, id bytes, value bytes
//! ```
//! This is the in-memory layout only; the on-disk format is separate and explicit.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::key::{Fingerprint, Key};

/// What a record is; stored in the header's `kind` byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// Held by a lease from `begin`. a = token, b = lease deadline.
    InFlight = 1,
    /// Held by a lease from `take_pending`; the value is the stored request payload, kept so
    /// that a release puts the request back. a = token, b = lease deadline.
    InFlightPending = 2,
    /// Done. a = completed-at, b = expires-at, value = response.
    Completed = 3,
    /// A stored request waiting to be taken. a = created-at, b = expires-at, value = payload.
    Pending = 4,
    /// A versioned value. a = version, b = expires-at, value = bytes.
    Value = 5,
}

#[repr(C)]
#[derive(Debug)]
pub(crate) struct Header {
    pub(crate) a: u64,
    pub(crate) b: u64,
    pub(crate) fingerprint: Fingerprint,
    value_len: u32,
    id_len: u16,
    scope_len: u8,
    kind: Kind,
}

/// Bytes of header in front of every record's data.
pub(crate) const HEADER_SIZE: usize = std::mem::size_of::<Header>();
const ALIGN: usize = std::mem::align_of::<Header>();
const _: () = assert!(
    HEADER_SIZE == 40,
    "the record header is documented as 40 bytes"
);

/// An owned record: a thin pointer to `Header` followed by its data.
pub(crate) struct Record {
    ptr: NonNull<Header>,
}

// SAFETY: `Record` owns its allocation exclusively (like `Box`), and the header and bytes are
// plain data with no interior mutability, so moving it to or sharing it with another thread is
// as safe as for a `Box<[u8]>`.
unsafe impl Send for Record {}
// SAFETY: as above; `&Record` only gives shared, read-only access.
unsafe impl Sync for Record {}

fn layout_for(data_len: usize) -> Layout {
    // Lengths are bounded by the header's field widths (255 + 65535 + u32::MAX bytes), far
    // below `isize::MAX` on 64-bit targets, so the layout is always valid there.
    match Layout::from_size_align(HEADER_SIZE + data_len, ALIGN) {
        Ok(l) => l,
        Err(_) => panic!("record of {data_len} bytes exceeds the address space"),
    }
}

/// Parts of a new record.
pub(crate) struct NewRecord<'a> {
    pub(crate) kind: Kind,
    pub(crate) a: u64,
    pub(crate) b: u64,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) key: Key<'a>,
    pub(crate) value: &'a [u8],
}

impl Record {
    /// Allocates a record. Callers have checked the lengths against the layout's limits.
    pub(crate) fn new(parts: NewRecord<'_>) -> Record {
        let scope = parts.key.scope();
        let id = parts.key.id();
        debug_assert!(scope.len() <= u8::MAX as usize && id.len() <= u16::MAX as usize);
        debug_assert!(u32::try_from(parts.value.len()).is_ok());
        let header = Header {
            a: parts.a,
            b: parts.b,
            fingerprint: parts.fingerprint,
            value_len: parts.value.len() as u32,
            id_len: id.len() as u16,
            scope_len: scope.len() as u8,
            kind: parts.kind,
        };
        let layout = layout_for(scope.len() + id.len() + parts.value.len());
        // SAFETY: the layout has non-zero size (at least the 40-byte header).
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<Header>()) else {
            alloc::handle_alloc_error(layout)
        };
        // SAFETY: `ptr` is a fresh allocation of `layout.size()` bytes aligned for `Header`;
        // the header and the three byte ranges written below lie inside it and do not overlap
        // each other or the source slices (which the caller owns elsewhere).
        unsafe {
            ptr.as_ptr().write(header);
            let data = raw.add(HEADER_SIZE);
            std::ptr::copy_nonoverlapping(scope.as_ptr(), data, scope.len());
            let data = data.add(scope.len());
            std::ptr::copy_nonoverlapping(id.as_ptr(), data, id.len());
            let data = data.add(id.len());
            std::ptr::copy_nonoverlapping(parts.value.as_ptr(), data, parts.value.len());
        }
        Record { ptr }
    }

    pub(crate) fn header(&self) -> &Header {
        // SAFETY: `ptr` points to an initialised header we own for as long as `self` lives.
        unsafe { self.ptr.as_ref() }
    }

    pub(crate) fn header_mut(&mut self) -> &mut Header {
        // SAFETY: as in `header`, and `&mut self` makes the access exclusive. The length fields
        // are private to this module, so callers cannot make them disagree with the allocation.
        unsafe { self.ptr.as_mut() }
    }

    /// Asks the processor to start loading the record's first bytes (its header and, for short
    /// keys, its key) into the cache, without waiting for them: a hint, which changes no state.
    /// Used where many records are about to be read in an order that is random in memory.
    #[inline]
    pub(crate) fn prefetch(&self) {
        #[cfg(all(target_arch = "x86_64", target_feature = "sse", not(miri)))]
        // SAFETY: `_mm_prefetch` is a hint: it reads nothing architecturally and cannot fault,
        // even on an invalid address (ours is a live allocation anyway). Its only requirement,
        // the `sse` target feature, is checked by the `cfg` above (it is part of x86-64's
        // baseline).
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(self.ptr.as_ptr().cast::<i8>());
        }
    }

    pub(crate) fn kind(&self) -> Kind {
        self.header().kind
    }

    pub(crate) fn set_kind(&mut self, kind: Kind) {
        self.header_mut().kind = kind;
    }

    fn key_len(&self) -> usize {
        let h = self.header();
        h.scope_len as usize + h.id_len as usize
    }

    fn data_len(&self) -> usize {
        self.key_len() + self.header().value_len as usize
    }

    fn data(&self) -> &[u8] {
        // SAFETY: the allocation holds `HEADER_SIZE + data_len()` initialised bytes (written in
        // `new` or `set_value`), and the lengths in the header always describe it.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().cast::<u8>().add(HEADER_SIZE),
                self.data_len(),
            )
        }
    }

    pub(crate) fn scope(&self) -> &[u8] {
        &self.data()[..self.header().scope_len as usize]
    }

    pub(crate) fn id(&self) -> &[u8] {
        &self.data()[self.header().scope_len as usize..self.key_len()]
    }

    pub(crate) fn key(&self) -> Key<'_> {
        Key::new(self.scope(), self.id())
    }

    pub(crate) fn value(&self) -> &[u8] {
        &self.data()[self.key_len()..]
    }

    pub(crate) fn matches(&self, key: Key<'_>) -> bool {
        self.scope() == key.scope() && self.id() == key.id()
    }

    /// Bytes this record accounts for: its whole allocation.
    pub(crate) fn size(&self) -> usize {
        HEADER_SIZE + self.data_len()
    }

    /// Bytes a record of this key and value would account for.
    pub(crate) fn size_for(key: Key<'_>, value_len: usize) -> usize {
        HEADER_SIZE + key.scope().len() + key.id().len() + value_len
    }

    /// Replaces the value bytes. A new block is allocated and the old one freed (rather than
    /// `realloc`): the freed block is exactly the size the next in-flight record of a similar
    /// key needs, so allocators hand it straight back from their per-thread cache.
    pub(crate) fn set_value(&mut self, value: &[u8]) {
        if value.len() == self.value().len() {
            // SAFETY: the value bytes lie inside our allocation (see `data`), `value` has the
            // same length and cannot alias them because we hold `&mut self`.
            unsafe {
                let dst = self
                    .ptr
                    .as_ptr()
                    .cast::<u8>()
                    .add(HEADER_SIZE + self.key_len());
                std::ptr::copy_nonoverlapping(value.as_ptr(), dst, value.len());
            }
            return;
        }
        let h = self.header();
        let new = Record::new(NewRecord {
            kind: h.kind,
            a: h.a,
            b: h.b,
            fingerprint: h.fingerprint,
            key: self.key(),
            value,
        });
        *self = new;
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let layout = layout_for(self.data_len());
        // SAFETY: `ptr` was allocated (or last reallocated) with exactly this layout, and is
        // never used again.
        unsafe { alloc::dealloc(self.ptr.as_ptr().cast::<u8>(), layout) }
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("key", &self.key())
            .field("kind", &self.kind())
            .field("a", &self.header().a)
            .field("b", &self.header().b)
            .field("value_len", &self.value().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    //! These tests exercise every unsafe block; `cargo +nightly miri test record::` runs them
    //! under Miri in CI.
    use super::*;

    fn rec(scope: &str, id: &str, value: &[u8]) -> Record {
        Record::new(NewRecord {
            kind: Kind::Completed,
            a: 7,
            b: 9,
            fingerprint: Fingerprint::from_bytes([3; 16]),
            key: Key::new(scope, id),
            value,
        })
    }

    #[test]
    fn round_trips_parts() {
        let r = rec("scope", "id-1", b"hello");
        assert_eq!(r.scope(), b"scope");
        assert_eq!(r.id(), b"id-1");
        assert_eq!(r.value(), b"hello");
        assert_eq!(r.kind(), Kind::Completed);
        assert_eq!(r.header().a, 7);
        assert_eq!(r.header().b, 9);
        assert_eq!(r.size(), HEADER_SIZE + 5 + 4 + 5);
        assert!(r.matches(Key::new("scope", "id-1")));
        assert!(!r.matches(Key::new("scop", "eid-1")));
    }

    #[test]
    fn empty_parts_and_resizing() {
        let mut r = rec("", "k", b"");
        assert_eq!(r.value(), b"");
        r.set_value(&[1u8; 1000]);
        assert_eq!(r.value(), &[1u8; 1000][..]);
        assert_eq!(r.id(), b"k");
        r.set_value(b"ab");
        assert_eq!(r.value(), b"ab");
        r.set_value(b"cd");
        assert_eq!(r.value(), b"cd");
        r.set_kind(Kind::Value);
        r.header_mut().a = 42;
        assert_eq!((r.kind(), r.header().a), (Kind::Value, 42));
        assert_eq!(r.scope(), b"");
    }

    #[test]
    fn records_move_between_threads() {
        let r = rec("s", "i", b"v");
        let r = std::thread::spawn(move || {
            assert_eq!(r.value(), b"v");
            r
        })
        .join()
        .expect("thread");
        assert!(format!("{r:?}").contains("Completed"));
    }
}
