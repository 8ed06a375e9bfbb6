# syntax=docker/dockerfile:1
#
# One image with every livemesh binary: `livemesh` (all-in-one, config check,
# health, tokens, ledger export) and one `livemesh-<service>` per service. The
# Helm chart (helm/livemesh) runs one binary per workload by its `command`.
#
#   docker build -t livemesh:0.1.0 .
#   docker run --rm livemesh:0.1.0 livemesh --version
#
# See docs/deploy.md ("The image").

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build: the release binaries (protox compiles the protos: no protoc) ----
# `livemesh` without its default `lab` feature: the product's commands only,
# not the benchmarks, the demo or the topology check (crates/lab).
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins --exclude livemesh \
    && cargo build --release --locked -p livemesh --no-default-features \
    && mkdir -p /out \
    && find target/release -maxdepth 1 -type f -executable -name 'livemesh*' -exec cp {} /out/ \; \
    && ls -l /out

# ---- runtime: a slim Debian of the same release (same glibc), non-root ----
FROM debian:${DEBIAN_RELEASE}-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 livemesh \
    && useradd --system --uid 10001 --gid livemesh --home-dir /var/lib/livemesh \
        --shell /usr/sbin/nologin livemesh \
    && mkdir -p /var/lib/livemesh && chown livemesh:livemesh /var/lib/livemesh
COPY --from=build /out/ /usr/local/bin/
# The numeric id, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/livemesh
ENV LIVEMESH_DATA_DIR=/var/lib/livemesh
# gRPC, the plaintext health-only port (server.health_listen), metrics.
EXPOSE 50051 50052 9464
CMD ["livemesh", "up", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464"]
