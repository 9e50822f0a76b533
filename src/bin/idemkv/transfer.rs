//! The commands that move records in and out of a data directory: `dump` (JSON lines),
//! `restore` (from a dump, skipping keys that hold something), and `migrate` (into Redis,
//! feature `redis`).

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use idemkv::{Begin, Fingerprint, IdempotencyStore, Key, PutPending, Snapshot, Store};

use super::{Fail, hex, kind, now_ms, unhex};

/// Dump format version.
const DUMP_FORMAT: u64 = 1;

fn progress(len: Option<u64>, what: &'static str) -> indicatif::ProgressBar {
    // Drawn on stderr, and only when it is a terminal.
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_message(what);
    bar
}

pub(super) fn dump(dir: &Path, out: &mut impl Write) -> Result<(), Fail> {
    let copy = idemkv::tools::read_dir(dir)?;
    let now = now_ms();
    let header = serde_json::json!({"format": "idemkv-dump", "version": DUMP_FORMAT, "at_ms": now});
    writeln!(out, "{header}")?;
    let bar = progress(Some(copy.store.stats().records), "dumping");
    let mut err = None;
    copy.store.for_each_record(|key, snap| {
        if err.is_some() {
            return;
        }
        bar.inc(1);
        let ttl = |t: u64| t.saturating_sub(now);
        let mut v = serde_json::json!({
            "scope": B64.encode(key.scope()),
            "id": B64.encode(key.id()),
            "kind": kind(&snap),
        });
        match &snap {
            Snapshot::Completed(c) => {
                v["fingerprint"] = hex(c.fingerprint.as_bytes()).into();
                v["value"] = B64.encode(&c.response).into();
                v["ttl_ms"] = ttl(c.expires_at.as_millis()).into();
            }
            Snapshot::Pending {
                payload,
                expires_at,
            } => {
                v["value"] = B64.encode(payload).into();
                v["ttl_ms"] = ttl(expires_at.as_millis()).into();
            }
            Snapshot::Value(x) => {
                v["value"] = B64.encode(&x.value).into();
                v["version"] = x.version.into();
                if let Some(t) = x.expires_at {
                    v["ttl_ms"] = ttl(t.as_millis()).into();
                }
            }
            Snapshot::InFlight {
                token,
                deadline,
                fingerprint,
                ..
            } => {
                v["token"] = (*token).into();
                v["fingerprint"] = hex(fingerprint.as_bytes()).into();
                v["ttl_ms"] = ttl(deadline.as_millis()).into();
            }
        }
        err = writeln!(out, "{v}").err();
    });
    bar.finish_and_clear();
    err.map_or(Ok(()), |e| Err(e.into()))
}

/// What `restore` and `migrate` did with the records.
#[derive(Default)]
struct Restored {
    completed: u64,
    pending: u64,
    values: u64,
    skipped_in_flight: u64,
    already_there: u64,
}

/// One record to put into a store: from a dump line (`restore`) or a directory (`migrate`).
struct Item {
    scope: Vec<u8>,
    id: Vec<u8>,
    /// What is left of its time; `None`: the store's default (values: never expires).
    ttl: Option<Duration>,
    what: What,
}

enum What {
    Completed {
        fingerprint: Fingerprint,
        response: Vec<u8>,
    },
    Pending(Vec<u8>),
    Value {
        value: Vec<u8>,
        version: u64,
    },
    /// A lease: not carried (its holder is gone; a retry runs the work).
    InFlight,
}

/// Where `load` puts values: the embedded store keeps their versions, Redis assigns its own.
trait Target: IdempotencyStore {
    fn put_value(
        &self,
        key: Key<'_>,
        value: &[u8],
        version: u64,
        ttl: Option<Duration>,
    ) -> impl std::future::Future<Output = Result<bool, idemkv::Error>>;
}

impl Target for Store {
    async fn put_value(
        &self,
        key: Key<'_>,
        value: &[u8],
        version: u64,
        ttl: Option<Duration>,
    ) -> Result<bool, idemkv::Error> {
        self.restore_value(key, value, version, ttl)
    }
}

#[cfg(feature = "redis")]
impl Target for idemkv::redis::RedisStore {
    async fn put_value(
        &self,
        key: Key<'_>,
        value: &[u8],
        _version: u64,
        ttl: Option<Duration>,
    ) -> Result<bool, idemkv::Error> {
        let mut w = idemkv::Write::put_if_absent(key.to_owned(), value);
        w.ttl = ttl;
        Ok(matches!(
            self.cas(&w).await?,
            idemkv::CasOutcome::Applied { .. }
        ))
    }
}

/// Puts every item into `store`, leaving keys that already hold something alone (so a
/// restore or migration can be re-run), skipping leases and records whose time ran out.
async fn load<T: Target>(
    store: &T,
    items: impl Iterator<Item = Result<Item, Fail>>,
    bar: &indicatif::ProgressBar,
) -> Result<Restored, Fail> {
    let mut r = Restored::default();
    for item in items {
        let item = item?;
        bar.inc(1);
        if item.ttl.is_some_and(|t| t.is_zero()) {
            continue;
        }
        if let What::InFlight = item.what {
            r.skipped_in_flight += 1;
            continue;
        }
        let key = Key::new(&item.scope, &item.id);
        if store.get(key).await?.is_some() {
            r.already_there += 1;
            continue;
        }
        let put = match item.what {
            What::Completed {
                fingerprint,
                response,
            } => match store
                .begin(key, fingerprint, Duration::from_secs(60))
                .await?
            {
                Begin::Acquired(lease) => {
                    store.complete(&lease, &response, item.ttl, &[]).await?;
                    Some(&mut r.completed)
                }
                _ => None,
            },
            What::Pending(payload) => match store.put_pending(key, &payload, item.ttl).await? {
                PutPending::Stored => Some(&mut r.pending),
                _ => None,
            },
            What::Value { value, version } => store
                .put_value(key, &value, version, item.ttl)
                .await?
                .then_some(&mut r.values),
            What::InFlight => None,
        };
        match put {
            Some(n) => *n += 1,
            None => r.already_there += 1,
        }
    }
    Ok(r)
}

fn runtime() -> Result<tokio::runtime::Runtime, Fail> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// One dump line as an item.
fn parse_line(n: usize, line: &str) -> Result<Item, Fail> {
    let bad = |why: &str| Fail(5, format!("dump line {n}: {why}"));
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
    let b64 = |field: &str| -> Result<Vec<u8>, Fail> {
        let s = v[field]
            .as_str()
            .ok_or_else(|| bad(&format!("no {field}")))?;
        B64.decode(s).map_err(|e| bad(&format!("{field}: {e}")))
    };
    let what = match v["kind"].as_str() {
        Some("completed") => What::Completed {
            fingerprint: v["fingerprint"]
                .as_str()
                .and_then(unhex)
                .map(Fingerprint::from_bytes)
                .ok_or_else(|| bad("bad fingerprint"))?,
            response: b64("value")?,
        },
        Some("pending") => What::Pending(b64("value")?),
        Some("value") => What::Value {
            value: b64("value")?,
            version: v["version"].as_u64().ok_or_else(|| bad("no version"))?,
        },
        Some("in-flight" | "in-flight-pending") => What::InFlight,
        _ => return Err(bad("unknown kind")),
    };
    Ok(Item {
        scope: b64("scope")?,
        id: b64("id")?,
        ttl: v["ttl_ms"].as_u64().map(Duration::from_millis),
        what,
    })
}

pub(super) fn restore(dir: &Path, out: &mut impl Write) -> Result<(), Fail> {
    let store = Store::builder().sweep_interval(None).open(dir)?;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let bad = |why: &str| Fail(5, format!("dump line 1: {why}"));
    let header = lines.next().ok_or_else(|| bad("empty input"))??;
    let header: serde_json::Value =
        serde_json::from_str(&header).map_err(|e| bad(&e.to_string()))?;
    if header["format"] != "idemkv-dump" || header["version"].as_u64() != Some(DUMP_FORMAT) {
        return Err(bad("not an idemkv-dump of version 1"));
    }
    let items = lines.enumerate().filter_map(|(i, line)| match line {
        Ok(l) if l.trim().is_empty() => None,
        Ok(l) => Some(parse_line(i + 2, &l)),
        Err(e) => Some(Err(e.into())),
    });
    let bar = progress(None, "restoring");
    let r = runtime()?.block_on(load(&store, items, &bar))?;
    bar.finish_and_clear();
    writeln!(
        out,
        "restored {} completed, {} pending, {} values; {} already present; {} in-flight leases not restored",
        r.completed, r.pending, r.values, r.already_there, r.skipped_in_flight
    )?;
    Ok(())
}

#[cfg(not(feature = "redis"))]
pub(super) fn migrate(_: &Path, _: &str, _: &str, _: &mut impl Write) -> Result<(), Fail> {
    Err(Fail(
        2,
        "migrate needs the redis feature: cargo run --features cli,redis --bin idemkv -- migrate …"
            .into(),
    ))
}

/// Completed responses, stored requests and values go to Redis with their remaining TTLs (and
/// fingerprints); in-flight leases are not carried (their work runs again on retry). Keys that
/// already hold something in Redis are left alone, so a migration can be re-run. Redis
/// assigns its own versions to values.
#[cfg(feature = "redis")]
pub(super) fn migrate(
    dir: &Path,
    to: &str,
    prefix: &str,
    out: &mut impl Write,
) -> Result<(), Fail> {
    let copy = idemkv::tools::read_dir(dir)?;
    let now = now_ms();
    // At least 1 ms: a record live when read is carried, however little time it has left.
    let left = |t: u64| Some(Duration::from_millis(t.saturating_sub(now).max(1)));
    let mut items = Vec::new();
    copy.store.for_each_record(|key, snap| {
        let (ttl, what) = match snap {
            Snapshot::Completed(c) => (
                left(c.expires_at.as_millis()),
                What::Completed {
                    fingerprint: c.fingerprint,
                    response: c.response,
                },
            ),
            Snapshot::Pending {
                payload,
                expires_at,
            } => (left(expires_at.as_millis()), What::Pending(payload)),
            Snapshot::Value(v) => (
                v.expires_at.and_then(|t| left(t.as_millis())),
                What::Value {
                    value: v.value,
                    version: v.version,
                },
            ),
            Snapshot::InFlight { .. } => (None, What::InFlight),
        };
        items.push(Ok(Item {
            scope: key.scope().to_vec(),
            id: key.id().to_vec(),
            ttl,
            what,
        }));
    });
    let bar = progress(Some(items.len() as u64), "migrating");
    let r = runtime()?.block_on(async {
        let redis = idemkv::redis::RedisStore::builder(to)
            .prefix(prefix)
            .connect()
            .await?;
        load(&redis, items.into_iter(), &bar).await
    })?;
    bar.finish_and_clear();
    writeln!(
        out,
        "migrated {} completed, {} pending, {} values; {} already present; {} in-flight leases not carried",
        r.completed, r.pending, r.values, r.already_there, r.skipped_in_flight
    )?;
    Ok(())
}
