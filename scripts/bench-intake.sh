#!/usr/bin/env bash
# The webhook-intake benchmark in one command: a private PostgreSQL cluster (fsync and
# synchronous_commit on, as shipped), a release `tether serve` with its workers off, and
# `tether-loadgen` at rising concurrency with pgbench on the same cluster after each level.
#
#   scripts/bench-intake.sh                 # levels 1,8,32,64,128,256, 8 s each
#   LEVELS=8,128 SECONDS_PER_LEVEL=5 scripts/bench-intake.sh
#
# Needs PostgreSQL 15's server binaries and pgbench (PG_BIN, default /usr/lib/postgresql/15/bin).
# As root, PostgreSQL runs as the `postgres` user (initdb refuses root). Everything it starts is
# stopped and removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PORT=${PG_PORT:-55439}
HTTP=${TETHER_BENCH_LISTEN:-127.0.0.1:8080}
WORK=$(mktemp -d /tmp/tether-bench-intake.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$WORK"

cargo build --release --bins --quiet
as_pg "$PG_BIN/initdb" -D "$WORK/data" -U postgres -A trust >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -w -l "$WORK/postgres.log" \
  -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=256MB" start >/dev/null
TETHER_PID=
cleanup() {
  [ -n "$TETHER_PID" ] && kill "$TETHER_PID" 2>/dev/null && wait "$TETHER_PID" 2>/dev/null || true
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for db in tether bench; do "$PG_BIN/psql" -qh 127.0.0.1 -p "$PORT" -U postgres -c "CREATE DATABASE $db"; done

TETHER_ZENDESK__BASE_URL=http://127.0.0.1:1 TETHER_ZENDESK__EMAIL=bench@tether.test \
TETHER_ZENDESK__API_TOKEN=unused TETHER_ZENDESK__WEBHOOK_SECRETS=bench-secret \
TETHER_WORKERS__ENABLED=false TETHER_LOG_LEVEL=warn TETHER_LISTEN="$HTTP" \
DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/tether" \
  ./target/release/tether serve 2>"$WORK/tether.log" &
TETHER_PID=$!
for _ in $(seq 50); do curl -sf "http://$HTTP/readyz" >/dev/null && break; sleep 0.2; done

echo "$(date -u '+%F %T UTC'), $(uptime | sed 's/.*load/load/')"
PATH="$PG_BIN:$PATH" ./target/release/tether-loadgen --url "http://$HTTP/webhooks/zendesk" \
  --secret bench-secret --tether-pid "$TETHER_PID" --postgres-pid "$(head -1 "$WORK/data/postmaster.pid")" \
  --pgbench-url "postgres://postgres@127.0.0.1:$PORT/bench" \
  --levels "${LEVELS:-1,8,32,64,128,256}" --seconds "${SECONDS_PER_LEVEL:-8}"
echo "$(date -u '+%F %T UTC'), $(uptime | sed 's/.*load/load/')"
