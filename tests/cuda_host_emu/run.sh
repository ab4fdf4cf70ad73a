#!/usr/bin/env bash
# Builds and runs the CPU emulation of the CUDA kernels (main.cpp); needs g++
# with C++20 (std::barrier). Exits non-zero when a kernel disagrees with the
# reference or the build fails. `run.sh search` runs search.cu's cases only.
set -euo pipefail
cd "$(dirname "$0")"
out="${TMPDIR:-/tmp}/mbq_cuda_host_emu.$$"
g++ -std=c++20 -O1 -pthread -Wall -Wno-unknown-pragmas -Wno-unused-function main.cpp -o "$out"
status=0
"$out" "$@" || status=$?
rm -f "$out"
exit "$status"
