#!/usr/bin/env bash
# Installs schemathesis (the OpenAPI fuzzer tests/fuzz_api.rs runs against `crm-sync serve`) from PyPI
# into the same venv as the emulators, ${CRM_SYNC_VENV:-$HOME/.cache/crm-sync/venv}, at a pinned
# version, and prints SCHEMATHESIS_BIN=<path to st>. Idempotent: a venv that has the pinned version is
# left alone. tests/fuzz_api.rs reads CRM_SYNC_SCHEMATHESIS_BIN, or runs `$0 install` itself.
set -euo pipefail

SCHEMATHESIS_VERSION="4.32.5"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CRATE_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
VENV="${CRM_SYNC_VENV:-$HOME/.cache/crm-sync/venv}"
case "$VENV" in /*) ;; *) VENV="$CRATE_DIR/$VENV" ;; esac
PY="$VENV/bin/python"

log() { echo "schemathesis.sh: $*" >&2; }

installed_ok() {
  [ -x "$PY" ] && [ -x "$VENV/bin/st" ] || return 1
  "$PY" - "$SCHEMATHESIS_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(0 if version("schemathesis") == sys.argv[1] else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

case "${1:-}" in
  install)
    if installed_ok; then
      log "schemathesis $SCHEMATHESIS_VERSION already installed in $VENV"
    else
      if [ ! -x "$PY" ]; then
        python="$(command -v python3.11 || command -v python3)"
        log "creating venv $VENV with $python"
        "$python" -m venv "$VENV"
      fi
      log "installing schemathesis==$SCHEMATHESIS_VERSION into $VENV"
      "$PY" -m pip install --disable-pip-version-check --quiet "schemathesis==$SCHEMATHESIS_VERSION" >&2
    fi
    echo "SCHEMATHESIS_BIN=$VENV/bin/st"
    ;;
  *) sed -n '2,5p' "$0" >&2; exit 2 ;;
esac
