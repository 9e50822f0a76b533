//! Reading the scripts' replies: status codes, integers, byte strings, record kinds and
//! snapshots, and the errors of the client and of an unexpected reply.
//!
//! Invariant: every function here is total over what Redis may answer: a malformed reply is an
//! `Error`, never a panic.

use super::*;

pub(super) fn unavailable(e: redis::RedisError) -> Error {
    Error::Unavailable {
        reason: e.to_string(),
        source: Some(crate::error::Cause::new(e)),
    }
}

/// Whether Redis answered the last command: a change is logged once, so an outage is one
/// `error` event and its end one `info` event, not one per failed request.
#[derive(Default)]
pub(super) struct Health {
    down: std::sync::atomic::AtomicBool,
}

/// A client result, with what it says about Redis's health noted.
pub(super) trait Observed<T> {
    /// The result as the store's error, noting an outage's start or end.
    fn observed(self, health: &Health) -> Result<T, Error>;
}

impl<T> Observed<T> for redis::RedisResult<T> {
    fn observed(self, health: &Health) -> Result<T, Error> {
        use std::sync::atomic::Ordering;
        match self {
            Ok(v) => {
                if health.down.load(Ordering::Relaxed) && health.down.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(target: "idemkv::redis", "Redis is reachable again");
                }
                Ok(v)
            }
            // A script error is Redis answering; only connection-level failures are an outage.
            Err(e)
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal() =>
            {
                if !health.down.swap(true, Ordering::Relaxed) {
                    tracing::error!(target: "idemkv::redis", error = %e, "Redis is unavailable; requests fail with Error::Unavailable until it answers again");
                }
                Err(unavailable(e))
            }
            Err(e) => Err(unavailable(e)),
        }
    }
}

pub(super) fn protocol(what: &str) -> Error {
    Error::Unavailable {
        reason: format!("unexpected reply from Redis: {what}"),
        source: None,
    }
}

/// A versioned write as the scripts take it: op (`a` put if absent, `s` set if version, `d`
/// delete if version), the expected version, the new value.
pub(super) fn cas_args(op: &CasOp) -> (&'static str, u64, &[u8]) {
    match op {
        CasOp::PutIfAbsent(v) => ("a", 0, v),
        CasOp::SetIfVersion { version, value } => ("s", *version, value),
        CasOp::DeleteIfVersion { version } => ("d", *version, &[]),
    }
}

/// `WAIT`'s answer: at least `replicas` have the change, or [`Error::Unavailable`] (the change
/// was made on the master and may or may not survive a failover).
pub(super) fn enough_replicas(
    waited: &Value,
    replicas: u32,
    timeout: Duration,
) -> Result<(), Error> {
    match (int_of(waited), waited) {
        (Some(n), _) if n >= i64::from(replicas) => Ok(()),
        (Some(n), _) => Err(Error::Unavailable {
            reason: format!(
                "the change reached {n} of {replicas} replicas within {timeout:?}: it may not survive a failover"
            ),
            source: None,
        }),
        (None, Value::ServerError(e)) => Err(unavailable(redis::RedisError::from(e.clone()))),
        (None, _) => Err(protocol("WAIT")),
    }
}

pub(super) fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

pub(super) fn code(reply: &[Value]) -> Result<i64, Error> {
    reply
        .first()
        .and_then(int_of)
        .ok_or_else(|| protocol("no status"))
}

pub(super) fn uint(reply: &[Value], i: usize) -> Result<u64, Error> {
    reply
        .get(i)
        .and_then(int_of)
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| protocol("expected a number"))
}

pub(super) fn opt_uint(reply: &[Value], i: usize) -> Result<Option<u64>, Error> {
    let v = reply
        .get(i)
        .and_then(int_of)
        .ok_or_else(|| protocol("expected a number"))?;
    Ok(u64::try_from(v).ok())
}

pub(super) fn bytes(reply: &[Value], i: usize) -> Result<Vec<u8>, Error> {
    match reply.get(i) {
        Some(Value::BulkString(b)) => Ok(b.clone()),
        Some(Value::SimpleString(s)) => Ok(s.clone().into_bytes()),
        Some(Value::Nil) | None => Ok(Vec::new()),
        Some(_) => Err(protocol("expected bytes")),
    }
}

pub(super) fn kind_from(k: &[u8]) -> RecordKind {
    match k {
        b"v" => RecordKind::Value,
        b"p" | b"ip" => RecordKind::Pending,
        _ => RecordKind::Idempotency,
    }
}

pub(super) fn wrong_kind(expected: RecordKind, reply: &[Value]) -> Error {
    match bytes(reply, 1) {
        Ok(k) => Error::WrongKind {
            expected,
            found: kind_from(&k),
        },
        Err(e) => e,
    }
}

pub(super) fn fingerprint_of(b: &[u8]) -> Fingerprint {
    <[u8; 16]>::try_from(b).map_or(Fingerprint::NONE, Fingerprint::from_bytes)
}

pub(super) fn snapshot_of(f: &HashMap<String, Vec<u8>>) -> Result<Option<Snapshot>, Error> {
    let Some(kind) = f.get("k") else {
        return Ok(None);
    };
    let num = |name: &str| -> Result<u64, Error> {
        f.get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| protocol("a record field is missing"))
    };
    let raw = |name: &str| f.get(name).cloned().unwrap_or_default();
    Ok(Some(match kind.as_slice() {
        b"i" | b"ip" => Snapshot::InFlight {
            token: num("t")?,
            deadline: Timestamp::from_millis(num("d")?),
            fingerprint: fingerprint_of(&raw("f")),
            pending: kind.as_slice() == b"ip",
        },
        b"c" => Snapshot::Completed(Completed {
            response: raw("r"),
            fingerprint: fingerprint_of(&raw("f")),
            completed_at: Timestamp::from_millis(num("ca")?),
            expires_at: Timestamp::from_millis(num("ea")?),
        }),
        b"p" => Snapshot::Pending {
            payload: raw("r"),
            expires_at: Timestamp::from_millis(num("ea")?),
        },
        b"v" => Snapshot::Value(Versioned {
            version: num("t")?,
            value: raw("r"),
            expires_at: match num("ea")? {
                0 => None,
                at => Some(Timestamp::from_millis(at)),
            },
        }),
        _ => return Err(protocol("unknown record kind")),
    }))
}
