# syntax=docker/dockerfile:1

# ---- build: the toolchain stays in this stage ----
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Stripping symbols keeps the image small; panics still print their message and location.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
COPY . .
# BuildKit cache mounts keep the crate registry and compiled dependencies between builds. (A dummy-main
# dependency layer would also need stubs for every target Cargo.toml declares.) The binary is copied out
# because the target/ cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin qx-relay \
 && install -D -m 0755 target/release/qx-relay /out/qx-relay

# ---- runtime: glibc, libgcc, CA certificates and tzdata; no shell, no package manager ----
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="qx-relay" \
      org.opencontainers.image.description="Relays the Qx outbox table (qx_outbox_events) to NATS JetStream" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/qx-relay /usr/local/bin/qx-relay
COPY config/qx-relay.toml /etc/qx-relay/qx-relay.toml
ENV QX_RELAY_CONFIG=/etc/qx-relay/qx-relay.toml
# Numeric, so Kubernetes' runAsNonRoot can verify it; deploy/ runs as the same uid.
USER 10001:10001
# /metrics, /livez and /readyz when started with --metrics-addr 0.0.0.0:9464.
EXPOSE 9464
# Exec form: the relay is PID 1 and receives SIGTERM itself, so it can drain its batch before exiting.
ENTRYPOINT ["/usr/local/bin/qx-relay"]
CMD ["run"]
