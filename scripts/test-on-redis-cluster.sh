#!/usr/bin/env bash
# Runs the end-to-end tests (tests/it) with every in-process server on a shared store in a
# throw-away Redis Cluster (three masters, a replica each; scripts/redis-cluster.sh), as
# scripts/test-on-redis.sh does on one Redis, with the store's keys in 16 partitions
# (CALLOPS_TEST_REDIS_PARTITIONS). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "redis-server and redis-cli are required: apt-get install -y redis-server" >&2
  exit 1
fi
dir=$(mktemp -d)
trap 'scripts/redis-cluster.sh stop "$dir"; rm -rf "$dir"' EXIT
url=$(scripts/redis-cluster.sh "$dir")
echo "cluster: $url"
# The store in 16 partitions, spread over the three masters.
CALLOPS_TEST_REDIS="$url" CALLOPS_TEST_REDIS_PARTITIONS="${CALLOPS_TEST_REDIS_PARTITIONS:-16}" \
  cargo test --locked --test it "$@"
