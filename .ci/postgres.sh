# Sourced by .ci/run: a throwaway PostgreSQL on a loopback port for the MLflow-server test.
# start_postgres exports QUANTGATE_TEST_PG_URI (a superuser URI; the test creates its own database)
# and stops the server on exit. PostgreSQL refuses to run as root: as root it runs as `postgres`.
start_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -z "$bin" ] && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || true
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  fi
  if [ -z "$bin" ]; then
    echo "PostgreSQL not available: the MLflow-server test will be skipped"
    return 0
  fi
  PG_DIR=$(mktemp -d /tmp/quantgate-pg.XXXXXX)
  PG_BIN=$bin
  if [ "$(id -u)" = 0 ]; then chown postgres "$PG_DIR"; PG_AS="runuser -u postgres --"; else PG_AS=""; fi
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  $PG_AS "$bin/initdb" -D "$PG_DIR/data" -U quantgate --auth=trust -E UTF8 >"$PG_DIR/initdb.log" 2>&1 || return 1
  # -w: pg_ctl polls until the server accepts connections
  $PG_AS "$bin/pg_ctl" -D "$PG_DIR/data" -w -t 60 -l "$PG_DIR/server.log" \
    -o "-h 127.0.0.1 -p $port -k $PG_DIR -c fsync=off -c full_page_writes=off" start >/dev/null || return 1
  export QUANTGATE_TEST_PG_URI="postgresql://quantgate@127.0.0.1:$port/postgres"
  echo "PostgreSQL on 127.0.0.1:$port ($PG_DIR)"
}

stop_postgres() {
  if [ -n "${PG_DIR:-}" ]; then
    $PG_AS "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
  fi
}
