#!/usr/bin/env bash
# Starts a throw-away Redis Cluster on loopback in DIR: three masters and a replica each
# (AOF, appendfsync always, a 1 s node timeout so a failover takes seconds), and prints its
# store URL (redis+cluster://…). `scripts/redis-cluster.sh stop DIR` stops it.
set -euo pipefail

if [ "${1:-}" = "stop" ]; then
  for pid in "$2"/*/redis.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  exit 0
fi
dir=${1:?usage: scripts/redis-cluster.sh DIR | stop DIR}
nodes=()
for i in 1 2 3 4 5 6; do
  # A free port whose cluster bus port (10000 higher) is free too.
  port=$(python3 -c '
import random, socket
while True:
    port = random.randint(20000, 55000)
    try:
        for p in (port, port + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", p)); s.close()
        print(port); break
    except OSError:
        pass')
  mkdir -p "$dir/$i"
  redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-config-file "$dir/$i/nodes.conf" --cluster-node-timeout 1000 \
    --appendonly yes --appendfsync always --save "" --dir "$dir/$i" \
    --daemonize yes --pidfile "$dir/$i/redis.pid" --logfile "$dir/$i/redis.log"
  nodes+=("127.0.0.1:$port")
done
for node in "${nodes[@]}"; do
  for _ in $(seq 100); do
    if redis-cli -p "${node##*:}" ping 2>/dev/null | grep -q PONG; then break; fi
    sleep 0.05
  done
done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1
for node in "${nodes[@]}"; do
  for _ in $(seq 200); do
    if redis-cli -p "${node##*:}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then break; fi
    sleep 0.05
  done
done
seeds=$(IFS=,; echo "${nodes[*]}")
echo "redis+cluster://$seeds"
