#!/usr/bin/env bash
# One table row per model file: llama.cpp's llama-bench and `cargo bench --bench local` on the
# same file and threads, run one after the other (llama.cpp first), for BENCHMARKS.md.
#
# Usage: bash benches/compare.sh THREADS FILE.gguf...
#   EDGECHAT_ISA=portable also runs our decode on the portable kernels (old CPUs' figure).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
threads=$1; shift
cargo bench --manifest-path "$root/Cargo.toml" --bench local --no-run >/dev/null 2>&1
echo "| file | llama.cpp pp256 / tg128 | edgechat pp256 / tg128 | ratio | edgechat load, peak RSS / file |"
echo "|---|---|---|---|---|"
for model in "$@"; do
    cpp=$(EDGECHAT_BENCH_MODEL=$model bash "$root/benches/llama-bench.sh" "$threads" 2>/dev/null)
    cpp_pp=$(echo "$cpp" | awk -F'|' '/pp256/ {split($(NF-1), a, " "); print a[1]}')
    cpp_tg=$(echo "$cpp" | awk -F'|' '/tg128/ {split($(NF-1), a, " "); print a[1]}')
    ours=$(cd "$root" && EDGECHAT_BENCH_MODEL=$model EDGECHAT_BENCH_RUNS=${RUNS:-2} \
        RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads EDGECHAT_BENCH_THREADS=$threads \
        cargo bench --bench local 2>/dev/null)
    pp=$(echo "$ours" | awk '/^prefill/ {print $3}')
    tg=$(echo "$ours" | awk '/^decode/ {print $3}')
    load=$(echo "$ours" | awk '/^load/ {print $2}')
    rss=$(echo "$ours" | awk '/^peak rss/ {print $(NF-3)}')
    file=$(( $(stat -c %s "$model") / 1048576 ))
    ratio=$(awk -v a="$pp" -v b="$cpp_pp" -v c="$tg" -v d="$cpp_tg" 'BEGIN {printf "%.2f× / %.2f×", a/b, c/d}')
    echo "| $(basename "$model") | $cpp_pp / $cpp_tg | $pp / $tg | $ratio | $load ms, $rss / $file MiB |"
done
