# syntax=docker/dockerfile:1
# Meridian: multi-stage build of the `meridian` binary; the runtime image is Debian slim, runs as
# a non-root user, keeps its config and data in volumes, and reports health through /healthz.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin meridian

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="meridian" \
      org.opencontainers.image.description="Multi-region, Segment-compatible event ingestion" \
      org.opencontainers.image.source="https://github.com/meridian/meridian" \
      org.opencontainers.image.licenses="Apache-2.0"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/meridian meridian \
    && mkdir -p /var/lib/meridian /etc/meridian \
    && chown 10001 /var/lib/meridian
COPY --from=build /src/target/release/meridian /usr/local/bin/meridian
COPY config/meridian.toml /etc/meridian/meridian.toml
# MIMALLOC_ALLOW_THP=0: no transparent huge pages for the allocator's arenas, also on hosts whose
# THP setting is `always` (they doubled the resident set under load; see ARCHITECTURE.md).
ENV MERIDIAN_LISTEN=0.0.0.0:8080 \
    MERIDIAN_DATA_DIR=/var/lib/meridian \
    MIMALLOC_ALLOW_THP=0
USER 10001
VOLUME ["/var/lib/meridian", "/etc/meridian"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "-sf", "http://127.0.0.1:8080/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/meridian"]
CMD ["serve", "--config", "/etc/meridian/meridian.toml"]
