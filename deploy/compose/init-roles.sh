#!/bin/sh
# PostgreSQL's image runs this once, when the data volume is created: the login users of
# init-roles.sql, with the passwords the compose file passes in the environment.
set -eu
psql --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set migrate_password="$CREDITNOTES_MIGRATE_PASSWORD" \
  --set service_password="$CREDITNOTES_SERVICE_PASSWORD" \
  --file /docker-entrypoint-initdb.d/init-roles.sql.in
