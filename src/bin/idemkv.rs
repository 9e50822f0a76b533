//! `idemkv`: look inside and repair an idemkv data directory.
//!
//! `cargo run --release --features cli --bin idemkv -- <command>`; `--help` on any command.
//!
//! Reading commands (`stats`, `verify`, `inspect`, `list`, `dump`) never change the directory:
//! they read it through `idemkv::tools` (a shared lock, redb's read-only mode, the log replayed
//! with nothing cut). A directory a running store has open is refused, naming its process.
//! Writing commands (`evict`, `restore`) open it as a store, so they are refused the same way.
//!
//! Exit codes: 0 done; 1 `verify` found damage; 2 bad usage; 3 the key was not found
//! (`inspect`, `evict`); 4 the directory is in use by a running store; 5 any other failure
//! (I/O, an unreadable dump line).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
#[path = "idemkv/transfer.rs"]
mod transfer;

use transfer::{dump, migrate, restore};

use idemkv::{Clock, Key, OpenError, Snapshot, Store, SystemClock};

#[derive(Parser)]
#[command(
    name = "idemkv",
    version,
    about = "Look inside and repair an idemkv data directory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Records, bytes, in-flight leases, log segments, the last checkpoint.
    Stats {
        /// The data directory.
        dir: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Checks the checkpoint and every log batch, read-only; exit 1 naming any damage.
    Verify {
        /// The data directory.
        dir: PathBuf,
    },
    /// One record: state, token, deadline, expiry, fingerprint, response.
    Inspect {
        /// The data directory.
        dir: PathBuf,
        /// The key's scope.
        #[arg(long)]
        scope: String,
        /// The key's id.
        key: String,
    },
    /// Streams records, one per line.
    List {
        /// The data directory.
        dir: PathBuf,
        /// Only this scope.
        #[arg(long)]
        scope: Option<String>,
        /// Only records held by a lease.
        #[arg(long)]
        in_flight: bool,
        /// At most this many lines.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Removes one record, durably.
    Evict {
        /// The data directory.
        dir: PathBuf,
        /// The key's scope.
        #[arg(long)]
        scope: String,
        /// The key's id.
        key: String,
    },
    /// Every live record as JSON lines on stdout (format `idemkv-dump` 1, bytes in base64,
    /// remaining TTLs).
    Dump {
        /// The data directory.
        dir: PathBuf,
    },
    /// Loads a dump from stdin into the directory (created if absent).
    Restore {
        /// The data directory.
        dir: PathBuf,
    },
    /// Copies the live records into Redis with their remaining TTLs (built with
    /// `--features cli,redis`).
    Migrate {
        /// The data directory.
        dir: PathBuf,
        /// The Redis URL (`redis://host:port/db`, `rediss://…`).
        #[arg(long)]
        to: String,
        /// The key prefix the Redis store uses (`RedisStoreBuilder::prefix`).
        #[arg(long, default_value = "idemkv:")]
        prefix: String,
    },
}

/// A failure, with its exit code.
struct Fail(u8, String);

impl From<OpenError> for Fail {
    fn from(e: OpenError) -> Self {
        let code = if matches!(e, OpenError::Locked { .. }) {
            4
        } else {
            5
        };
        Fail(code, e.to_string())
    }
}

impl From<idemkv::Error> for Fail {
    fn from(e: idemkv::Error) -> Self {
        Fail(5, e.to_string())
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail(5, e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let done = match cli.command {
        Command::Stats { dir, json } => stats(&dir, json, &mut out),
        Command::Verify { dir } => verify(&dir, &mut out),
        Command::Inspect { dir, scope, key } => inspect(&dir, &scope, &key, &mut out),
        Command::List {
            dir,
            scope,
            in_flight,
            limit,
        } => list(&dir, scope.as_deref(), in_flight, limit, &mut out),
        Command::Evict { dir, scope, key } => evict(&dir, &scope, &key, &mut out),
        Command::Dump { dir } => dump(&dir, &mut out),
        Command::Restore { dir } => restore(&dir, &mut out),
        Command::Migrate { dir, to, prefix } => migrate(&dir, &to, &prefix, &mut out),
    };
    let flushed = out.flush();
    match (done, flushed) {
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
        (Err(Fail(code, why)), _) => {
            eprintln!("idemkv: {why}");
            ExitCode::from(code)
        }
        (Ok(()), Err(e)) => {
            eprintln!("idemkv: writing the output: {e}");
            ExitCode::from(5)
        }
    }
}

fn now_ms() -> u64 {
    SystemClock.now().as_millis()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    if s.len() != 32 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn kind(s: &Snapshot) -> &'static str {
    match s {
        Snapshot::InFlight { pending: false, .. } => "in-flight",
        Snapshot::InFlight { pending: true, .. } => "in-flight-pending",
        Snapshot::Completed(_) => "completed",
        Snapshot::Pending { .. } => "pending",
        Snapshot::Value(_) => "value",
    }
}

/// "12.3s", "-4.0s" (past), or "never".
fn until(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(t) => format!("{:.1}s", (t as f64 - now_ms() as f64) / 1000.0),
    }
}

fn stats(dir: &Path, json: bool, out: &mut impl Write) -> Result<(), Fail> {
    let copy = idemkv::tools::read_dir(dir)?;
    let s = copy.store.stats();
    // In flight: the store's own count (kept by every change, recovery's replay included).
    let in_flight = s.in_flight;
    let (mut completed, mut pending, mut values) = (0u64, 0u64, 0u64);
    copy.store.for_each_record(|_, snap| match snap {
        Snapshot::InFlight { .. } => {}
        Snapshot::Completed(_) => completed += 1,
        Snapshot::Pending { .. } => pending += 1,
        _ => values += 1,
    });
    let seg_bytes: u64 = copy.segments.iter().map(|(_, b)| b).sum();
    let ckpt = copy.checkpoint.as_ref();
    let ckpt_age = ckpt
        .and_then(|c| c.modified)
        .and_then(|m| m.elapsed().ok())
        .map(|d| d.as_secs());
    let torn = copy.report.torn_tail.as_ref();
    if json {
        let v = serde_json::json!({
            "records": s.records,
            "bytes": s.bytes,
            "in_flight": in_flight,
            "completed": completed,
            "pending": pending,
            "values": values,
            "segments": copy.segments.len(),
            "segment_bytes": seg_bytes,
            "log_records_after_checkpoint": copy.report.records,
            "checkpoint": ckpt.map(|c| serde_json::json!({
                "covers_seq": c.covers_seq,
                "records": c.records,
                "bytes": c.bytes,
                "age_secs": ckpt_age,
            })),
            "torn_tail": torn.map(|t| serde_json::json!({
                "path": t.path.display().to_string(), "offset": t.offset, "bytes": t.bytes,
            })),
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "records          {} ({} bytes)", s.records, s.bytes)?;
    writeln!(
        out,
        "  in flight      {in_flight}\n  completed      {completed}\n  pending        {pending}\n  values         {values}"
    )?;
    writeln!(
        out,
        "log segments     {} ({} bytes), {} records after the checkpoint",
        copy.segments.len(),
        seg_bytes,
        copy.report.records
    )?;
    match ckpt {
        Some(c) => writeln!(
            out,
            "last checkpoint  covers seq {}, {} records, {} bytes, {}",
            c.covers_seq,
            c.records,
            c.bytes,
            ckpt_age.map_or("age unknown".into(), |a| format!("{a} s ago"))
        )?,
        None => writeln!(out, "last checkpoint  none")?,
    }
    if let Some(t) = torn {
        writeln!(
            out,
            "torn tail        {} at offset {} ({} bytes; cut at the next open)",
            t.path.display(),
            t.offset,
            t.bytes
        )?;
    }
    Ok(())
}

fn verify(dir: &Path, out: &mut impl Write) -> Result<(), Fail> {
    let v = idemkv::tools::verify(dir)?;
    if let Some(d) = v.damage {
        let at = d
            .offset
            .map_or(String::new(), |o| format!(" at offset {o}"));
        return Err(Fail(
            1,
            format!("damage in {}{at}: {}", d.path.display(), d.reason),
        ));
    }
    let copy = v.copy.ok_or_else(|| Fail(5, "nothing was read".into()))?;
    writeln!(
        out,
        "ok: {} records ({} from the checkpoint, {} log records after it) in {} segments",
        copy.store.stats().records,
        copy.report.checkpoint_records,
        copy.report.records,
        copy.segments.len()
    )?;
    if let Some(t) = &copy.report.torn_tail {
        writeln!(
            out,
            "torn tail: {} at offset {}, {} bytes (a write a crash cut short, never acknowledged; left as is)",
            t.path.display(),
            t.offset,
            t.bytes
        )?;
    }
    for p in &copy.report.empty_segments_removed {
        writeln!(out, "empty segment: {} (holds no batch)", p.display())?;
    }
    Ok(())
}

fn inspect(dir: &Path, scope: &str, key: &str, out: &mut impl Write) -> Result<(), Fail> {
    let copy = idemkv::tools::read_dir(dir)?;
    let snap = copy
        .store
        .blocking_get(Key::new(scope, key))?
        .ok_or_else(|| Fail(3, format!("no record {scope:?} / {key:?}")))?;
    writeln!(out, "state        {}", kind(&snap))?;
    match &snap {
        Snapshot::InFlight {
            token,
            deadline,
            fingerprint,
            ..
        } => {
            writeln!(out, "token        {token}")?;
            writeln!(out, "deadline     in {}", until(Some(deadline.as_millis())))?;
            writeln!(out, "fingerprint  {}", hex(fingerprint.as_bytes()))?;
        }
        Snapshot::Completed(c) => {
            writeln!(
                out,
                "completed    {} ms since the epoch",
                c.completed_at.as_millis()
            )?;
            writeln!(
                out,
                "expires      in {}",
                until(Some(c.expires_at.as_millis()))
            )?;
            writeln!(out, "fingerprint  {}", hex(c.fingerprint.as_bytes()))?;
            response(&c.response, out)?;
        }
        Snapshot::Pending {
            payload,
            expires_at,
        } => {
            writeln!(
                out,
                "expires      in {}",
                until(Some(expires_at.as_millis()))
            )?;
            response(payload, out)?;
        }
        Snapshot::Value(v) => {
            writeln!(out, "version      {}", v.version)?;
            writeln!(
                out,
                "expires      {}",
                v.expires_at.map_or("never".into(), |t| format!(
                    "in {}",
                    until(Some(t.as_millis()))
                ))
            )?;
            response(&v.value, out)?;
        }
    }
    Ok(())
}

/// The size and first bytes; the HTTP status and headers when it is a stored HTTP response.
fn response(bytes: &[u8], out: &mut impl Write) -> Result<(), Fail> {
    writeln!(out, "size         {} bytes", bytes.len())?;
    let head = &bytes[..bytes.len().min(64)];
    writeln!(out, "first bytes  {:?}", String::from_utf8_lossy(head))?;
    if let Some(http) = idemkv::tools::decode_http_response(bytes) {
        writeln!(out, "http status  {}", http.status)?;
        for (n, v) in &http.headers {
            writeln!(out, "http header  {n}: {v}")?;
        }
        match http.body_len {
            Some(n) => writeln!(out, "http body    {n} bytes")?,
            None => writeln!(out, "http body    not kept (too large)")?,
        }
    }
    Ok(())
}

fn list(
    dir: &Path,
    scope: Option<&str>,
    in_flight: bool,
    limit: Option<usize>,
    out: &mut impl Write,
) -> Result<(), Fail> {
    let copy = idemkv::tools::read_dir(dir)?;
    let mut n = 0usize;
    let mut err = None;
    copy.store.for_each_record(|key, snap| {
        if err.is_some() || limit.is_some_and(|l| n >= l) {
            return;
        }
        if scope.is_some_and(|s| s.as_bytes() != key.scope())
            || (in_flight && !matches!(snap, Snapshot::InFlight { .. }))
        {
            return;
        }
        n += 1;
        let line = writeln!(
            out,
            "{}\t{}\t{}",
            String::from_utf8_lossy(key.scope()).escape_debug(),
            String::from_utf8_lossy(key.id()).escape_debug(),
            kind(&snap)
        );
        err = line.err();
    });
    err.map_or(Ok(()), |e| Err(e.into()))
}

fn evict(dir: &Path, scope: &str, key: &str, out: &mut impl Write) -> Result<(), Fail> {
    if !dir.join("LOCK").exists() {
        return Err(Fail(
            5,
            format!("{} is not an idemkv data directory", dir.display()),
        ));
    }
    let store = Store::builder().sweep_interval(None).open(dir)?;
    if store.blocking_remove(Key::new(scope, key))? {
        writeln!(out, "removed {scope:?} / {key:?}")?;
        Ok(())
    } else {
        Err(Fail(3, format!("no record {scope:?} / {key:?}")))
    }
}
