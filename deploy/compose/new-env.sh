#!/bin/sh
# Writes a .env for docker-compose.yml (mode 600, never over an existing file) with a fresh random
# value for every password (openssl rand -hex 32: safe in a database URL) and API token (openssl rand
# -base64 32: serve wants at least 16 distinct characters, which a hex token lacks one time in four)
# and the stand-in CRMs' public demo credentials. From the repository root:
#   deploy/compose/new-env.sh            # writes ./.env
#   deploy/compose/new-env.sh FILE       # writes FILE
# Replace the EZFOCUS_* and QASHIER_* values with your real ones when you point
# deploy/compose/crm-sync.toml at your CRMs. Never commit the .env file.
set -eu
file=${1:-.env}
umask 077
set -C # noclobber: an existing file is an error, not overwritten
secret() { openssl rand -hex 32; }
token() { openssl rand -base64 32; }
if ! {
  cat <<ENV
POSTGRES_PASSWORD=$(secret)
CRM_SYNC_DB_PASSWORD=$(secret)
CRM_SYNC_ADMIN_TOKENS=$(token)
CRM_SYNC_READ_TOKENS=$(token)
GRAFANA_ADMIN_PASSWORD=$(secret)
# The stand-in CRMs of docker-compose.yml accept these (public demo credentials).
EZFOCUS_ACCOUNTS_KEY=00000000-0000-4000-8000-00000000a001
EZFOCUS_USERNAME=fixture-user
EZFOCUS_PASSWORD=fixture-password
QASHIER_USERNAME=fixture-user
QASHIER_PASSWORD=fixture-password
# Publish the ports on every interface instead of 127.0.0.1 only:
# CRM_SYNC_BIND_ADDRESS=0.0.0.0
ENV
} >"$file"; then
  echo "new-env.sh: cannot write $file (it exists already, or its folder is not writable)" >&2
  exit 1
fi
echo "new-env.sh: wrote $file (mode 600); keep it out of version control" >&2
