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

# An `mlflow server` on top of that PostgreSQL (runs, registry and aliases in a database of its own,
# artifacts proxied into a folder): exports QUANTGATE_TEST_MLFLOW_URI and QUANTGATE_TEST_MLFLOW_ARTIFACTS
# once /health answers. Call after start_postgres; stop_mlflow_server stops it.
start_mlflow_server() {
  [ -n "${QUANTGATE_TEST_PG_URI:-}" ] || { echo "no PostgreSQL: the MLflow-server test will be skipped"; return 0; }
  local py port t0 db
  py=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  db="${QUANTGATE_TEST_PG_URI%/*}/mlflow_ci"
  t0=$(date +%s.%N)
  "$py" -c "import psycopg, sys; psycopg.connect(sys.argv[1], autocommit=True).execute('CREATE DATABASE mlflow_ci')" \
    "$QUANTGATE_TEST_PG_URI" || return 1
  MLFLOW_DIR=$(mktemp -d /tmp/quantgate-mlflow.XXXXXX)
  # its own session (setsid), so stopping it reaches the workers it starts (uvicorn, the job consumer)
  setsid "$py" -m mlflow server --backend-store-uri "$db" --artifacts-destination "$MLFLOW_DIR/artifacts" \
    --serve-artifacts --host 127.0.0.1 --port "$port" --workers 1 >"$MLFLOW_DIR/server.log" 2>&1 &
  MLFLOW_PID=$!
  for _ in $(seq 1 360); do  # readiness poll: /health answers (migrations run first)
    python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2).read()" \
      "http://127.0.0.1:$port/health" 2>/dev/null && break
    kill -0 "$MLFLOW_PID" 2>/dev/null || { cat "$MLFLOW_DIR/server.log"; return 1; }
    sleep 0.5
  done
  export QUANTGATE_TEST_MLFLOW_URI="http://127.0.0.1:$port"
  export QUANTGATE_TEST_MLFLOW_ARTIFACTS="$MLFLOW_DIR/artifacts"
  echo "mlflow server (PostgreSQL backend) on $QUANTGATE_TEST_MLFLOW_URI, up in $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s"
}

stop_mlflow_server() {
  if [ -n "${MLFLOW_PID:-}" ]; then
    kill -TERM -- "-$MLFLOW_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 -- "-$MLFLOW_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$MLFLOW_PID" 2>/dev/null || true
    wait "$MLFLOW_PID" 2>/dev/null || true
    rm -rf "$MLFLOW_DIR"
  fi
}
