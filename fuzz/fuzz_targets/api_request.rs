//! Arbitrary bytes as a request to the daemon: `METHOD TARGET`, a newline, then the body.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| silo::fuzzing::api_request(data));
