//! A store opened on a directory: what survives a reopen, the directory lock, torn tails at
//! every offset, damage in the middle of the log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use idemkv::{
    Begin, CasOutcome, Durability, Error, Fingerprint, Key, LogError, ManualClock, OnCorruption,
    OpenError, OwnedKey, PutPending, Snapshot, Store, StoreBuilder, Take, Write,
};

const LEASE: Duration = Duration::from_secs(10);
const T0: u64 = 1_700_000_000_000;
const SEGMENT: u64 = 64 << 10;

fn builder(clock: &ManualClock) -> StoreBuilder {
    Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .log_segment_size(SEGMENT)
}

fn fp() -> Fingerprint {
    Fingerprint::of(b"request")
}

fn acquire(s: &Store, k: Key<'_>) -> idemkv::Lease {
    match s.blocking_begin(k, fp(), LEASE).expect("begin") {
        Begin::Acquired(l) => l,
        other => panic!("{other:?}"),
    }
}

fn completed(s: &Store, k: Key<'_>) -> Option<Vec<u8>> {
    match s.blocking_get(k).expect("get") {
        Some(Snapshot::Completed(c)) => Some(c.response),
        None => None,
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_kind_of_state_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let held_token;
    let version;
    {
        let s = builder(&clock).open(dir.path()).expect("open");
        let l = acquire(&s, Key::new("t", "done"));
        s.blocking_complete(&l, b"response bytes", None)
            .expect("complete");
        held_token = acquire(&s, Key::new("t", "held")).token();
        let CasOutcome::Applied { version: Some(v) } = s
            .blocking_cas(&Write::put_if_absent(OwnedKey::new("acct", "c1"), "100.00"))
            .expect("cas")
        else {
            panic!()
        };
        let l = acquire(&s, Key::new("t", "batch"));
        s.blocking_complete_with(
            &l,
            b"paid",
            None,
            &[Write::set_if_version(
                OwnedKey::new("acct", "c1"),
                v,
                "87.50",
            )],
        )
        .expect("batch");
        version = match s.blocking_get(Key::new("acct", "c1")).expect("get") {
            Some(Snapshot::Value(v)) => v.version,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            s.blocking_put_pending(Key::new("pay", "p1"), b"payload", None)
                .expect("put"),
            PutPending::Stored
        );
        let _ = s
            .blocking_put_pending(Key::new("pay", "p2"), b"payload 2", None)
            .expect("put");
        let Take::Acquired { lease, .. } = s
            .blocking_take_pending(Key::new("pay", "p2"), LEASE)
            .expect("take")
        else {
            panic!()
        };
        s.blocking_complete(&lease, b"authorized", None)
            .expect("complete");
        let l = acquire(&s, Key::new("t", "removed"));
        s.blocking_complete(&l, b"x", None).expect("complete");
        assert!(s.blocking_remove(Key::new("t", "removed")).expect("remove"));
        let l = acquire(&s, Key::new("t", "released"));
        s.blocking_release(l).expect("release");
    }
    let s = builder(&clock).open(dir.path()).expect("reopen");
    let report = s.recovery_report().expect("report");
    assert!(report.records >= 10, "{report:?}");
    assert_eq!(report.torn_tail, None);
    assert_eq!(
        completed(&s, Key::new("t", "done")).as_deref(),
        Some(&b"response bytes"[..])
    );
    assert_eq!(
        completed(&s, Key::new("t", "batch")).as_deref(),
        Some(&b"paid"[..])
    );
    assert_eq!(
        completed(&s, Key::new("pay", "p2")).as_deref(),
        Some(&b"authorized"[..])
    );
    match s.blocking_get(Key::new("acct", "c1")).expect("get") {
        Some(Snapshot::Value(v)) => {
            assert_eq!((v.version, v.value.as_slice()), (version, &b"87.50"[..]))
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(s.blocking_get(Key::new("pay", "p1")).expect("get"), Some(Snapshot::Pending { payload, .. }) if payload == b"payload")
    );
    assert_eq!(s.blocking_get(Key::new("t", "removed")).expect("get"), None);
    assert_eq!(
        s.blocking_get(Key::new("t", "released")).expect("get"),
        None
    );
    // A lease survives as what it is: held until its deadline, then taken over with a larger token.
    assert!(matches!(
        s.blocking_begin(Key::new("t", "held"), fp(), LEASE)
            .expect("begin"),
        Begin::InProgress { .. }
    ));
    clock.advance(LEASE);
    let Begin::Acquired(l) = s
        .blocking_begin(Key::new("t", "held"), fp(), LEASE)
        .expect("begin")
    else {
        panic!()
    };
    assert!(l.is_takeover());
    assert!(l.token() > held_token);
    // Versions after a restart are above every version handed out before it.
    let CasOutcome::Applied { version: Some(v2) } = s
        .blocking_cas(&Write::set_if_version(
            OwnedKey::new("acct", "c1"),
            version,
            "80.00",
        ))
        .expect("cas")
    else {
        panic!()
    };
    assert!(v2 > version);
    let st = s.stats();
    // done, held, acct/c1, batch, pay/p1, pay/p2 (removed and released are gone)
    assert_eq!(st.records, 6);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let _first = builder(&clock).open(dir.path()).expect("open");
    match builder(&clock).open(dir.path()) {
        Err(OpenError::Locked { path, holder }) => {
            assert_eq!(path, dir.path());
            assert_eq!(holder, Some(std::process::id()));
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn batched_mode_keeps_everything_over_a_clean_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    {
        let s = builder(&clock)
            .durability(Durability::Batched {
                max_delay: Duration::from_millis(50),
            })
            .open(dir.path())
            .expect("open");
        for i in 0..200 {
            let id = format!("k{i}");
            let l = acquire(&s, Key::new("t", &id));
            s.blocking_complete(&l, id.as_bytes(), None)
                .expect("complete");
        }
    }
    let s = builder(&clock).open(dir.path()).expect("reopen");
    for i in 0..200 {
        let id = format!("k{i}");
        assert_eq!(
            completed(&s, Key::new("t", &id)).as_deref(),
            Some(id.as_bytes())
        );
    }
}

/// Writes `n` completions, each acknowledged (and so in its own batch) before the next.
fn write_log(dir: &Path, n: usize) {
    let clock = ManualClock::new(T0);
    let s = builder(&clock).open(dir).expect("open");
    for i in 0..n {
        let id = format!("k{i}");
        let l = acquire(&s, Key::new("t", &id));
        s.blocking_complete(&l, format!("response {i}").as_bytes(), None)
            .expect("complete");
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("wal"))
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .collect();
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("wal")).expect("mkdir");
    for p in segments(from) {
        std::fs::copy(&p, to.join("wal").join(p.file_name().expect("name"))).expect("copy");
    }
}

/// How many of k0.. are present, checking each one's exact bytes and that they form a prefix.
fn prefix_present(s: &Store, n: usize) -> usize {
    let mut present = 0;
    for i in 0..n {
        let id = format!("k{i}");
        match s.blocking_get(Key::new("t", &id)).expect("get") {
            Some(Snapshot::Completed(c)) => {
                assert_eq!(present, i, "k{i} present after a missing key");
                assert_eq!(c.response, format!("response {i}").into_bytes());
                present += 1;
            }
            Some(Snapshot::InFlight { .. }) => assert_eq!(present, i, "k{i} in flight after a gap"),
            None => {}
            other => panic!("{other:?}"),
        }
    }
    present
}

#[test]
fn a_torn_tail_at_every_offset_recovers_a_prefix() {
    let src = tempfile::tempdir().expect("tempdir");
    write_log(src.path(), 4);
    let seg = segments(src.path());
    assert_eq!(seg.len(), 1);
    let bytes = std::fs::read(&seg[0]).expect("read");
    let end = bytes.iter().rposition(|&b| b != 0).expect("data") + 1;
    let clock = ManualClock::new(T0);
    let mut last_present = 0;
    for cut in 32..=end {
        let dst = tempfile::tempdir().expect("tempdir");
        copy_dir(src.path(), dst.path());
        let path = segments(dst.path())[0].clone();
        // A torn write: the tail from `cut` on never reached the disk (zeros), length unchanged.
        let mut torn = bytes.clone();
        torn[cut..].iter_mut().for_each(|b| *b = 0);
        std::fs::write(&path, &torn).expect("write");
        let s = builder(&clock)
            .open(dst.path())
            .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let present = prefix_present(&s, 4);
        assert!(
            present >= last_present,
            "cut at {cut}: fewer keys than a shorter cut"
        );
        last_present = present;
        if cut == end {
            assert_eq!(present, 4);
            assert_eq!(s.recovery_report().expect("report").torn_tail, None);
        }
    }
    // Truncated files (a crash while the file itself was being extended) recover too.
    for cut in [0usize, 10, 31, 32, 100, end / 2] {
        let dst = tempfile::tempdir().expect("tempdir");
        copy_dir(src.path(), dst.path());
        let path = segments(dst.path())[0].clone();
        std::fs::write(&path, &bytes[..cut]).expect("write");
        let s = builder(&clock)
            .open(dst.path())
            .unwrap_or_else(|e| panic!("truncated at {cut}: {e}"));
        prefix_present(&s, 4);
    }
}

#[test]
fn damage_in_the_middle_is_a_hard_error_unless_dropped() {
    let src = tempfile::tempdir().expect("tempdir");
    write_log(src.path(), 6);
    let seg = segments(src.path())[0].clone();
    let mut bytes = std::fs::read(&seg).expect("read");
    // The second batch starts after the header and the first batch: flip a byte inside it.
    let first_len = 24 + u32::from_le_bytes(bytes[36..40].try_into().expect("4 bytes")) as usize;
    let second = 32 + first_len;
    bytes[second + 30] ^= 0x40;
    std::fs::write(&seg, &bytes).expect("write");
    let clock = ManualClock::new(T0);
    match builder(&clock).open(src.path()) {
        Err(OpenError::Log(LogError::Corrupt { path, offset, .. })) => {
            assert_eq!(path, seg);
            assert_eq!(offset, second as u64);
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let msg = builder(&clock)
        .open(src.path())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains(&format!("offset {second}")), "{msg}");
    let s = builder(&clock)
        .on_corruption(OnCorruption::DropDamaged)
        .open(src.path())
        .expect("open dropping the damage");
    let dropped = s
        .recovery_report()
        .expect("report")
        .dropped
        .clone()
        .expect("dropped");
    assert_eq!((dropped.path, dropped.offset), (seg, second as u64));
    // Only what came before the damage is there; the store works on.
    assert_eq!(prefix_present(&s, 6), 0);
    assert!(matches!(
        s.blocking_get(Key::new("t", "k0")).expect("get"),
        Some(Snapshot::InFlight { .. })
    ));
    let l = acquire(&s, Key::new("t", "after"));
    s.blocking_complete(&l, b"ok", None).expect("complete");
}

#[test]
fn writes_after_recovery_go_to_a_new_segment_and_replay_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    for round in 0..3 {
        let s = builder(&clock).open(dir.path()).expect("open");
        let id = format!("round-{round}");
        let l = acquire(&s, Key::new("t", &id));
        s.blocking_complete(&l, id.as_bytes(), None)
            .expect("complete");
    }
    assert_eq!(segments(dir.path()).len(), 3);
    let s = builder(&clock).open(dir.path()).expect("open");
    for round in 0..3 {
        let id = format!("round-{round}");
        assert_eq!(
            completed(&s, Key::new("t", &id)).as_deref(),
            Some(id.as_bytes())
        );
    }
}

#[test]
fn memory_only_stores_refuse_nothing_and_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let s = builder(&clock)
        .durability(Durability::None)
        .open(dir.path())
        .expect("open");
    let l = acquire(&s, Key::new("t", "k"));
    s.blocking_complete(&l, b"r", None).expect("complete");
    assert!(s.recovery_report().is_none());
    assert!(!dir.path().join("wal").exists());
    let _ = Error::EmptyKey; // the error type is shared with the in-memory store
}

fn all_completed(s: &Store, n: usize) -> Vec<Option<Snapshot>> {
    (0..n)
        .map(|i| {
            s.blocking_get(Key::new("t", &format!("k{i}")))
                .expect("get")
        })
        .collect()
}

#[test]
fn recovery_from_checkpoint_and_log_equals_recovery_from_the_log_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_only = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let small = |c: &ManualClock| builder(c).log_segment_size(4 << 10);
    {
        let s = small(&clock).open(dir.path()).expect("open");
        for i in 0..150 {
            let id = format!("k{i}");
            let l = acquire(&s, Key::new("t", &id));
            if i % 5 != 0 {
                s.blocking_complete(&l, format!("r{i}").as_bytes(), None)
                    .expect("complete");
            }
        }
        assert!(segments(dir.path()).len() > 3);
        copy_dir(dir.path(), log_only.path());
        let cp = s.checkpoint().expect("checkpoint");
        assert_eq!(cp.records, 150);
        assert!(cp.segments_deleted >= 3, "{cp:?}");
        // More changes after the checkpoint, some to keys it holds.
        for i in 100..200 {
            let id = format!("k{i}");
            if i < 150 && i % 5 == 0 {
                clock.advance(LEASE);
            }
            if let Begin::Acquired(l) = s
                .blocking_begin(Key::new("t", &id), fp(), LEASE)
                .expect("begin")
            {
                s.blocking_complete(&l, format!("second {i}").as_bytes(), None)
                    .expect("complete");
            }
            if i % 7 == 0 {
                s.blocking_remove(Key::new("t", &id)).expect("remove");
            }
        }
    }
    // The log-only copy gets every segment written after its copy was taken.
    copy_dir(dir.path(), log_only.path());
    let a = small(&clock).open(dir.path()).expect("checkpoint + log");
    let b = small(&clock).open(log_only.path()).expect("log alone");
    let ra = a.recovery_report().expect("report");
    assert_eq!(ra.checkpoint_records, 150);
    assert!(ra.checkpoint_seq > 0);
    assert_eq!(b.recovery_report().expect("report").checkpoint_records, 0);
    assert_eq!(all_completed(&a, 200), all_completed(&b, 200));
    assert_eq!(a.stats().records, b.stats().records);
}

#[test]
fn expired_records_are_not_carried_into_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let s = builder(&clock).open(dir.path()).expect("open");
    let l = acquire(&s, Key::new("t", "short"));
    s.blocking_complete(&l, b"x", Some(Duration::from_secs(1)))
        .expect("complete");
    let l = acquire(&s, Key::new("t", "long"));
    s.blocking_complete(&l, b"y", None).expect("complete");
    clock.advance(Duration::from_secs(2));
    assert_eq!(s.checkpoint().expect("checkpoint").records, 1);
    drop(s);
    let s = builder(&clock).open(dir.path()).expect("reopen");
    assert_eq!(s.recovery_report().expect("report").checkpoint_records, 1);
    assert_eq!(
        completed(&s, Key::new("t", "long")).as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(s.blocking_get(Key::new("t", "short")).expect("get"), None);
}

#[test]
fn a_damaged_checkpoint_is_a_hard_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    {
        let s = builder(&clock).open(dir.path()).expect("open");
        let l = acquire(&s, Key::new("t", "k"));
        s.blocking_complete(&l, b"a response long enough to find in the file", None)
            .expect("complete");
        s.checkpoint().expect("checkpoint");
    }
    let path = dir.path().join("checkpoint.redb");
    let mut bytes = std::fs::read(&path).expect("read");
    let needle = b"a response long enough";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("value in file");
    bytes[at + 3] ^= 0x20;
    std::fs::write(&path, &bytes).expect("write");
    match builder(&clock).open(dir.path()) {
        Err(OpenError::Checkpoint(e)) => assert!(
            e.to_string().contains("damaged")
                || e.to_string().contains("checksum")
                || e.to_string().contains("corrupt"),
            "{e}"
        ),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn durability_can_be_raised_per_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let store = builder(&clock)
        .durability(Durability::Batched {
            max_delay: Duration::from_secs(3600),
        })
        .open(dir.path())
        .expect("open");
    // A Batched call returns at once; its record is not on disk yet (the writer waits an hour).
    let l = acquire(&store, Key::new("t", "relaxed"));
    store
        .blocking_complete(&l, b"later", None)
        .expect("complete");
    let copy = tempfile::tempdir().expect("tempdir");
    copy_dir(dir.path(), copy.path());
    let seen = builder(&clock).open(copy.path()).expect("open copy");
    assert_eq!(
        seen.blocking_get(Key::new("t", "relaxed")).expect("get"),
        None
    );
    drop(seen);
    // The same store through an Immediate handle: synced when the call returns. (Were the
    // writer not hurried by the waiting caller, this call would block for the hour.)
    let strict = store.with_durability(Durability::Immediate);
    let l = acquire(&strict, Key::new("t", "strict"));
    strict
        .blocking_complete(&l, b"now", None)
        .expect("complete");
    let copy = tempfile::tempdir().expect("tempdir");
    copy_dir(dir.path(), copy.path());
    let seen = builder(&clock).open(copy.path()).expect("open copy");
    assert_eq!(
        completed(&seen, Key::new("t", "strict")).as_deref(),
        Some(&b"now"[..])
    );
    // Everything before it in the log is there too.
    assert_eq!(
        completed(&seen, Key::new("t", "relaxed")).as_deref(),
        Some(&b"later"[..])
    );
}

#[test]
fn checkpoints_happen_on_their_own_by_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let store = builder(&clock)
        .sweep_interval(Some(Duration::from_millis(5)))
        .checkpoint_interval(Duration::from_millis(20))
        .open(dir.path())
        .expect("open");
    let l = acquire(&store, Key::new("t", "k"));
    store.blocking_complete(&l, b"r", None).expect("complete");
    // Wait (bounded) for the background thread to write a checkpoint holding the record.
    let started = std::time::Instant::now();
    while store.stats().checkpoints == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no checkpoint was written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(store);
    let reopened = builder(&clock).open(dir.path()).expect("reopen");
    assert_eq!(
        reopened
            .recovery_report()
            .expect("report")
            .checkpoint_records,
        1
    );
}

/// The log's storage, recording the name of the thread that ran each `sync_data`.
#[derive(Debug, Clone, Default)]
struct SyncThreads(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

#[derive(Debug)]
struct NamedSyncs(idemkv::storage::OsFile, SyncThreads);

impl idemkv::storage::LogStorage for SyncThreads {
    fn create_new(&self, path: &Path) -> std::io::Result<Box<dyn idemkv::storage::LogFile>> {
        let file = idemkv::storage::OsStorage::create(path)?;
        Ok(Box::new(NamedSyncs(file, self.clone())))
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        idemkv::storage::OsStorage.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        idemkv::storage::OsStorage.sync_dir(dir)
    }
}

impl idemkv::storage::LogFile for NamedSyncs {
    fn allocate(&mut self, len: u64) -> std::io::Result<()> {
        self.0.allocate(len)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_at(offset, buf)
    }
    fn sync_data(&mut self) -> std::io::Result<()> {
        let name = std::thread::current().name().unwrap_or("?").to_owned();
        self.1.0.lock().expect("names").push(name);
        self.0.sync_data()
    }
    fn sync_all(&mut self) -> std::io::Result<()> {
        self.0.sync_all()
    }
}

/// A lone blocking caller syncs its own records on its own thread (no hand-over to the log's
/// writer thread and back), and what it was told is durable is there after a reopen. An async
/// caller never syncs on its executor's thread.
#[test]
fn a_lone_blocking_caller_syncs_on_its_own_thread_and_async_callers_never_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let syncs = SyncThreads::default();
    let clock = ManualClock::new(T0);
    let open = || {
        builder(&clock)
            .durability(Durability::Immediate)
            .log_storage(syncs.clone())
            .open(dir.path())
            .expect("open")
    };
    let store = open();
    let blocking = std::thread::Builder::new()
        .name("lone-caller".into())
        .spawn({
            let store = store.clone();
            move || {
                for i in 0..20 {
                    let id = format!("b{i}");
                    let lease = acquire(&store, Key::new("t", &id));
                    store
                        .blocking_complete(&lease, id.as_bytes(), None)
                        .expect("complete");
                }
            }
        })
        .expect("spawn");
    blocking.join().expect("blocking caller");
    let asynchronous = std::thread::Builder::new()
        .name("async-caller".into())
        .spawn({
            let store = store.clone();
            move || {
                use idemkv::IdempotencyStore as _;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    for i in 0..20 {
                        let id = format!("a{i}");
                        let Begin::Acquired(lease) = store
                            .begin(Key::new("t", &id), fp(), LEASE)
                            .await
                            .expect("begin")
                        else {
                            panic!("not fresh");
                        };
                        store
                            .complete(&lease, id.as_bytes(), None, &[])
                            .await
                            .expect("complete");
                    }
                });
            }
        })
        .expect("spawn");
    asynchronous.join().expect("async caller");
    let names = syncs.0.lock().expect("names").clone();
    let own = names.iter().filter(|n| *n == "lone-caller").count();
    // The log's writer thread is woken by each append too, and may win a round now and then;
    // in 20 requests the caller leads some.
    assert!(own > 0, "every sync ran elsewhere: {names:?}");
    assert!(
        !names.iter().any(|n| n == "async-caller"),
        "an async caller synced on its executor's thread: {names:?}"
    );
    drop(store);
    let store = open();
    for i in 0..20 {
        for side in ["a", "b"] {
            let id = format!("{side}{i}");
            assert_eq!(
                completed(&store, Key::new("t", &id)).as_deref(),
                Some(id.as_bytes()),
                "{id} lost"
            );
        }
    }
}
