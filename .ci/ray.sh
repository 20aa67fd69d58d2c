# Sourced by .ci/run (and usable by hand, see deploy/ray.md): a Ray head and one extra worker node on
# loopback, each with one CPU, for the Ray-executor tests. start_ray exports RAY_CLUSTER_ADDRESS and
# QUANTGATE_TEST_RAY_ADDRESS (HOST:PORT of the head) once both nodes are up; stop_ray stops both.
# Needs `ray` from the venv (the `ray` extra): RAY_BIN overrides where it is looked for.
start_ray() {
  local ray_bin=${RAY_BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/ray}
  [ -x "$ray_bin" ] || ray_bin=$(command -v ray || true)
  if [ -z "$ray_bin" ] || [ ! -x "$ray_bin" ]; then
    echo "ray not installed (pip install 'quantgate[ray]'): the Ray-executor tests will be skipped"
    return 0
  fi
  RAY_BIN_USED=$ray_bin
  local port t0 nodes
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  t0=$(date +%s.%N)
  # one node on this machine is enough to be a cluster; the second proves steps spread across nodes
  "$ray_bin" start --head --node-ip-address 127.0.0.1 --port "$port" --num-cpus 1 --num-gpus 0 \
    --object-store-memory 200000000 --disable-usage-stats --include-dashboard=false >/tmp/quantgate-ray-head.log 2>&1 \
    || { cat /tmp/quantgate-ray-head.log; return 1; }
  "$ray_bin" start --address "127.0.0.1:$port" --node-ip-address 127.0.0.1 --num-cpus 1 --num-gpus 0 \
    --object-store-memory 200000000 --disable-usage-stats >/tmp/quantgate-ray-worker.log 2>&1 \
    || { cat /tmp/quantgate-ray-worker.log; return 1; }
  # both nodes registered with the head (ray status lists each as a line "1 node_...")
  for _ in $(seq 1 120); do
    nodes=$("$ray_bin" status --address "127.0.0.1:$port" 2>/dev/null | grep -c ' node_' || true)
    [ "${nodes:-0}" -ge 2 ] && break
    sleep 0.5
  done
  if [ "${nodes:-0}" -lt 2 ]; then
    echo "the Ray cluster on 127.0.0.1:$port did not reach 2 nodes"
    return 1
  fi
  export RAY_CLUSTER_ADDRESS="127.0.0.1:$port"
  export QUANTGATE_TEST_RAY_ADDRESS="$RAY_CLUSTER_ADDRESS"
  echo "Ray head + 1 worker node on $RAY_CLUSTER_ADDRESS, up in $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s"
}

stop_ray() {
  if [ -n "${RAY_BIN_USED:-}" ]; then
    "$RAY_BIN_USED" stop --force >/dev/null 2>&1 || true
  fi
}
