# syntax=docker/dockerfile:1
# One image for every role: `serve` (console, API, scheduler, workers), `worker`, `scheduler`,
# `migrate`, `demo`. Build:  docker build -t crm-sync .
# A slimmer image without Chromium (no Qashier-style browser exports):
#   docker build --build-arg CHROMIUM=0 -t crm-sync:slim .

FROM rust:1.94-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
 && mkdir migrations examples && touch examples/crm-sync.toml \
 && cargo build --release --locked --bin crm-sync || true
COPY src src
COPY migrations migrations
COPY examples examples
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin crm-sync \
 && cp target/release/crm-sync /usr/local/bin/crm-sync

FROM debian:bookworm-slim
ARG CHROMIUM=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && if [ "$CHROMIUM" = "1" ]; then apt-get install -y --no-install-recommends chromium fonts-liberation; fi \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/crm-sync --create-home crm-sync \
 && mkdir -p /etc/crm-sync /var/lib/crm-sync/backups \
 && chown -R crm-sync:crm-sync /var/lib/crm-sync \
 && chmod 700 /var/lib/crm-sync/backups
COPY --from=build /usr/local/bin/crm-sync /usr/local/bin/crm-sync
COPY examples /usr/share/crm-sync/examples
USER crm-sync
WORKDIR /var/lib/crm-sync
ENV CRM_SYNC_CONFIG=/etc/crm-sync/crm-sync.toml \
    CRM_SYNC_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["crm-sync", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["tini", "--", "crm-sync"]
CMD ["serve"]
