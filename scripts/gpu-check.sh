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
# time), SKIP_BENCH=1 (tests only), CALIB=0 (no calibration), CALIB_SAMPLES
# (default 4), CALIB_TIMEOUT (seconds per backend, default 900), VK_DRIVER_FILES if the NVIDIA Vulkan ICD is not found, and a
# Vulkan loader: if `.gl/*.deb` exist (libvulkan1 ...), they are unpacked.
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

# CUDA libraries loaded at run time: the driver (system), NVRTC and cuBLAS
# (the toolkit, or pip wheels under .cache/nvrtc / a site dir).
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  "$PWD/.cache/nvrtc/nvidia/cuda_nvrtc/lib"; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
# A Vulkan loader for wgpu, when one was carried as .debs.
if compgen -G ".gl/*.deb" >/dev/null; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: $(cat dist/commit 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv,noheader 2>&1
  nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/cuda (driver api) \1/p'
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
timeout 300 dist/mbq verify --backends cpu,wgpu,cuda --ops >"$OUT_DIR/verify.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then FAILED=1; fi
SUMMARY+=("$(printf '%-12s %-6s %4ss  %s' verify "$([ $rc -eq 0 ] && echo ok || echo FAIL:$rc)" \
  "$(($(date +%s) - t))" "$(grep -E '^verdict |^[a-z]+ ops: [0-9]+ of [0-9]+ kernels OK$|^error:' "$OUT_DIR/verify.log" |
    sed 's/ (.*)$//' | paste -sd ';' -)")")
grep -E '^(verdict |[a-z]+: ids |[a-z]+ ops: FAIL|[a-z]+ ops: [0-9]+ of |verify: (OK|FAIL)$|error:)' "$OUT_DIR/verify.log"

# MBQ_REQUIRE_CUDA=1: on this machine a CUDA test with no device FAILS
# (tests/cuda_common) instead of printing "skipped: no CUDA device".
for t in cuda_nvrtc cuda_ops cuda_model w4a8 wgpu_ops wgpu_model calibrate calibrate_backends; do
  if [ -x "dist/tests/$t" ]; then
    suite "$t" 300 env MBQ_REQUIRE_CUDA=1 MBQ_RUN_BIN="$PWD/dist/mbq-run" \
      "dist/tests/$t" --test-threads 1 --nocapture
  else
    SUMMARY+=("$(printf '%-12s %s' "$t" "missing from dist/tests")")
  fi
done

BACKENDS="${BACKENDS:-cuda,wgpu}"
if [ -n "${SKIP_BENCH:-}" ]; then
  echo "SKIP_BENCH set: no benchmarks" >"$OUT_DIR/bench_gemv.txt"
  : >"$OUT_DIR/bench_decode.txt"
  : >"$OUT_DIR/bench_serve.txt"
else
dist/mbq bench gemv --backend "$BACKENDS" >"$OUT_DIR/bench_gemv.txt" 2>"$OUT_DIR/bench_gemv.err" ||
  { FAILED=1; echo "bench gemv failed: $(tail -3 "$OUT_DIR/bench_gemv.err")" >>"$OUT_DIR/bench_gemv.txt"; }
dist/mbq bench decode --backend "$BACKENDS" --synthetic llava-ov-7b --layers "$DECODE_LAYERS" \
  --prompt 16 --tokens 32 >"$OUT_DIR/bench_decode.txt" 2>"$OUT_DIR/bench_decode.err" ||
  { FAILED=1; echo "bench decode failed: $(tail -3 "$OUT_DIR/bench_decode.err")" >>"$OUT_DIR/bench_decode.txt"; }
dist/mbq bench serve --backend "$BACKENDS" --reps 3 --tokens 64 \
  >"$OUT_DIR/bench_serve.txt" 2>"$OUT_DIR/bench_serve.err" ||
  { FAILED=1; echo "bench serve failed: $(tail -3 "$OUT_DIR/bench_serve.err")" >>"$OUT_DIR/bench_serve.txt"; }
fi

# The real-size calibration (issue 13): MBQ W3 of a random-weight
# LLaVA-OneVision-7B (`mbq synth`, 16 GB, written once to SYNTH_DIR) on
# CALIB_SAMPLES shapes images, on CUDA and then on wgpu (the same GPU):
# each stage's device and seconds (the report's `stages`), the search's
# seconds per layer, and the GPU memory peak (nvidia-smi every 250 ms).
# CALIB=0 skips it; CALIB_LIKE picks another `mbq synth --like` model.
: >"$OUT_DIR/calib.txt"
if [ "${CALIB:-1}" != 0 ] && [ -z "${SKIP_BENCH:-}" ]; then
  SYNTH_DIR="${SYNTH_DIR:-/tmp/mbq-synth-${CALIB_LIKE:-llava-ov-7b}}"
  if [ ! -d "$SYNTH_DIR" ]; then
    dist/mbq synth --like "${CALIB_LIKE:-llava-ov-7b}" --out "$SYNTH_DIR" >"$OUT_DIR/synth.log" 2>&1 ||
      { FAILED=1; echo "synth failed: $(tail -3 "$OUT_DIR/synth.log")" >>"$OUT_DIR/calib.txt"; }
  fi
  rm -rf "$OUT_DIR/calib-shapes"
  dist/mbq shapes --seed 2000 --count "${CALIB_SAMPLES:-4}" --out "$OUT_DIR/calib-shapes" >/dev/null 2>&1
  for b in cuda wgpu; do
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
