//! What the `Idempotency-Key` layer reads from a request: the key header's value, `Prefer:
//! wait`, the credentials and the scope they digest into, and the default fingerprint. Pure
//! functions of the request; the layer (`idempotency.rs`) decides what to do with them.

use std::time::Duration;

use http::HeaderMap;
use http::request::Parts;
use sha2::Digest;

use crate::Fingerprint;

/// `bytes` in lowercase hex (a digest for logs).
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out.into_iter().map(char::from).collect()
}

/// The request's credentials as digest input: every `Authorization` and `Cookie` value, in
/// order (HTTP/2 may split cookies over several fields); `None` when it carries neither.
pub(crate) fn credentials(parts: &Parts) -> Option<Vec<u8>> {
    let mut material = Vec::new();
    for (tag, name) in [
        (b'a', http::header::AUTHORIZATION),
        (b'c', http::header::COOKIE),
    ] {
        for v in parts.headers.get_all(name) {
            material.push(tag);
            material.extend_from_slice(&(v.len() as u64).to_be_bytes());
            material.extend_from_slice(v.as_bytes());
        }
    }
    (!material.is_empty()).then_some(material)
}

/// Method, path, and a digest of who is asking (`-` for nobody); hashed if over 255 bytes.
/// Built into one buffer (no `format!`, no intermediate strings).
pub(crate) fn scoped(parts: &Parts, who: Option<&[u8]>) -> Vec<u8> {
    let method = parts.method.as_str().as_bytes();
    let path = parts.uri.path().as_bytes();
    let mut scope = Vec::with_capacity(method.len() + path.len() + 34);
    scope.extend_from_slice(method);
    scope.push(b' ');
    scope.extend_from_slice(path);
    scope.push(b' ');
    match who {
        Some(m) => push_hex(&mut scope, &sha2::Sha256::digest(m)[..16]),
        None => scope.push(b'-'),
    }
    if scope.len() <= crate::MAX_SCOPE_LEN {
        scope
    } else {
        let mut hashed = b"h:".to_vec();
        push_hex(&mut hashed, &sha2::Sha256::digest(&scope));
        hashed
    }
}

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
}

/// Method, path and query, content type and body, separated by zero bytes, digested as one
/// string without being copied into one.
pub(crate) fn default_fingerprint(parts: &Parts, body: &[u8]) -> Fingerprint {
    let target = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let ct = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .map_or(&[][..], |v| v.as_bytes());
    Fingerprint::of_parts(&[
        parts.method.as_str().as_bytes(),
        b"\0",
        target.as_bytes(),
        b"\0",
        ct,
        b"\0",
        body,
    ])
}

/// One key header's value: unquoted (the IETF draft's form), 1–255 visible ASCII characters,
/// a UUID if `uuid_only`.
pub(crate) fn parse_key(raw: &[u8], uuid_only: bool) -> Result<String, String> {
    let raw = match raw {
        [b'"', inner @ .., b'"'] => inner,
        other => other,
    };
    if raw.is_empty() || raw.len() > 255 {
        return Err(format!(
            "the key must be 1 to 255 characters, not {}",
            raw.len()
        ));
    }
    if !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err("the key must be visible ASCII characters only".into());
    }
    let key = String::from_utf8_lossy(raw).into_owned();
    if uuid_only && !is_uuid(&key) {
        return Err("the key must be a UUID".into());
    }
    Ok(key)
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `Prefer: wait=N` (RFC 7240), capped at 60 s.
pub(crate) fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix("wait="))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .map(|n| Duration::from_secs(n.min(60)))
        .next()
}
