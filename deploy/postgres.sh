#!/bin/sh
# Entry point of the PostgreSQL image: on first start, a data directory in PGDATA with the superuser PGUSER
# (password POSTGRES_PASSWORD, checked with SCRAM on TCP) and the database PGDATABASE; then the server,
# listening on 127.0.0.1:PGPORT only, and on a socket in PGHOST that only processes inside the container
# reach (trusted: psql, or pg_dump for a backup).
set -eu
: "${PGUSER:?}" "${PGDATABASE:?}" "${PGPORT:?}" "${PGHOST:?}" "${POSTGRES_PASSWORD:?}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    initdb --pgdata="$PGDATA" --username="$PGUSER" --pwfile="$password_file" \
        --auth-host=scram-sha-256 --auth-local=trust --encoding=UTF8 --locale=C.UTF-8
    rm -f "$password_file"
    echo "CREATE DATABASE \"$PGDATABASE\";" | postgres --single -D "$PGDATA" postgres > /dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses=127.0.0.1 -c port="$PGPORT" -c unix_socket_directories="$PGHOST"
