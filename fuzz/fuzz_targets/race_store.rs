//! Races on the store: 2–4 threads run fuzz-chosen operations on a handful of keys (begin,
//! begin_wait, complete with a batch, release, renew, cas, remove, put_pending, take_pending,
//! clock advances, sweeps) under shuttle, every scheduling decision taken from the input; the
//! history must be linearizable against the sequential model, and no wait may be lost.
//!
//! Needs the crate built with shuttle's primitives behind its sync shim:
//! `RUSTFLAGS="--cfg shuttle" cargo +nightly fuzz run -s none race_store --target-dir target/shuttle`
#![no_main]

#[cfg(shuttle)]
mod race;

#[cfg(shuttle)]
libfuzzer_sys::fuzz_target!(|input: race::Input| race::run(&input));

#[cfg(not(shuttle))]
libfuzzer_sys::fuzz_target!(|_data: &[u8]| {
    eprintln!(
        "race_store needs RUSTFLAGS=\"--cfg shuttle\" (see the top of fuzz_targets/race_store.rs)"
    );
    std::process::exit(2);
});
