//! The `idemkv` command as a process: stats, a dump → restore round trip, verify on clean,
//! torn and damaged copies (reading changes no byte), inspect, list, evict, and every command
//! refused with exit 4 naming the process while a store has the directory open.
#![cfg(all(feature = "cli", not(loom)))]

#[cfg(feature = "redis")]
#[path = "support/child.rs"]
mod child;
#[cfg(feature = "redis")]
#[path = "support/redis.rs"]
mod redis_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use idemkv::{Begin, Fingerprint, Key, OwnedKey, Store, Write};

/// The binary, built now so it is never stale.
fn bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let mut cargo = Command::new(env!("CARGO"));
    // With the redis feature (the Redis suite), the binary gets `migrate`.
    let features = if cfg!(feature = "redis") {
        "cli,redis"
    } else {
        "cli"
    };
    cargo.args(["build", "--features", features, "--bin", "idemkv"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    assert!(cargo.status().expect("cargo build").success());
    dir.join("idemkv")
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn idemkv");
    if let Some(input) = stdin {
        use std::io::Write as _;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input).expect("write stdin");
    }
    child.wait_with_output().expect("wait")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

/// A directory with 20 completed keys, 5 values, 3 stored requests and one in-flight lease,
/// written as separate log batches.
fn populate(dir: &Path) {
    let store = Store::builder().open(dir).expect("open");
    for i in 0..20 {
        let id = format!("k{i}");
        let key = Key::new("POST /orders -", id.as_bytes());
        let Ok(Begin::Acquired(l)) =
            store.blocking_begin(key, Fingerprint::of(b"body"), Duration::from_secs(30))
        else {
            panic!("acquire")
        };
        store
            .blocking_complete(&l, format!("response {i}").as_bytes(), None)
            .expect("complete");
    }
    for i in 0..5 {
        let w = Write::put_if_absent(
            OwnedKey::new("orders", format!("o{i}")),
            format!("order {i}"),
        );
        let _ = store.blocking_cas(&w).expect("cas");
    }
    for i in 0..3 {
        let id = format!("p{i}");
        let key = Key::new("payments", id.as_bytes());
        let _ = store
            .blocking_put_pending(key, b"{\"amount\":\"1.00\"}", None)
            .expect("put");
    }
    let key = Key::new("POST /orders -", b"running");
    assert!(matches!(
        store.blocking_begin(key, Fingerprint::of(b"x"), Duration::from_secs(600)),
        Ok(Begin::Acquired(_))
    ));
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).expect("read");
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for (p, bytes) in files(from) {
        let dest = to.join(p.strip_prefix(from).expect("prefix"));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::write(dest, bytes).expect("write");
    }
}

/// The dump's record lines without their remaining TTLs (they shrink between two dumps).
fn records_of(dump: &[u8]) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = text(dump)
        .lines()
        .skip(1)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v.as_object_mut().expect("object").remove("ttl_ms");
            v
        })
        .collect();
    out.sort_by_key(|v| v.to_string());
    out
}

#[test]
fn stats_dump_restore_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("d");
    populate(&d);
    let before = files(&d);

    let o = run(&["stats", d.to_str().expect("utf-8"), "--json"], None);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(s["records"], 29);
    assert_eq!(
        (
            &s["completed"],
            &s["values"],
            &s["pending"],
            &s["in_flight"]
        ),
        (&20.into(), &5.into(), &3.into(), &1.into())
    );

    let dump = run(&["dump", d.to_str().expect("utf-8")], None);
    assert_eq!(code(&dump), 0, "{}", text(&dump.stderr));
    let header: serde_json::Value =
        serde_json::from_str(text(&dump.stdout).lines().next().expect("header")).expect("json");
    assert_eq!(
        (&header["format"], &header["version"]),
        (&"idemkv-dump".into(), &1.into())
    );
    let r = dir.path().join("r");
    let restored = run(&["restore", r.to_str().expect("utf-8")], Some(&dump.stdout));
    assert_eq!(code(&restored), 0, "{}", text(&restored.stderr));
    assert!(
        text(&restored.stdout).contains("1 in-flight leases not restored"),
        "{}",
        text(&restored.stdout)
    );

    // The restored directory dumps the same records (versions and fingerprints included),
    // except the in-flight lease, which is not carried over.
    let again = run(&["dump", r.to_str().expect("utf-8")], None);
    let mut want = records_of(&dump.stdout);
    want.retain(|v| v["kind"] != "in-flight");
    let got = records_of(&again.stdout);
    assert_eq!(got.len(), 28);
    assert_eq!(got, want);
    // Restoring again changes nothing: everything is already there.
    let twice = run(&["restore", r.to_str().expect("utf-8")], Some(&dump.stdout));
    assert!(
        text(&twice.stdout).contains("28 already present"),
        "{}",
        text(&twice.stdout)
    );
    // A restored store is a working store: a completed key replays.
    let store = Store::builder().open(&r).expect("open restored");
    let key = Key::new("POST /orders -", b"k7");
    assert!(
        matches!(store.blocking_begin(key, Fingerprint::of(b"body"), Duration::from_secs(1)), Ok(Begin::Completed(c)) if c.response == b"response 7")
    );
    drop(store);

    // Reading commands left the source directory byte for byte as it was.
    assert_eq!(files(&d), before);
}

#[test]
fn verify_reports_damage_and_torn_tails_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("d");
    populate(&d);
    let o = run(&["verify", d.to_str().expect("utf-8")], None);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).starts_with("ok: 29 records"),
        "{}",
        text(&o.stdout)
    );

    let segment = |root: &Path| -> PathBuf {
        let mut segs: Vec<_> = std::fs::read_dir(root.join("wal"))
            .expect("wal")
            .map(|e| e.expect("entry").path())
            .collect();
        segs.sort();
        segs[0].clone()
    };
    // Damage in the middle: a byte of the first batch flipped; later batches follow.
    let damaged = dir.path().join("damaged");
    copy_dir(&d, &damaged);
    let seg = segment(&damaged);
    let mut bytes = std::fs::read(&seg).expect("read");
    bytes[40] ^= 0xff;
    std::fs::write(&seg, &bytes).expect("write");
    let before = files(&damaged);
    let o = run(&["verify", damaged.to_str().expect("utf-8")], None);
    assert_eq!(code(&o), 1, "{} {}", text(&o.stdout), text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains(&seg.display().to_string()) && err.contains("offset 32"),
        "{err}"
    );
    assert_eq!(files(&damaged), before, "verify changed the directory");

    // A torn tail: garbage after the last batch. Reported, not cut.
    let torn = dir.path().join("torn");
    copy_dir(&d, &torn);
    let seg = segment(&torn);
    let mut bytes = std::fs::read(&seg).expect("read");
    let end = bytes.iter().rposition(|&b| b != 0).expect("data") + 1;
    bytes[end..end + 24].fill(0x5a);
    std::fs::write(&seg, &bytes).expect("write");
    let before = files(&torn);
    let o = run(&["verify", torn.to_str().expect("utf-8")], None);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("torn tail"), "{}", text(&o.stdout));
    assert_eq!(files(&torn), before, "verify cut the torn tail");
}

#[test]
fn inspect_list_and_evict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("d");
    populate(&d);
    let ds = d.to_str().expect("utf-8");
    let o = run(&["inspect", ds, "--scope", "POST /orders -", "k3"], None);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("state        completed") && out.contains("size         10 bytes"),
        "{out}"
    );
    let o = run(
        &["inspect", ds, "--scope", "POST /orders -", "running"],
        None,
    );
    assert!(
        text(&o.stdout).contains("state        in-flight") && text(&o.stdout).contains("token")
    );

    let o = run(&["list", ds, "--in-flight"], None);
    assert_eq!(text(&o.stdout).lines().count(), 1, "{}", text(&o.stdout));
    let o = run(&["list", ds, "--scope", "orders"], None);
    assert_eq!(text(&o.stdout).lines().count(), 5);
    let o = run(&["list", ds, "--limit", "7"], None);
    assert_eq!(text(&o.stdout).lines().count(), 7);

    let o = run(&["evict", ds, "--scope", "POST /orders -", "k3"], None);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let o = run(&["inspect", ds, "--scope", "POST /orders -", "k3"], None);
    assert_eq!(code(&o), 3);
    let o = run(&["evict", ds, "--scope", "POST /orders -", "k3"], None);
    assert_eq!(code(&o), 3);
    // Durably: a store opened on it does not have it.
    let store = Store::builder().open(&d).expect("open");
    assert_eq!(
        store
            .blocking_get(Key::new("POST /orders -", b"k3"))
            .expect("get"),
        None
    );
    assert!(
        store
            .blocking_get(Key::new("POST /orders -", b"k4"))
            .expect("get")
            .is_some()
    );
}

#[test]
fn a_directory_in_use_is_refused_naming_its_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("d");
    populate(&d);
    let ds = d.to_str().expect("utf-8");
    let _open = Store::builder().open(&d).expect("open");
    let me = std::process::id().to_string();
    for args in [
        vec!["stats", ds],
        vec!["verify", ds],
        vec!["dump", ds],
        vec!["list", ds],
        vec!["evict", ds, "--scope", "orders", "o1"],
        vec!["restore", ds],
    ] {
        let o = run(&args, Some(b""));
        assert_eq!(code(&o), 4, "{args:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(&me),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
    // Bad usage is 2, with clap's message.
    let o = run(&["stats"], None);
    assert_eq!(code(&o), 2);
}

/// `migrate` into a real Redis (`tests/support/redis.rs`; required under `CI=true`), under a prefix
/// of this run's own: every live record arrives, with its response and fingerprint, and a
/// second run changes nothing.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "current_thread")]
async fn migrate_copies_live_records_into_redis() {
    use idemkv::IdempotencyStore;
    let Some(url) = redis_support::url() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("d");
    populate(&d);
    let prefix = format!(
        "migrate-{}-{}:",
        std::process::id(),
        idemkv::Clock::now(&idemkv::SystemClock).as_millis()
    );
    let ds = d.to_str().expect("utf-8");
    let o = run(&["migrate", ds, "--to", &url, "--prefix", &prefix], None);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("migrated 20 completed, 3 pending, 5 values; 0 already present; 1 in-flight"),
        "{out}"
    );
    let again = run(&["migrate", ds, "--to", &url, "--prefix", &prefix], None);
    assert!(
        text(&again.stdout).contains("28 already present"),
        "{}",
        text(&again.stdout)
    );

    let redis = idemkv::redis::RedisStore::builder(url)
        .prefix(prefix)
        .connect()
        .await
        .expect("redis");
    let key = Key::new("POST /orders -", b"k7");
    match redis
        .begin(key, Fingerprint::of(b"body"), Duration::from_secs(1))
        .await
    {
        Ok(Begin::Completed(c)) => assert_eq!(c.response, b"response 7"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        redis
            .begin(key, Fingerprint::of(b"other"), Duration::from_secs(1))
            .await,
        Ok(Begin::Mismatch)
    ));
    let v = redis.get(Key::new("orders", b"o3")).await.expect("get");
    assert!(matches!(v, Some(idemkv::Snapshot::Value(x)) if x.value == b"order 3"));
    assert!(
        redis
            .get(Key::new("payments", b"p1"))
            .await
            .expect("get")
            .is_some()
    );
    assert!(
        redis
            .get(Key::new("POST /orders -", b"running"))
            .await
            .expect("get")
            .is_none()
    );
}
