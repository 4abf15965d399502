#!/usr/bin/env bash
# ARM64 from an x86-64 machine: builds the local engine's tests (crates/llama) for
# aarch64-unknown-linux-gnu and runs them under QEMU's user-mode emulator. Correctness only:
# an emulator's speed means nothing.
# Installs the cross linker, QEMU and the Rust target when missing (apt-get as root).
# Usage: ./scripts/test-aarch64.sh [--workspace]   (other arguments go to the test binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu

if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || ! command -v qemu-aarch64-static >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing gcc-aarch64-linux-gnu and qemu-user-static for the ARM64 build and tests" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu \
            libc6-dev-arm64-cross qemu-user-static >/dev/null
    else
        echo "the ARM64 build needs: sudo apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static" >&2
        exit 1
    fi
fi
rustup target add "$target" >/dev/null 2>&1 || true

# The linker comes from .cargo/config.toml, the C compiler for ring from cc's default
# (aarch64-linux-gnu-gcc); QEMU finds the ARM64 glibc Debian's cross packages install.
qemu="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
runner=CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER
# The dev profile as ./scripts/test.sh builds it, so that the proc macros and build scripts it
# compiled for this machine serve here too (most of a cross check's time).
export CARGO_INCREMENTAL=0

# `--workspace` first checks that the whole workspace, the edgechat binary included, compiles
# for ARM64 (about as long again as the rest; CI leaves it out to stay within its time).
if [ "${1:-}" = "--workspace" ]; then
    shift
    cargo check --target "$target" --workspace
fi
# The local engine's tests, emulating a Cortex-A76 (Raspberry Pi 5; NEON with the dot-product
# instructions).
env "$runner=$qemu -cpu cortex-a76" cargo test -p edgechat-llama --target "$target" -- "$@"
# Again as a Cortex-A72 (Raspberry Pi 4; NEON without the dot-product instructions), except the
# comparisons with candle's own models: candle 0.11.1's NEON dot products use SDOT without
# asking the CPU (quantized/neon.rs), so candle's quantized matmul dies of SIGILL there.
env "$runner=$qemu -cpu cortex-a72" cargo test -p edgechat-llama --target "$target" -- \
    --skip matches_candles "$@"
