# syntax=docker/dockerfile:1

# Base images are pinned by digest, so a rebuild gets the bytes that were reviewed rather than whatever the tag
# points at today. To move on: `docker buildx imagetools inspect <tag>`, then replace tag and digest together.
#
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE=https://git.example.com/qx/qx-relay -t qx-relay:0.1.0 .

# ---- build: the toolchain stays in this stage ----
FROM rust:1.95.0-slim-bookworm@sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082 AS build
WORKDIR /src
# Stripping symbols keeps the image small; panics still print their message and location.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
# cargo-auditable embeds the crates and versions the binary was built from (a .dep-v0 section), so scanners
# (cargo audit bin, trivy, grype, syft) can tell what is inside the image. A layer of its own, before the
# sources, so it is built once.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo install --locked cargo-auditable@0.7.7
COPY . .
# Shown by the binary as qx_relay_build_info{revision}.
ARG REVISION=unknown
# BuildKit cache mounts keep the crate registry and compiled dependencies between builds. (A dummy-main
# dependency layer would also need stubs for every target Cargo.toml declares.) The binary is copied out
# because the target/ cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    QX_RELAY_REVISION="$REVISION" cargo auditable build --release --locked --bin qx-relay \
 && install -D -m 0755 target/release/qx-relay /out/qx-relay
# Shell completions and man pages, printed by the binary from the command-line definition it parses with, in
# the places the shells and man look (under /usr/share once copied). The runtime image has no shell to use
# them in: they are there for images built on top of it, and to copy out (docker cp).
RUN mkdir -p /out/share/bash-completion/completions /out/share/zsh/vendor-completions \
      /out/share/fish/vendor_completions.d /out/share/man/man1 \
 && /out/qx-relay completions bash >/out/share/bash-completion/completions/qx-relay \
 && /out/qx-relay completions zsh >/out/share/zsh/vendor-completions/_qx-relay \
 && /out/qx-relay completions fish >/out/share/fish/vendor_completions.d/qx-relay.fish \
 && /out/qx-relay man --out-dir /out/share/man/man1

# ---- runtime: glibc, libgcc, CA certificates and tzdata; no shell, no package manager ----
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="qx-relay" \
      org.opencontainers.image.description="Relays the Qx outbox table (qx_outbox_events) to NATS JetStream" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE"
COPY --from=build /out/qx-relay /usr/local/bin/qx-relay
COPY --from=build /out/share/ /usr/share/
COPY config/qx-relay.toml /etc/qx-relay/qx-relay.toml
ENV QX_RELAY_CONFIG=/etc/qx-relay/qx-relay.toml
# Numeric, so Kubernetes' runAsNonRoot can verify it; deploy/ runs as the same uid.
USER 10001:10001
# /metrics, /livez and /readyz when started with --metrics-addr 0.0.0.0:9464.
EXPOSE 9464
# Exec form: the relay is PID 1 and receives SIGTERM itself, so it can drain its batch before exiting.
ENTRYPOINT ["/usr/local/bin/qx-relay"]
CMD ["run"]
