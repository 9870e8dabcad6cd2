//! libFuzzer target: the update-module request parser (`module_updaterd::request::parse`).

#![no_main]

// Each target uses one of the shared bodies.
#[allow(dead_code)]
#[path = "../bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::request_parse(data));
