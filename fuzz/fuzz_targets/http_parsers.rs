//! The HTTP layer's parsers on hostile input: the `Idempotency-Key` value, `Prefer`, the echo
//! headers and the stored-response codec. None may panic, accept what it must refuse, or fail
//! to round-trip what it decoded (the checks live in `idemkv::fuzzing::http_parsers`).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    key: &'a [u8],
    prefer: &'a [u8],
    echo: Vec<&'a [u8]>,
    stored: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    idemkv::fuzzing::http_parsers(input.key, input.prefer, &input.echo, input.stored);
});
