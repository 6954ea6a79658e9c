#!/bin/sh
# Run by the postgres image on its first start (an empty data directory): creates the role
# crm-sync logs in as and its database (crm-sync-role.psql says what it may do and why that is
# enough). The password comes from CRM_SYNC_DB_PASSWORD, as DATABASE_URL of the crm-sync services.
set -eu
psql --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
  -v role=crm_sync -v database=crm_sync \
  -f /docker-entrypoint-initdb.d/crm-sync-role.psql
