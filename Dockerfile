# callops container image: see docs/deploy.md.
#
#   docker build -t callops .
#   docker run --rm -p 8080:8080 -v callops-data:/data -e CALLOPS_EMULATOR__ENABLED=true callops
#
# TLS: reqwest's rustls (on aws-lc-rs) verifies against the system trust store, which
# distroless/cc ships in /etc/ssl/certs; a derived image may add a private CA there.

ARG RUST_VERSION=1.95

# Dependencies are built in a layer of their own (cargo-chef's recipe holds only the
# manifests and lock file), so a change to the sources rebuilds callops alone.
FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install --locked cargo-chef --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --bin callops --recipe-path recipe.json
COPY . .
# The default configuration (config/default.toml) and the emulator's development keys are
# compiled in: the binary is the whole application. (Plain Dockerfile syntax, no BuildKit
# cache mounts: any builder can run it.)
# Stripped (-s): the release profile keeps line tables for profiling, which the image does
# not need (about 105 MB unstripped, 17 MB stripped).
RUN cargo build --release --locked --bin callops \
 && install -D -s -m 0755 target/release/callops /out/callops
# The runtime image has no shell: its one writable directory is made here, owned by the
# distroless `nonroot` user (65532). A new named volume mounted on /data starts as a copy.
RUN install -d -o 65532 -g 65532 -m 0750 /out/data

# glibc and libgcc (bookworm, as the builder), CA certificates, tzdata; no shell, no curl.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="callops" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.description="Call-control operations on Azure Communication Services and Microsoft Graph, with their callbacks correlated and their outcomes polled over HTTP"
COPY --from=builder /out/callops /usr/local/bin/callops
COPY --from=builder --chown=65532:65532 /out/data /data
USER 65532:65532
# Only /data is written (the SQLite store and its -wal/-shm files); the rest of the
# filesystem may be read-only. A relative CALLOPS_STORE also lands in the volume.
WORKDIR /data
# The emulator is off: an image started without its ACS and Graph settings refuses to start
# rather than serve "healthy" against a stand-in (-e CALLOPS_EMULATOR__ENABLED=true to try it).
ENV CALLOPS_LISTEN=0.0.0.0:8080 \
    CALLOPS_STORE=/data/callops.db \
    CALLOPS_LOG_FORMAT=json \
    CALLOPS_EMULATOR__ENABLED=false
VOLUME /data
EXPOSE 8080
# Docker and Compose use this; Azure Container Apps and Kubernetes ignore it and use their own
# probes (GET /healthz for liveness, GET /readyz for readiness).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/callops", "healthcheck"]
# On SIGTERM callops stops accepting, drains and commits, well within the usual 30 s grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/callops"]
CMD ["serve"]
