#!/usr/bin/env bash
# Runs every test meshca has: formatting and lints, unit and property tests, OpenSSL interop and
# the end-to-end tests with real processes. External peers the tests need are built by
# scripts/peers/ (CI does that in .ci/run before calling this script).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
