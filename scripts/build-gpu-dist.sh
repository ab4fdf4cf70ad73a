#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on an NVIDIA GPU machine that has
# no Rust toolchain: release binaries with the CUDA backend (cudarc loads
# libcuda / NVRTC / cuBLAS at run time) and the GPU test binaries, stripped,
# into dist/ (ignored by git). Run it here (x86-64 Linux), copy the
# repository with dist/ to the GPU machine, run scripts/gpu-check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_PROFILE_RELEASE_DEBUG=0
# dist/mbq has every backend: gpu-check.sh runs `mbq verify --backends
# cpu,wgpu,cuda --ops` with it first.
cargo build --release --features cuda --bins
tests=(cuda_nvrtc cuda_ops cuda_model wgpu_ops wgpu_model w4a8 calibrate calibrate_backends)
args=()
for t in "${tests[@]}"; do
  [ -f "tests/$t.rs" ] && args+=(--test "$t")
done
# The test binaries' paths, from cargo's JSON messages.
mapfile -t bins < <(cargo test --release --features cuda --no-run "${args[@]}" \
  --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"] + " " + m["executable"])')

rm -rf dist
mkdir -p dist/tests
cp target/release/mbq target/release/mbq-run dist/
for b in "${bins[@]}"; do
  name=${b%% *}
  cp "${b#* }" "dist/tests/$name"
done
strip dist/mbq dist/mbq-run dist/tests/* 2>/dev/null || true
# The tests find their fixtures through the path of this checkout, baked in
# at build time: gpu-check.sh links it to the copy it runs in.
pwd >dist/manifest_dir
git rev-parse HEAD >dist/commit 2>/dev/null || true
# One archive too (xz: about a quarter of the size), for transfers with a
# size limit; gpu-check.sh unpacks it when dist/ is not there.
tar -cf - dist | xz -6 -T0 >gpu-dist.tar.xz
du -sh dist gpu-dist.tar.xz
echo "dist/ ready: copy the repository (with dist/ or gpu-dist.tar.xz) to the GPU machine and run bash scripts/gpu-check.sh"
