//! The key layout on Redis: hash tags and Redis Cluster slots, and splitting a Redis key back
//! into scope and id.
//!
//! Invariant: a record and every key whose id shares its `{tag}` map to one slot.

/// The id of a key (after the prefix: `{tag}`, scope length, scope, id) if its scope is
/// `scope`. The tag is the id or a part of it, so it has no `}` of its own unless it is the
/// whole id; the length byte settles where the scope starts.
pub(super) fn split_key<'a>(rest: &'a [u8], scope: &[u8]) -> Option<&'a [u8]> {
    let rest = rest.strip_prefix(b"{")?;
    // Try every `}`: an id used whole as its own tag may contain braces.
    for (i, _) in rest.iter().enumerate().filter(|(_, b)| **b == b'}') {
        let after = &rest[i + 1..];
        let (&len, body) = after.split_first()?;
        let len = usize::from(len);
        if body.len() > len && &body[..len] == scope {
            let id = &body[len..];
            if hash_tag(id) == &rest[..i] {
                return Some(id);
            }
        }
    }
    None
}

/// Redis Cluster's hash tag rule: the bytes between the first `{` and the next `}`, if not
/// empty; otherwise the whole input. Applied to an id it gives the `{tag}` we build keys with;
/// applied to a whole key as sent it gives what the server hashes (the same, unless the
/// prefix or the id has braces of its own), which is what slot checks use.
pub(super) fn hash_tag(id: &[u8]) -> &[u8] {
    let Some(open) = id.iter().position(|&b| b == b'{') else {
        return id;
    };
    match id[open + 1..].iter().position(|&b| b == b'}') {
        Some(len) if len > 0 => &id[open + 1..open + 1 + len],
        _ => id,
    }
}

/// The cluster slot of a tag: CRC16/XMODEM mod 16384 (what Redis Cluster computes; our keys
/// always carry an explicit `{tag}`).
pub(super) fn slot(tag: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// `id` with the hash tag of `anchor` appended (`<id>{<tag>}`), so that a record under it lands
/// in the same Redis Cluster slot as a record under `anchor`, and the two can be written in
/// one completion batch. `None` when that cannot be done: `id` has a `{` of its own, or
/// `anchor`'s tag has a `}` (an anchor like `a}b` with no `{…}` is its own tag).
///
/// ```
/// let order = idemkv::redis::colocated_id("7d3f", "9b1c-retry-key").unwrap();
/// assert_eq!(order, "7d3f{9b1c-retry-key}");
/// assert_eq!(idemkv::redis::colocated_id("7d3f", "pay{o-17}").unwrap(), "7d3f{o-17}");
/// assert_eq!(idemkv::redis::colocated_id("x{y", "k"), None);
/// ```
pub fn colocated_id(id: &str, anchor: &str) -> Option<String> {
    let tag = hash_tag(anchor.as_bytes());
    if id.contains('{') || tag.contains(&b'}') {
        return None;
    }
    // The tag is bounded by ASCII braces (or is the whole anchor), so it is UTF-8.
    let tag = std::str::from_utf8(tag).ok()?;
    Some(format!("{id}{{{tag}}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_and_slots() {
        assert_eq!(hash_tag(b"order-17"), b"order-17");
        assert_eq!(hash_tag(b"pay{order-17}"), b"order-17");
        assert_eq!(hash_tag(b"{}x"), b"{}x");
        assert_eq!(hash_tag(b"a{b"), b"a{b");
        // Values from the Redis Cluster specification (CLUSTER KEYSLOT).
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"foo"), 12182);
        // An id `{}x` is its own tag; the key as sent then tags on `{`, as the server does.
        assert_eq!(hash_tag(b"idemkv:{{}x}\x01sx"), b"{");
        assert_eq!(hash_tag(b"idemkv:{o-1}\x06orderso-1"), b"o-1");
    }

    #[test]
    fn keys_split_back_into_scope_and_id() {
        let key = |scope: &[u8], id: &[u8]| {
            let mut k = b"{".to_vec();
            k.extend_from_slice(hash_tag(id));
            k.push(b'}');
            k.push(scope.len() as u8);
            k.extend_from_slice(scope);
            k.extend_from_slice(id);
            k
        };
        for (scope, id) in [
            (&b"orders"[..], &b"o-1"[..]),
            (b"orders", b"pay{o-1}x"),
            (b"s}", b"a}b"),
            (b"", b"{}"),
        ] {
            assert_eq!(
                split_key(&key(scope, id), scope),
                Some(id),
                "{scope:?} {id:?}"
            );
            assert_eq!(split_key(&key(scope, id), b"other"), None);
        }
    }
}
