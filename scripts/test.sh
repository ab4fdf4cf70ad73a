#!/usr/bin/env bash
# Runs every test of the project on a fresh machine (the README's test
# command; .ci/run calls it). Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
fi

# Formatting is part of the contract.
cargo fmt --all -- --check

# The CUDA feature must keep building on a machine with no CUDA.
cargo build --features cuda --all-targets

cargo test --all-targets -- --test-threads 2 "$@"
