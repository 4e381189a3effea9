//! Arbitrary bytes as a bundle's config.json, checked and planned but never spawned.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    silo::fuzzing::bundle(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/bundle")),
        data,
    );
});
