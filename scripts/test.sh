#!/usr/bin/env bash
# Runs every test of the project on a fresh machine (the README's test
# command; .ci/run calls it). Installs what the tests need first:
# mesa-vulkan-drivers (no Vulkan driver), clippy, the NVRTC wheel into
# .cache/nvrtc, g++. A fresh clone's full run takes about 35-40 minutes on
# a 2-core machine, most of it compiling.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
fi

# The wgpu tests need a Vulkan (or Metal/DX12) device and FAIL without
# one. On a Linux machine with no Vulkan driver, install Mesa's lavapipe, a
# Vulkan device that runs on the CPU (wgpu uses Vulkan, never GL, unless
# WGPU_BACKEND says otherwise).
if [ "$(uname -s)" = "Linux" ] && ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  echo "no Vulkan driver found: installing mesa-vulkan-drivers (lavapipe) for the wgpu tests" >&2
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo"
  else
    echo "error: installing mesa-vulkan-drivers needs root; run as root, give sudo rights, or run" >&2
    echo "       'sudo apt-get install -y mesa-vulkan-drivers' first" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: no apt-get; install Mesa's Vulkan drivers (lavapipe) with your package manager" >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers >/dev/null
  if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
    echo "error: mesa-vulkan-drivers installed no Vulkan ICD in /usr/share/vulkan/icd.d" >&2
    exit 1
  fi
fi
# Mesa's Wayland code complains on stderr when this is unset (headless CI).
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

# A one-off build gains nothing from incremental state, which costs disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# Formatting and lints are part of the contract, with and without CUDA.
cargo fmt --all -- --check
if ! cargo clippy --version >/dev/null 2>&1; then
  echo "installing clippy (rustup component add clippy)" >&2
  rustup component add clippy
fi
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features cuda -- -D warnings

# The CUDA feature must keep building on a machine with no CUDA (library and
# binaries; the CUDA tests below build their own targets with it).
cargo build --features cuda --lib --bins

cargo test --all-targets -- --test-threads 2 "$@"

# The CUDA kernels (kernels/*.cu) must compile with NVRTC, which needs no
# GPU: install NVIDIA's NVRTC wheel (12.x: cudarc's `cuda-12080` loader looks
# for libnvrtc.so.12) into .cache/nvrtc, ignored by git, and compile every
# kernel for sm_80 and sm_90. No NVRTC means a failed run, not a skip.
NVRTC_DIR="$PWD/.cache/nvrtc"
NVRTC_LIB="$NVRTC_DIR/nvidia/cuda_nvrtc/lib"
if [ ! -e "$NVRTC_LIB/libnvrtc.so.12" ]; then
  echo "installing NVRTC (the nvidia-cuda-nvrtc-cu12 wheel) into .cache/nvrtc for the CUDA kernel test" >&2
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    else
      echo "error: the CUDA kernel test needs python3 with pip to install NVRTC; install python3-pip" >&2
      exit 1
    fi
  fi
  rm -rf "$NVRTC_DIR"
  # --target installs into a private folder (no venv, no system packages touched).
  if ! python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
      --target "$NVRTC_DIR" "nvidia-cuda-nvrtc-cu12>=12.8,<13"; then
    echo "error: could not install the nvidia-cuda-nvrtc-cu12 wheel from PyPI (no network?);" >&2
    echo "       the CUDA kernels cannot be checked without NVRTC" >&2
    exit 1
  fi
  if [ ! -e "$NVRTC_LIB/libnvrtc.so.12" ]; then
    echo "error: the nvidia-cuda-nvrtc-cu12 wheel has no $NVRTC_LIB/libnvrtc.so.12" >&2
    exit 1
  fi
fi
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test --features cuda --lib cuda_kernels -- --test-threads 2
cargo test --features cuda --test cuda_nvrtc -- --test-threads 2 --nocapture
# The CUDA backend's op and whole-model tests: they run on a CUDA device
# and print "skipped: no CUDA device (...)" without one (built either way).
cargo test --features cuda --test cuda_ops --test cuda_model -- --test-threads 2 --nocapture
# The scale search on CUDA against the CPU (its wgpu twin ran above).
cargo test --features cuda --test calibrate_backends cuda_ -- --nocapture

# Without a GPU the kernels still run: tests/cuda_host_emu runs them on the
# CPU (one thread per CUDA thread) against f64 references. Needs g++.
if ! command -v g++ >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing g++ for the CUDA kernel emulation test" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
  else
    echo "error: the CUDA kernel emulation test needs g++ (C++20); install it" >&2
    exit 1
  fi
fi
echo "CUDA kernels on the CPU (tests/cuda_host_emu):"
tests/cuda_host_emu/run.sh
