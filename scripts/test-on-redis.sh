#!/usr/bin/env bash
# Runs the end-to-end tests (tests/it) with every in-process server on a shared Redis store
# (CALLOPS_TEST_REDIS; each test app under its own key prefix), against a throw-away
# redis-server on a free loopback port. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server is required: apt-get install -y redis-server" >&2
  exit 1
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
  --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
trap 'kill "$(cat "$dir/redis.pid")" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then break; fi
  sleep 0.05
done
CALLOPS_TEST_REDIS="redis://127.0.0.1:$port" cargo test --locked --test it "$@"
