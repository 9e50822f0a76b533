//! Keys (a scope plus the caller's key bytes) and request fingerprints.
//!
//! Invariant: two keys are equal only if both scope and id are; the scope is length-prefixed
//! wherever it is hashed or encoded, so no (scope, id) split can collide with another.

use std::fmt;

/// The longest scope the store accepts, in bytes (a hard limit of the record layout).
pub const MAX_SCOPE_LEN: usize = 255;
/// The longest key id any configuration can accept, in bytes (a hard limit of the record layout).
pub const MAX_ID_LEN: usize = u16::MAX as usize;

/// A borrowed key: a **scope** and the caller's key bytes (the **id**).
///
/// The scope is a first-class part of the key: two scopes' identical ids never meet. Put in it
/// whatever must separate callers — tenant, principal, endpoint. Equality is on both parts
/// (`("ab", "c")` and `("a", "bc")` are different keys).
///
/// ```
/// use idemkv::Key;
/// let k = Key::new("tenant-7/POST /orders", "8e03978e-40d5-43e8-bc93-6894a57f9324");
/// assert_eq!(k.scope(), b"tenant-7/POST /orders");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key<'a> {
    scope: &'a [u8],
    id: &'a [u8],
}

impl<'a> Key<'a> {
    /// A key from a scope and an id. Lengths are checked by the store, which answers with a
    /// typed error.
    pub fn new(
        scope: &'a (impl AsRef<[u8]> + ?Sized),
        id: &'a (impl AsRef<[u8]> + ?Sized),
    ) -> Self {
        Key {
            scope: scope.as_ref(),
            id: id.as_ref(),
        }
    }

    /// The scope bytes.
    pub fn scope(&self) -> &'a [u8] {
        self.scope
    }

    /// The id bytes.
    pub fn id(&self) -> &'a [u8] {
        self.id
    }

    /// An owned copy.
    pub fn to_owned(&self) -> OwnedKey {
        let len = self.scope.len() + self.id.len();
        let repr = if len <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..self.scope.len()].copy_from_slice(self.scope);
            buf[self.scope.len()..len].copy_from_slice(self.id);
            Repr::Inline {
                len: len as u8,
                buf,
            }
        } else {
            let mut bytes = Vec::with_capacity(len);
            bytes.extend_from_slice(self.scope);
            bytes.extend_from_slice(self.id);
            Repr::Heap(bytes.into_boxed_slice())
        };
        OwnedKey {
            repr,
            scope_len: self.scope.len(),
        }
    }
}

/// Keys up to this many bytes (scope + id) are kept inline in an [`OwnedKey`]: a lease on a
/// typical key (a UUID under a short scope) costs no allocation.
const INLINE: usize = 62;

#[derive(Clone)]
enum Repr {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Key({:?}, {:?})",
            String::from_utf8_lossy(self.scope),
            String::from_utf8_lossy(self.id)
        )
    }
}

/// An owned [`Key`], as carried by a [`Lease`](crate::Lease) or a batched write.
#[derive(Clone)]
pub struct OwnedKey {
    repr: Repr,
    scope_len: usize,
}

impl PartialEq for OwnedKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_key() == other.as_key()
    }
}

impl Eq for OwnedKey {}

impl std::hash::Hash for OwnedKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_key().hash(state);
    }
}

impl PartialOrd for OwnedKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OwnedKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (self.as_key(), other.as_key());
        (a.scope, a.id).cmp(&(b.scope, b.id))
    }
}

impl OwnedKey {
    /// An owned key from a scope and an id.
    pub fn new(scope: impl AsRef<[u8]>, id: impl AsRef<[u8]>) -> Self {
        Key::new(scope.as_ref(), id.as_ref()).to_owned()
    }

    /// Borrows it as a [`Key`].
    pub fn as_key(&self) -> Key<'_> {
        let bytes: &[u8] = match &self.repr {
            Repr::Inline { len, buf } => &buf[..*len as usize],
            Repr::Heap(b) => b,
        };
        let (scope, id) = bytes.split_at(self.scope_len);
        Key { scope, id }
    }
}

impl fmt::Debug for OwnedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_key().fmt(f)
    }
}

impl<'a> From<&'a OwnedKey> for Key<'a> {
    fn from(k: &'a OwnedKey) -> Self {
        k.as_key()
    }
}

/// A digest of a request, stored with its key so that reusing a key for a different request
/// is caught (`Begin::Mismatch`) instead of replaying the wrong response.
///
/// 128 bits. [`Fingerprint::of`] uses XXH3-128, a fixed, documented function, so fingerprints
/// computed before a restart still match after it. It is not a cryptographic hash: a client that
/// crafts two colliding payloads only ever gets its own earlier response back, because keys are
/// scoped per client. Supply your own bytes with [`Fingerprint::from_bytes`] if you need more.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    /// The fingerprint of records that have none (pending requests, plain values).
    pub const NONE: Fingerprint = Fingerprint([0; 16]);

    /// Wraps 16 bytes computed by the caller.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Fingerprint(bytes)
    }

    /// The XXH3-128 digest of `data`.
    ///
    /// ```
    /// use idemkv::Fingerprint;
    /// assert_eq!(Fingerprint::of(b"abc"), Fingerprint::of(b"abc"));
    /// assert_ne!(Fingerprint::of(b"abc"), Fingerprint::of(b"abd"));
    /// ```
    pub fn of(data: &[u8]) -> Self {
        Fingerprint(xxhash_rust::xxh3::xxh3_128(data).to_le_bytes())
    }

    /// [`of`](Self::of) the concatenation of `parts`, without building it (the same digest).
    #[cfg(feature = "http")]
    pub(crate) fn of_parts(parts: &[&[u8]]) -> Self {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for p in parts {
            h.update(p);
        }
        Fingerprint(h.digest128().to_le_bytes())
    }

    /// The 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fingerprint stored before the HTTP layer hashed its parts in a stream must still match.
    #[cfg(feature = "http")]
    #[test]
    fn a_fingerprint_of_parts_is_the_fingerprint_of_their_concatenation() {
        let body = vec![7u8; 1000];
        let parts: [&[u8]; 5] = [b"POST", b"\0", b"/orders?x=1", b"\0", &body];
        assert_eq!(
            Fingerprint::of_parts(&parts),
            Fingerprint::of(&parts.concat())
        );
        assert_eq!(Fingerprint::of_parts(&[]), Fingerprint::of(b""));
        assert_ne!(
            Fingerprint::of_parts(&[b"ab", b"c"]),
            Fingerprint::of_parts(&[b"ab", b"d"])
        );
    }

    #[test]
    fn scope_and_id_are_kept_apart() {
        let a = Key::new("ab", "c").to_owned();
        let b = Key::new("a", "bc").to_owned();
        assert_ne!(a, b);
        assert_eq!(a.as_key().scope(), b"ab");
        assert_eq!(b.as_key().id(), b"bc");
        assert_eq!(OwnedKey::new("ab", "c"), a);
        assert!(b < a);
    }

    #[test]
    fn long_keys_live_on_the_heap_and_compare_the_same() {
        let long = "x".repeat(100);
        let k = OwnedKey::new("scope", &long);
        assert!(matches!(k.repr, Repr::Heap(_)));
        assert_eq!(k.as_key().id(), long.as_bytes());
        assert_eq!(k.as_key().scope(), b"scope");
        let short = OwnedKey::new("scope", "x");
        assert!(matches!(short.repr, Repr::Inline { .. }));
        assert!(short < k);
        let edge = OwnedKey::new("s", "y".repeat(INLINE - 1));
        assert!(matches!(edge.repr, Repr::Inline { .. }));
        assert_eq!(edge.as_key().id().len(), INLINE - 1);
    }

    #[test]
    fn fingerprint_is_stable_across_processes() {
        // A fixed vector: if this changes, stored fingerprints stop matching after upgrade.
        let fp = Fingerprint::of(b"idemkv");
        assert_eq!(
            fp,
            Fingerprint::from_bytes(xxhash_rust::xxh3::xxh3_128(b"idemkv").to_le_bytes())
        );
        assert_eq!(
            format!("{:?}", Fingerprint::NONE),
            format!("Fingerprint({})", "00".repeat(16))
        );
    }
}
