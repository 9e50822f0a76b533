//! Crash tests with real processes: a child process does acknowledged operations under load and
//! prints each acknowledgement; the parent `SIGKILL`s it at a random moment, reopens the
//! directory and checks:
//! - every acknowledged completion is there with its exact bytes;
//! - every acknowledged lease is still held (or completed, if the completion raced the kill);
//!   never lost into "absent while the work ran";
//! - nothing is half-written: whatever is there has exactly the bytes that were written.
//!
//! The test cannot go blind: the child's stderr is kept; a child that exits or panics before
//! it is killed fails the test with that stderr; kills aimed at start-up that land before the
//! child's first acknowledgement (during open, or just after) are counted apart, and every
//! other child must have acknowledged work; the reopened store must accept a write after every
//! kill.
//!
//! 24 kills by default; `IDEMKV_CRASH_KILLS=2000 cargo test --release --test crash` for a soak.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use idemkv::{Begin, Fingerprint, Key, Snapshot, Store};

#[path = "support/child.rs"]
mod child;

const CHILD_ENV: &str = "IDEMKV_CRASH_CHILD_DIR";
const THREADS: usize = 4;

fn fp() -> Fingerprint {
    Fingerprint::of(b"crash test request")
}

fn value_for(key: &str) -> Vec<u8> {
    format!("response-for-{key}-{}", "x".repeat(key.len() % 50)).into_bytes()
}

/// The child: runs only when the parent starts this test binary with `CHILD_ENV` set; loops
/// until it is killed.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let incarnation = std::env::var("IDEMKV_CRASH_INCARNATION").unwrap_or_default();
    // Small segments and frequent checkpoints, so kills also land mid-checkpoint.
    let store = Store::builder()
        .log_segment_size(64 << 10)
        .checkpoint_every(16 << 10)
        .sweep_interval(Some(Duration::from_millis(20)))
        .open(&dir)
        .expect("child open");
    let out = Arc::new(Mutex::new(std::io::stdout()));
    {
        let mut o = out.lock().expect("stdout");
        let _ = writeln!(o, "OPEN");
        let _ = o.flush();
    }
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, out, inc) = (store.clone(), Arc::clone(&out), incarnation.clone());
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let id = format!("{inc}-{t}-{i}");
                    let key = Key::new("crash", &id);
                    // Every 7th key keeps a long lease and is never completed.
                    let lease = if i % 7 == 0 {
                        Duration::from_secs(3600)
                    } else {
                        Duration::from_secs(60)
                    };
                    let l = match store.blocking_begin(key, fp(), lease) {
                        Ok(Begin::Acquired(l)) => l,
                        other => panic!("fresh key {id} not acquired: {other:?}"),
                    };
                    let say = |what: &str| {
                        let mut o = out.lock().expect("stdout");
                        let _ = writeln!(o, "{what} {id} {}", l.token());
                        let _ = o.flush();
                    };
                    say("HELD");
                    if i % 7 != 0 {
                        store
                            .blocking_complete(&l, &value_for(&id), None)
                            .expect("complete");
                        say("ACK");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// How one incarnation of the child ended.
enum Killed {
    /// Before it had printed `OPEN`: the kill landed during open (recovery).
    DuringOpen,
    /// After it had opened and acknowledged at least one completion.
    UnderLoad,
}

#[test]
fn sigkill_loses_nothing_acknowledged() {
    let kills: usize = std::env::var("IDEMKV_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let seed = Instant::now().elapsed().as_nanos() as u64 | 1;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed ^ u64::from(std::process::id()));
    let (mut acked, mut held, mut from_checkpoint) = (0usize, 0usize, 0u64);
    let (mut during_open, mut per_kill) = (0usize, Vec::new());
    for kill in 0..kills {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env("IDEMKV_CRASH_INCARNATION", kill.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stderr = child::Stderr::capture(&mut child, &format!("child {kill}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        // One kill in eight lands during open (recovery, a checkpoint load); the others once
        // the child has opened and acknowledged a completion, at a random moment after that.
        let how = if rng.next().is_multiple_of(8) {
            std::thread::sleep(Duration::from_millis(rng.next() % 15));
            Killed::DuringOpen
        } else {
            let until = Instant::now() + Duration::from_secs(20);
            while !lines.iter().any(|l: &String| l.starts_with("ACK ")) {
                let left = until.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(line) => lines.push(line),
                    Err(_) => {
                        child::sigkill(&mut child, &stderr, &format!("child {kill}"));
                        panic!(
                            "kill {kill}: the child acknowledged no completion in 20 s; its stderr:\n{}",
                            stderr.text()
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(rng.next() % 120));
            Killed::UnderLoad
        };
        child::sigkill(&mut child, &stderr, &format!("child {kill}"));
        lines.extend(rx.iter());
        let opened = lines.iter().any(|l| l.ends_with("OPEN"));

        // What the child said: HELD (begin acknowledged) and ACK (completion acknowledged).
        let mut state: HashMap<String, (u64, bool)> = HashMap::new();
        for line in &lines {
            let mut parts = line.split(' ');
            match (
                parts.next(),
                parts.next(),
                parts.next().and_then(|t| t.parse::<u64>().ok()),
            ) {
                (Some("HELD"), Some(id), Some(token)) => {
                    state.insert(id.to_owned(), (token, false));
                }
                (Some("ACK"), Some(id), Some(_)) => {
                    if let Some(s) = state.get_mut(id) {
                        s.1 = true;
                    }
                }
                _ => {}
            }
        }
        let acked_any = state.values().any(|s| s.1);
        match how {
            // Aimed at start-up: it may have died before opening, or after opening but before
            // its first acknowledgement; counted apart either way.
            Killed::DuringOpen if !acked_any => during_open += 1,
            Killed::DuringOpen => {}
            // The parent waited for an acknowledgement before killing it.
            Killed::UnderLoad => assert!(
                opened && acked_any,
                "kill {kill}: the child was killed under load but acknowledged nothing; its \
                 stderr:\n{}",
                stderr.text()
            ),
        }
        let store = Store::builder()
            .open(dir.path())
            .expect("reopen after SIGKILL");
        let report = store.recovery_report().expect("report");
        from_checkpoint = from_checkpoint.max(report.checkpoint_records);
        let mut checked = 0;
        for (id, (token, done)) in &state {
            let found = store.blocking_get(Key::new("crash", id)).expect("get");
            match found {
                Some(Snapshot::Completed(c)) => {
                    assert_eq!(c.response, value_for(id), "kill {kill}: {id} half-written")
                }
                Some(Snapshot::InFlight { token: t, .. }) => {
                    assert!(!done, "kill {kill}: acknowledged completion of {id} lost");
                    assert_eq!(t, *token, "kill {kill}: {id} held by another token");
                }
                other => panic!("kill {kill}: acknowledged key {id} is {other:?}"),
            }
            held += 1;
            acked += usize::from(*done);
            checked += 1;
        }
        // The reopened store accepts writes (a crash must never leave it refusing them).
        let probe = format!("probe-{kill}");
        match store.blocking_begin(
            Key::new("crash-probe", &probe),
            fp(),
            Duration::from_secs(1),
        ) {
            Ok(Begin::Acquired(l)) => {
                store
                    .blocking_complete(&l, b"probe", None)
                    .unwrap_or_else(|e| {
                        panic!("kill {kill}: the reopened store refuses writes: {e}")
                    });
            }
            other => panic!("kill {kill}: the reopened store refuses writes: {other:?}"),
        }
        if acked_any {
            per_kill.push(checked);
        }
        drop(store);
    }
    per_kill.sort_unstable();
    let median = per_kill.get(per_kill.len() / 2).copied().unwrap_or(0);
    eprintln!(
        "{kills} kills ({during_open} during start-up, {} after acknowledged work): {held} acknowledged leases \
         and {acked} acknowledged completions checked, median {median} operations per kill; \
         up to {from_checkpoint} records recovered from a checkpoint",
        per_kill.len()
    );
    assert!(
        per_kill.len() * 2 > kills,
        "most kills must land under load, not during open: {} of {kills}",
        per_kill.len()
    );
    assert!(
        from_checkpoint > 0,
        "no recovery ever started from a checkpoint"
    );
}
