//! The fuzz targets' entry points (silo::fuzzing) in the normal suite, without cargo-fuzz:
//! over the seed corpus in fuzz/seeds, a fixed number of deterministic mutations of it, and
//! the inputs that once crashed them. scripts/fuzz runs the real fuzzers.

use std::path::{Path, PathBuf};

use silo::fuzzing;

/// Mutations of the seeds for each target.
const MUTATIONS: usize = 2_000;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The bundle directory the fuzz target uses too: config.json is never written, only its
/// empty rootfs is looked up.
fn bundle_dir() -> PathBuf {
    root().join("fuzz/bundle")
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("fuzz/seeds").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// splitmix64: a fixed sequence, so a failure here reproduces on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens that move a JSON parser or a router somewhere new, as libFuzzer's dictionaries do.
const TOKENS: &[&str] = &[
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "-1",
    "0",
    "1e999",
    "-0.0",
    "1e-320",
    "18446744073709551616",
    "4294967296",
    "65536",
    "\\u0000",
    "\\ud800",
    "/",
    "..",
    "//",
    "%2F",
    "?",
    "=",
    "\"type\":\"mount\"",
    "\"path\":\"/proc/self/ns/net\"",
    "\"options\":[]",
    "\"destination\":\"/dev\"",
    "\"type\":\"bind\"",
    "\"source\":\"/\"",
    "cpu=inf,memory=1",
    "cpu=1,memory=9223372036854775807K",
    "/v1/containers/",
    "/ports/",
    "/signal",
    "\n",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(5) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 => data.insert(at, rng.next() as u8),
            2 => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                data.splice(at..at, token.iter().copied());
            }
            _ => {
                // Splice in a piece of another seed.
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                let len = rng.below(other.len() - from + 1).min(256);
                data.splice(at..at, other[from..from + len].iter().copied());
            }
        }
    }
    data
}

fn exercise(target: &str, entry: impl Fn(&[u8])) {
    let seeds = seeds(target);
    for seed in &seeds {
        entry(seed);
    }
    let mut rng = Rng(0x5110);
    for _ in 0..MUTATIONS {
        entry(&mutate(&mut rng, &seeds));
    }
}

#[test]
fn bundle_seeds_and_mutations() {
    let dir = bundle_dir();
    exercise("bundle", |data| fuzzing::bundle(&dir, data));
}

#[test]
fn api_request_seeds_and_mutations() {
    exercise("api_request", fuzzing::api_request);
}

// Inputs that once failed an entry point, fixed since.

#[test]
fn an_infinite_cpu_share_is_refused() {
    fuzzing::api_request(
        b"PUT /v1/containers/web\n{\"bundle\":\"/b\",\"instance\":\"cpu=inf,memory=1G\"}",
    );
}
