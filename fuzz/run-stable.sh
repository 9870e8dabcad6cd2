#!/bin/sh
# A coverage-guided libFuzzer run of every target on a STABLE toolchain, without cargo-fuzz:
# the same instrumentation flags cargo-fuzz passes, minus the sanitizers (AddressSanitizer needs
# nightly). Rust code is memory-safe, so what this finds is panics: broken properties of
# bodies.rs, overflows (overflow checks are on), and hangs.
#
#   fuzz/run-stable.sh [SECONDS_PER_TARGET]     (default 60)
#
# New inputs go to a temporary directory, never into corpus/. A crash leaves its input in
# fuzz/artifacts/; replay it with the printed command or with `cargo +nightly fuzz run TARGET FILE`.
set -eu
seconds=${1:-60}
cd "$(dirname "$0")"
triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks" \
    cargo build --release --bins --target "$triple" --target-dir target/stable-cov
bin=target/stable-cov/$triple/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p artifacts
for target in request_parse environment_round_trip; do
    mkdir -p "$work/$target"
    "$bin/$target" "$work/$target" "corpus/$target" -max_total_time="$seconds" \
        -max_len=70000 -artifact_prefix="artifacts/$target-" -print_final_stats=1
done
