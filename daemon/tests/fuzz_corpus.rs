//! The cargo-fuzz targets of `fuzz/` on a stable toolchain: the same bodies (`fuzz/bodies.rs`)
//! run over every file of the committed corpus, then over a fixed number of deterministic
//! mutations of it (bit flips, byte and token insertions, deletions, duplications, splices). Not
//! coverage-guided like libFuzzer, but it runs in every `cargo test` and a failure names the
//! input and writes it to a file that `cargo fuzz run TARGET FILE` replays.

#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/bodies.rs"]
mod bodies;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Mutated inputs per target and test run. The seed is fixed, so every run tries the same ones.
const MUTATIONS: usize = 100_000;

/// Byte strings that matter to the parsers, inserted as a whole by the mutator.
const TOKENS: &[&[u8]] = &[
    b"\"module_url\"",
    b"\"instances\"",
    b"\"force\"",
    b"true",
    b"null",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b":",
    b"\"",
    b"\\u0000",
    b"\\n",
    b"=",
    b"\n",
    b"\r",
    b"#",
    b"--",
    b"../",
    b"@sha256:",
    b"IMAGE_URL=",
    b"PREV_",
    b"\xc3\xa9",
    b"\xf0\x9f\x98\x80",
    b"\0",
];

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the fuzz corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            (path, data)
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "the corpus {} has only {} files",
        dir.display(),
        files.len()
    );
    files
}

/// xorshift64*: a small deterministic generator, so every run mutates the same way.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// One to four random edits of `input`, sometimes spliced with `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(8) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            2 => data.insert(at, rng.next() as u8),
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
            4 if !data.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                let start = at.min(end);
                data.drain(start..end);
            }
            5 if !data.is_empty() => {
                // Duplicate a chunk: nesting and repetition.
                let start = rng.below(data.len());
                let end = (start + 1 + rng.below(64)).min(data.len());
                let chunk: Vec<u8> = data[start..end].to_vec();
                for _ in 0..=rng.below(8) {
                    data.splice(
                        at.min(data.len())..at.min(data.len()),
                        chunk.iter().copied(),
                    );
                }
            }
            6 if !other.is_empty() => {
                let cut = rng.below(other.len());
                data.truncate(at);
                data.extend_from_slice(&other[cut..]);
            }
            _ => data.truncate(at),
        }
    }
    data
}

/// Runs `body` on `data`; on a panic, writes the input where `cargo fuzz run` can replay it and
/// fails naming it.
fn check(target: &str, what: &str, data: &[u8], body: fn(&[u8])) {
    if catch_unwind(AssertUnwindSafe(|| body(data))).is_ok() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{target}-crash-{:016x}", hash(data)));
    std::fs::write(&file, data).unwrap();
    panic!(
        "{target} failed on {what}: {:?}\nthe input is in {} (replay: cd fuzz && cargo +nightly fuzz run {target} {})",
        String::from_utf8_lossy(&data[..data.len().min(400)]),
        file.display(),
        file.display()
    );
}

fn hash(data: &[u8]) -> u64 {
    // FNV-1a: enough to name a file.
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn run(target: &str, body: fn(&[u8]), seed: u64) {
    let files = corpus(target);
    for (path, data) in &files {
        check(target, &path.display().to_string(), data, body);
    }
    let mut rng = Rng(seed);
    for n in 0..MUTATIONS {
        let (_, input) = &files[rng.below(files.len())];
        let (_, other) = &files[rng.below(files.len())];
        let mutated = mutate(&mut rng, input, other);
        check(target, &format!("mutation {n}"), &mutated, body);
    }
}

#[test]
fn request_parse_corpus_and_mutations() {
    run("request_parse", bodies::request_parse, 0x5eed_0001);
}

#[test]
fn environment_round_trip_corpus_and_mutations() {
    run(
        "environment_round_trip",
        bodies::environment_round_trip,
        0x5eed_0002,
    );
}
