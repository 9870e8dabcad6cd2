//! libFuzzer target: the environment-file reader and writer
//! (`module_updaterd::engine::environment::Environment::parse` / `render`).

#![no_main]

// Each target uses one of the shared bodies.
#[allow(dead_code)]
#[path = "../bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::environment_round_trip(data));
