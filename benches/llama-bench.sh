#!/usr/bin/env bash
# Runs llama.cpp's llama-bench on the same GGUF and thread count as `cargo bench --bench local`,
# for the ratio BENCHMARKS.md records. llama.cpp's source comes from the PyPI sdist of
# llama-cpp-python (vendor/llama.cpp); the build (about 15 minutes on 2 cores) is cached in
# benches/.cache, which git ignores. It builds llama-server, llama-quantize and llama-tokenize
# too, for the tokenizer fixtures (tests/fixtures/make_spm_fixture.py) and the synthetic files
# (../shared/tools/synthetic-gguf), so one build serves all three.
#
# Usage: bash benches/llama-bench.sh [THREADS]   (default: all cores)
set -euo pipefail

VERSION="0.3.36"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/benches/.cache"
model="${EDGECHAT_BENCH_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
threads="${1:-$(nproc)}"
bench="$cache/llama.cpp-$VERSION/build/bin/llama-bench"

if [[ ! -f "$model" ]]; then
    echo "error: $model is missing: run bash models/fetch-default.sh" >&2
    exit 1
fi

if [[ ! -x "$bench" ]]; then
    for tool in pip3 cmake cc c++; do
        command -v "$tool" >/dev/null || { echo "error: $tool is needed (pip install cmake ninja; apt-get install build-essential)" >&2; exit 1; }
    done
    mkdir -p "$cache"
    src="$cache/llama.cpp-$VERSION"
    if [[ ! -d "$src" ]]; then
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        pip3 download --quiet --no-deps --no-binary llama-cpp-python --dest "$tmp" "llama-cpp-python==$VERSION"
        tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
        mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$src"
    fi
    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    cmake -S "$src" -B "$src/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
    cmake --build "$src/build" --target llama-bench llama-server llama-quantize llama-tokenize \
        -j "$(nproc)"
fi

"$bench" -m "$model" -t "$threads" -p 256 -n 128
