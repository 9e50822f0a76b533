//! Arbitrary bytes as a log segment and as a checkpoint record: decoding must never panic, and
//! opening a store whose only segment holds these bytes must give a store or a clear error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    idemkv::fuzzing::decode_segment(data);
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    idemkv::fuzzing::decode_checkpoint_record(&data[..split], &data[split..]);

    // The whole recovery path: the bytes as the one segment of a store directory.
    let Ok(dir) = tempfile::tempdir() else { return };
    let wal = dir.path().join("wal");
    if std::fs::create_dir_all(&wal).is_err()
        || std::fs::write(wal.join("00000000000000000001.wal"), data).is_err()
    {
        return;
    }
    let opened = idemkv::Store::builder()
        .sweep_interval(None)
        .log_segment_size(4096)
        .open(dir.path());
    if let Ok(store) = opened {
        // Whatever was recovered is readable.
        let _ = store.stats();
    }
});
