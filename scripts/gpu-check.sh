#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and no Rust toolchain.
# Build first, on an x86-64 Linux machine with Rust:
#
#     bash scripts/build-gpu-dist.sh        # -> dist/ (binaries, test binaries)
#
# then copy the repository with dist/ to the GPU machine and run, from its root:
#
#     bash scripts/gpu-check.sh [OUT_DIR]
#
# It runs `mbq verify --backends cpu,wgpu,cuda --ops` first (verify.log),
# then the CUDA tests and the wgpu tests (Vulkan on the same GPU), `mbq
# bench gemv` at the paper's shapes and `mbq bench decode --synthetic
# llava-ov-7b` (FP16 vs W3 vs W4) on CUDA and wgpu side by side, each with a
# device-to-device copy as the bandwidth ceiling, `mbq bench serve` (the
# bundled model at 1, 4, 8 concurrent requests, batched vs one at a time)
# on both, then MBQ W3 calibration of a real-size random-weight
# LLaVA-OneVision-7B on CUDA and on wgpu (time per stage, GPU memory
# peak), writes every log to
# OUT_DIR (default gpu-check-out/) and prints one short table last.
# Builds nothing. Exit status: non-zero when a test suite failed.
#
# Environment: DECODE_LAYERS (default 28, the whole model; fewer to save
# time), TESTS (test binaries to run, default all eight; empty: none), BENCHES (of
# "gemv decode serve calib", default all), CALIB_BACKENDS (default
# "cuda wgpu"), SUITE_TIMEOUT (seconds per test binary and for verify, default
# 300), SKIP_BENCH=1 (tests only), CALIB=0 (no calibration), CALIB_SAMPLES
# (default 4), CALIB_TIMEOUT (seconds per backend, default 900), VK_DRIVER_FILES if the NVIDIA Vulkan ICD is not found, and a
# Vulkan loader: if `.gl/*.deb` exist, they are unpacked (the NVIDIA ICD
# needs libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2
# where the machine has none of them: `apt-get download` them into .gl/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT_DIR:-gpu-check-out}}"
mkdir -p "$OUT_DIR"
DECODE_LAYERS="${DECODE_LAYERS:-28}"
T0=$(date +%s)

if [ ! -x dist/mbq ] && [ -f gpu-dist.tar.xz ]; then
  xz -dc gpu-dist.tar.xz | tar -xf -
fi
if [ ! -x dist/mbq ]; then
  echo "error: dist/mbq not found: run scripts/build-gpu-dist.sh on a machine with Rust first" >&2
  exit 2
fi

# The test binaries find tests/fixtures through the checkout path they were
# built in: point that path at this copy.
MD="$(cat dist/manifest_dir)"
if [ "$(cd "$MD" 2>/dev/null && pwd -P)" != "$(pwd -P)" ]; then
  if [ -e "$MD" ]; then
    echo "note: $MD exists and is not this checkout; fixture paths may not resolve" >&2
  else
    mkdir -p "$(dirname "$MD")" && ln -s "$PWD" "$MD"
  fi
fi
# The tests that run the CLI find it at the path cargo built it in
# (CARGO_BIN_EXE_*, under the checkout path above): point it at dist/.
mkdir -p target/release
for b in mbq mbq-run; do
  [ -e "target/release/$b" ] || ln -s "$PWD/dist/$b" "target/release/$b"
done

# CUDA libraries loaded at run time: the driver (system), NVRTC and cuBLAS
# (the toolkit, or pip wheels under .cache/nvrtc / a site dir).
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  "$PWD/.cache/nvrtc/nvidia/cuda_nvrtc/lib"; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
# cudarc (built against the CUDA 12.8 API) looks for libnvrtc.so, .so.12
# and libcublas.so, .so.12; a CUDA 13 toolkit without its -dev links, or the
# pip wheels (nvidia/cu13/lib), name them .so.13 only. Link the plain names
# to what is there, in a folder of our own, when the plain name is missing.
LINKS=$(mktemp -d)
for lib in nvrtc cublas cublasLt; do
  for d in ${LD_LIBRARY_PATH:+${LD_LIBRARY_PATH//:/ }}; do [ -e "$d/lib$lib.so" ] && continue 2; done
  f=$(find /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
    /opt /usr/lib/python3* /usr/local/lib/python3* -name "lib$lib.so.1[23]*" 2>/dev/null | sort | head -1)
  [ -n "$f" ] || continue
  ln -sf "$f" "$LINKS/lib$lib.so"
  # libnvrtc loads its builtins from its own folder; cuBLAS needs cublasLt.
  export LD_LIBRARY_PATH="$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH="$LINKS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# A Vulkan loader for wgpu, when one was carried as .debs.
if compgen -G ".gl/*.deb" >/dev/null; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && ! ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1; then
  icd=$(find /usr/local/nvidia /usr/share/vulkan /etc/vulkan /usr/share/glvnd -name 'nvidia_icd*.json' 2>/dev/null | head -1)
  [ -n "$icd" ] && export VK_DRIVER_FILES="$icd"
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: $(cat dist/commit 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv,noheader 2>&1
  nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/cuda (driver api) \1/p'
  echo "vulkan: loader $(ldconfig -p | grep -c 'libvulkan.so'), icd ${VK_DRIVER_FILES:-$(ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null | paste -sd ' ' -)}"
  for l in "$LINKS"/*; do [ -e "$l" ] && echo "linked: $(basename "$l") -> $(readlink "$l")"; done
} | tee "$OUT_DIR/machine.txt"
dist/mbq devices >"$OUT_DIR/devices.txt" 2>&1
cat "$OUT_DIR/devices.txt"

declare -a SUMMARY
FAILED=0
suite() { # name timeout cmd...
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local res
  res=$(grep -E "^test result:" "$OUT_DIR/$name.log" | tail -1 | sed 's/test result: //; s/; finished.*//')
  local skipped
  skipped=$(grep -c "skipped:" "$OUT_DIR/$name.log")
  if [ $rc -ne 0 ]; then FAILED=1; fi
  SUMMARY+=("$(printf '%-12s %-6s %4ss  %s%s' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL:$rc)" \
    "$(($(date +%s) - t))" "$res" "$([ "$skipped" -gt 0 ] && echo ", $skipped skipped lines")")")
}

# First the check a user runs: `mbq verify` on every backend against the
# CPU (the bundled model's greedy ids, top-1 per step and logits, then
# every kernel family with --ops). Its whole output is verify.log; its
# verdict lines go into the table.
t=$(date +%s)
timeout "${SUITE_TIMEOUT:-300}" dist/mbq verify --backends cpu,wgpu,cuda --ops >"$OUT_DIR/verify.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then FAILED=1; fi
SUMMARY+=("$(printf '%-12s %-6s %4ss  %s' verify "$([ $rc -eq 0 ] && echo ok || echo FAIL:$rc)" \
  "$(($(date +%s) - t))" "$(grep -E '^verdict |^[a-z]+ ops: [0-9]+ of [0-9]+ kernels OK$|^error:' "$OUT_DIR/verify.log" |
    sed 's/ (.*)$//' | paste -sd ';' -)")")
grep -E '^(verdict |[a-z]+: ids |[a-z]+ ops: FAIL|[a-z]+ ops: [0-9]+ of |verify: (OK|FAIL)$|error:)' "$OUT_DIR/verify.log"

# MBQ_REQUIRE_CUDA=1: on this machine a CUDA test with no device FAILS
# (tests/cuda_common) instead of printing "skipped: no CUDA device".
for t in ${TESTS-cuda_nvrtc cuda_ops cuda_model w4a8 wgpu_ops wgpu_model calibrate calibrate_backends}; do
  if [ -x "dist/tests/$t" ]; then
    suite "$t" "${SUITE_TIMEOUT:-300}" env MBQ_REQUIRE_CUDA=1 MBQ_RUN_BIN="$PWD/dist/mbq-run" \
      "dist/tests/$t" --test-threads 1 --nocapture
  else
    SUMMARY+=("$(printf '%-12s %s' "$t" "missing from dist/tests")")
  fi
done

BACKENDS="${BACKENDS:-cuda,wgpu}"
# A benchmark prints its side-by-side table only when every backend ran:
# without a wgpu adapter, measure CUDA alone rather than nothing.
if [[ ",$BACKENDS," == *",wgpu,"* ]] && grep -q '^wgpu: no adapter' "$OUT_DIR/devices.txt"; then
  FAILED=1
  BACKENDS=$(echo ",$BACKENDS," | sed 's/,wgpu,/,/; s/^,//; s/,$//')
  SUMMARY+=("no wgpu adapter: benchmarks on ${BACKENDS:-nothing} only")
fi
BENCHES="${BENCHES:-gemv decode serve calib}"
if [ -n "${SKIP_BENCH:-}" ]; then
  echo "SKIP_BENCH set: no benchmarks" >"$OUT_DIR/bench_gemv.txt"
  : >"$OUT_DIR/bench_decode.txt"
  : >"$OUT_DIR/bench_serve.txt"
else
: >"$OUT_DIR/bench_gemv.txt"
: >"$OUT_DIR/bench_decode.txt"
: >"$OUT_DIR/bench_serve.txt"
if [[ " $BENCHES " == *" gemv "* ]]; then
dist/mbq bench gemv --backend "$BACKENDS" >"$OUT_DIR/bench_gemv.txt" 2>"$OUT_DIR/bench_gemv.err" ||
  { FAILED=1; echo "bench gemv failed: $(tail -3 "$OUT_DIR/bench_gemv.err")" >>"$OUT_DIR/bench_gemv.txt"; }
fi
if [[ " $BENCHES " == *" decode "* ]]; then
dist/mbq bench decode --backend "$BACKENDS" --synthetic llava-ov-7b --layers "$DECODE_LAYERS" \
  --prompt 16 --tokens 32 >"$OUT_DIR/bench_decode.txt" 2>"$OUT_DIR/bench_decode.err" ||
  { FAILED=1; echo "bench decode failed: $(tail -3 "$OUT_DIR/bench_decode.err")" >>"$OUT_DIR/bench_decode.txt"; }
fi
if [[ " $BENCHES " == *" serve "* ]]; then
dist/mbq bench serve --backend "$BACKENDS" --reps 3 --tokens 64 \
  >"$OUT_DIR/bench_serve.txt" 2>"$OUT_DIR/bench_serve.err" ||
  { FAILED=1; echo "bench serve failed: $(tail -3 "$OUT_DIR/bench_serve.err")" >>"$OUT_DIR/bench_serve.txt"; }
fi
fi

# The real-size calibration (issue 13): MBQ W3 of a random-weight
# LLaVA-OneVision-7B (`mbq synth`, 16 GB, written once to SYNTH_DIR) on
# CALIB_SAMPLES shapes images, on CUDA and then on wgpu (the same GPU):
# each stage's device and seconds (the report's `stages`), the search's
# seconds per layer, and the GPU memory peak (nvidia-smi every 250 ms).
# CALIB=0 skips it; CALIB_LIKE picks another `mbq synth --like` model.
: >"$OUT_DIR/calib.txt"
if [ "${CALIB:-1}" != 0 ] && [ -z "${SKIP_BENCH:-}" ] && [[ " $BENCHES " == *" calib "* ]]; then
  SYNTH_DIR="${SYNTH_DIR:-/tmp/mbq-synth-${CALIB_LIKE:-llava-ov-7b}}"
  if [ ! -d "$SYNTH_DIR" ]; then
    dist/mbq synth --like "${CALIB_LIKE:-llava-ov-7b}" --out "$SYNTH_DIR" >"$OUT_DIR/synth.log" 2>&1 ||
      { FAILED=1; echo "synth failed: $(tail -3 "$OUT_DIR/synth.log")" >>"$OUT_DIR/calib.txt"; }
  fi
  rm -rf "$OUT_DIR/calib-shapes"
  dist/mbq shapes --seed 2000 --count "${CALIB_SAMPLES:-4}" --out "$OUT_DIR/calib-shapes" >/dev/null 2>&1
  for b in ${CALIB_BACKENDS:-cuda wgpu}; do
    [ -d "$SYNTH_DIR" ] || break
    rm -rf "$OUT_DIR/calib-$b" "$OUT_DIR/.calib-$b.calib-checkpoint"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 \
      >"$OUT_DIR/calib_$b.mem" 2>/dev/null &
    mp=$!
    t=$(date +%s)
    timeout "${CALIB_TIMEOUT:-900}" dist/mbq quantize --method mbq --w-bit 3 --backend "$b" \
      --model "$SYNTH_DIR" --out "$OUT_DIR/calib-$b" --calib "$OUT_DIR/calib-shapes/questions.jsonl" \
      --n-samples "${CALIB_SAMPLES:-4}" >"$OUT_DIR/calib_$b.log" 2>&1
    rc=$?
    kill "$mp" 2>/dev/null
    peak=$(sort -n "$OUT_DIR/calib_$b.mem" 2>/dev/null | tail -1)
    if [ $rc -ne 0 ]; then FAILED=1; fi
    {
      echo "== mbq quantize --method mbq --w-bit 3 --backend $b ($(($(date +%s) - t)) s, exit $rc, GPU memory peak ${peak:-?} MiB)"
      report="$OUT_DIR/calib-$b/calibration_report.json"
      if [ -f "$report" ]; then
        sed -n '/"stages"/,/^  \]/p' "$report" | grep -E '"(stage|device|seconds)"' | paste - - - | tr -s ' '
        sed -n '/"layer_seconds"/,/^  \]/p' "$report" | tr -d ' \n' | sed 's/$/\n/'
      else
        tail -5 "$OUT_DIR/calib_$b.log"
      fi
    } >>"$OUT_DIR/calib.txt"
  done
fi

echo
echo "=== mbq GPU check: $(head -3 "$OUT_DIR/machine.txt" | tr '\n' ' ')($(($(date +%s) - T0)) s) ==="
printf '%s\n' "${SUMMARY[@]}"
echo
# The side-by-side tables (the last part of each benchmark's output).
sed -n '/^device-to-device copy/,$p' "$OUT_DIR/bench_gemv.txt"
sed -n '/^Decode: /,$p' "$OUT_DIR/bench_decode.txt"
sed -n '/^serve on /,$p' "$OUT_DIR/bench_serve.txt"
cat "$OUT_DIR/calib.txt"
exit $FAILED
