# Sourced by .ci/run: a redis-server on a loopback port for the gateway-replica tests (no persistence).
# start_redis exports QUANTGATE_TEST_REDIS_URL once it answers PING; stop_redis stops it. The test that
# stops Redis mid-load starts a server of its own (it must stop and restart it); the others share this one,
# each under its own key prefix.
start_redis() {
  local bin
  bin=$(command -v redis-server || true)
  if [ -z "$bin" ]; then
    echo "redis-server not installed: the gateway-replica tests will be skipped"
    return 0
  fi
  local port t0
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  REDIS_DIR=$(mktemp -d /tmp/quantgate-redis.XXXXXX)
  t0=$(date +%s.%N)
  "$bin" --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$REDIS_DIR" --protected-mode yes \
    --daemonize yes --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" || return 1
  for _ in $(seq 1 100); do  # readiness poll: PING answered
    python3 - "$port" <<'PY' && break
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.5) as s:
        s.sendall(b"PING\r\n")
        sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
    sleep 0.1
  done
  export QUANTGATE_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
  echo "redis-server on 127.0.0.1:$port, up in $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s"
}

stop_redis() {
  if [ -n "${REDIS_DIR:-}" ] && [ -f "$REDIS_DIR/redis.pid" ]; then
    kill "$(cat "$REDIS_DIR/redis.pid")" 2>/dev/null || true
    rm -rf "$REDIS_DIR"
  fi
}
