#!/usr/bin/env bash
# Writes tests/fixtures/upgrade/{v1-sqlite,v1-redis}: the same small data set written by an
# OLD callops release (the binary given), on SQLite and on Redis, for tests/it/upgrade.rs to
# open with the current build.
#
#   scripts/make-upgrade-fixtures.sh /path/to/old/target/debug/callops [OUT_DIR]
#
# Needs redis-server, redis-cli, curl and python3. Everything listens on 127.0.0.1 only.
# The data set (identical on both stores; operation ids and the emulator's event ids differ):
#   - call 11111111-…, context upgrade-removed: an ACS removal settled (Succeeded) by the
#     emulator's own callback;
#   - call 22222222-…: a Graph prompt (clientContext upgrade-prompt) cancelled by a
#     cancelMediaProcessing (clientContext upgrade-cancel) that settled, plus the observed
#     playPrompt operation Graph's `deleted` notification created;
#   - call 33333333-…, context upgrade-running: an ACS removal still Running (the emulator is
#     scripted to send no callback);
#   - call 44444444-…, context upgrade-parked: a callback (event id upgrade-parked-event-1)
#     for an operation that does not exist, so it is parked.
# Every window is long (retention and callback timeouts 10 years, dedupe 20 years so the
# event ids get dedupe rows of their own, park window 10 years) since Redis expiry and the
# SQLite park and dedupe ages are wall-clock: the fixtures must still hold all of it when a
# test opens them months later. Each store directory also gets expected.json: the old
# build's own view (GET /v1/operations and the parked event) after it wrote the data.
set -euo pipefail

OLD_BIN=${1:?usage: $0 OLD_CALLOPS_BINARY [OUT_DIR]}
OLD_BIN=$(realpath "$OLD_BIN")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${2:-$ROOT/tests/fixtures/upgrade}

WORK=$(mktemp -d)
CALLOPS_PID=""
REDIS_PID=""
cleanup() {
  [ -n "$CALLOPS_PID" ] && kill "$CALLOPS_PID" 2>/dev/null || true
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

TEN_YEARS_SECS=315360000
CALL_REMOVED=11111111-1111-4111-8111-111111111111
CALL_GRAPH=22222222-2222-4222-8222-222222222222
CALL_RUNNING=33333333-3333-4333-8333-333333333333
CALL_PARKED=44444444-4444-4444-8444-444444444444
PARKED_EVENT_ID=upgrade-parked-event-1

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Polls `cmd` (a shell snippet) until it succeeds, for at most $2 seconds.
await() {
  local what=$1 seconds=$2 cmd=$3 deadline=$((SECONDS + $2))
  until eval "$cmd" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "timed out after ${seconds}s waiting for: $what" >&2
      exit 1
    fi
    sleep 0.1
  done
}

# JSON field of stdin, e.g. `jget '["status"]'`.
jget() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

start_callops() {
  local store=$1
  PORT=$(free_port)
  EMU_PORT=$(free_port)
  BASE=http://127.0.0.1:$PORT
  EMU=http://127.0.0.1:$EMU_PORT
  CALLOPS_STORE=$store \
  CALLOPS_LISTEN=127.0.0.1:$PORT \
  CALLOPS_PUBLIC_URL=$BASE \
  CALLOPS_CALLBACK_AUTH=none \
  CALLOPS_EMULATOR__LISTEN=127.0.0.1:$EMU_PORT \
  CALLOPS_OPERATIONS__RETENTION_SECS=$TEN_YEARS_SECS \
  CALLOPS_OPERATIONS__DEDUPE_TTL_SECS=$((2 * TEN_YEARS_SECS)) \
  CALLOPS_OPERATIONS__PARK_TTL_MS=$((TEN_YEARS_SECS * 1000)) \
  CALLOPS_OPERATIONS__CALLBACK_TIMEOUTS__REMOVE_PARTICIPANT_SECS=$TEN_YEARS_SECS \
  CALLOPS_OPERATIONS__CALLBACK_TIMEOUTS__CANCEL_MEDIA_PROCESSING_SECS=$TEN_YEARS_SECS \
  CALLOPS_OPERATIONS__CALLBACK_TIMEOUTS__OBSERVED_SECS=$TEN_YEARS_SECS \
  CALLOPS_LOG_FORMAT=json \
    "$OLD_BIN" serve >"$WORK/callops-$(basename "$store").log" 2>&1 &
  CALLOPS_PID=$!
  await "callops on $BASE" 30 "curl -sf $BASE/healthz"
}

stop_callops() {
  kill -TERM "$CALLOPS_PID"
  local deadline=$((SECONDS + 30))
  while kill -0 "$CALLOPS_PID" 2>/dev/null; do
    [ $SECONDS -ge $deadline ] && { echo "callops did not stop on SIGTERM" >&2; exit 1; }
    sleep 0.1
  done
  wait "$CALLOPS_PID" || { echo "callops exited with an error" >&2; exit 1; }
  CALLOPS_PID=""
}

operation() { curl -sf "$BASE/v1/operations/$1?wait=${2:-0}"; }

# The data set, through the running old callops; writes the old build's view to $1.
write_data_set() {
  local expected=$1

  # 1. A removal the emulator settles with its own callback.
  local removed
  removed=$(curl -sf -X POST "$BASE/v1/acs/callConnections/$CALL_REMOVED/participants:remove" \
    -H 'content-type: application/json' \
    -d '{"participantToRemove": {"rawId": "8:acs:upgrade_removed"}, "operationContext": "upgrade-removed"}' \
    | jget '["id"]')
  await "removal $removed Succeeded" 20 \
    "operation $removed 5 | jget '[\"status\"]' | grep -qx Succeeded"

  # 2. A Graph prompt, then a cancelMediaProcessing that settles at once and cancels it.
  local token cancel
  token=$(curl -sf "$EMU/emulator-tenant/oauth2/v2.0/token" \
    -d client_id=emulator-client -d client_secret=emulator-secret-not-a-secret \
    -d scope=https://graph.microsoft.com/.default -d grant_type=client_credentials \
    | jget '["access_token"]')
  curl -sf -X POST "$EMU/v1.0/communications/calls/$CALL_GRAPH/playPrompt" \
    -H "authorization: Bearer $token" -H 'content-type: application/json' \
    -d '{"clientContext": "upgrade-prompt", "prompts": []}' >/dev/null
  cancel=$(curl -sf -X POST "$BASE/v1/graph/calls/$CALL_GRAPH/cancelMediaProcessing" \
    -H 'content-type: application/json' -d '{"clientContext": "upgrade-cancel"}' \
    | jget '["id"]')
  await "cancel $cancel Succeeded" 20 \
    "operation $cancel 5 | jget '[\"status\"]' | grep -qx Succeeded"
  # Graph's `deleted` notification for the prompt: the observed playPrompt fails (cancelled).
  await "the cancelled prompt observed as Failed" 20 \
    "curl -sf '$BASE/v1/operations?context=upgrade-prompt' | jget '[\"value\"][0][\"status\"]' | grep -qx Failed"

  # 3. A removal left Running: the emulator is told not to call back for this call.
  curl -sf -X PUT "$EMU/emulator/scripts/$CALL_RUNNING" \
    -H 'content-type: application/json' -d '{"noCallback": true}' >/dev/null
  local running
  running=$(curl -sf -X POST "$BASE/v1/acs/callConnections/$CALL_RUNNING/participants:remove" \
    -H 'content-type: application/json' \
    -d '{"participantToRemove": {"rawId": "8:acs:upgrade_running"}, "operationContext": "upgrade-running"}' \
    | jget '["id"]')
  await "removal $running Running" 20 \
    "operation $running | jget '[\"status\"]' | grep -qx Running"
  # The emulator has answered and sends nothing: it got exactly one request for this call.
  await "the emulator's request for $CALL_RUNNING" 20 \
    "curl -sf $EMU/emulator/requests | grep -q $CALL_RUNNING"

  # 4. A callback for an operation nobody has started: parked.
  local parked_event
  parked_event=$(cat <<EOF
[{"id": "$PARKED_EVENT_ID",
  "source": "calling/callConnections/$CALL_PARKED",
  "subject": "calling/callConnections/$CALL_PARKED",
  "type": "Microsoft.Communication.RemoveParticipantSucceeded",
  "time": "2026-12-01T10:00:00.0000000+00:00",
  "specversion": "1.0",
  "datacontenttype": "application/json",
  "data": {"version": "2024-09-15", "operationContext": "upgrade-parked",
           "callConnectionId": "$CALL_PARKED", "serverCallId": "c2VydmVy",
           "correlationId": "b880bd5a-1916-470a-b43d-aabf3caff91c",
           "resultInformation": {"code": 200, "subCode": 0, "message": "The participant was removed from the call."},
           "participant": {"rawId": "8:acs:upgrade_parked", "communicationUser": {"id": "8:acs:upgrade_parked"}},
           "publicEventType": "Microsoft.Communication.RemoveParticipantSucceeded"}}]
EOF
)
  local summary
  summary=$(curl -sf -X POST "$BASE/callbacks/acs" -H 'content-type: application/json' \
    -d "$parked_event")
  echo "$summary" | jget '["parked"]' | grep -qx 1 \
    || { echo "the callback was not parked: $summary" >&2; exit 1; }

  # The old build's view, for the test to compare with the new one's.
  python3 - "$expected" "$removed" "$cancel" "$running" "$parked_event" \
    "$(curl -sf "$BASE/v1/operations?maxpagesize=100")" <<'EOF'
import json, sys
path, removed, cancel, running, parked_event, page = sys.argv[1:]
page = json.loads(page)
operations = sorted(page["value"], key=lambda op: op["id"])
assert len(operations) == 4, f"4 operations expected, found {len(operations)}"
by_id = {op["id"]: op for op in operations}
removed_events = by_id[removed]["events"]
prompt = [op for op in operations if op.get("context") == "upgrade-prompt"][0]
expected = {
    "settledRemoval": {"id": removed, "callConnectionId": "11111111-1111-4111-8111-111111111111",
                       "context": "upgrade-removed", "eventId": removed_events[0]["id"]},
    "cancel": {"id": cancel, "callId": "22222222-2222-4222-8222-222222222222",
               "context": "upgrade-cancel"},
    "cancelledPrompt": {"id": prompt["id"], "context": "upgrade-prompt",
                        "eventId": prompt["events"][0]["id"]},
    "runningRemoval": {"id": running, "callConnectionId": "33333333-3333-4333-8333-333333333333",
                       "context": "upgrade-running"},
    "parkedCallback": json.loads(parked_event)[0],
    "operations": operations,
}
with open(path, "w") as f:
    json.dump(expected, f, indent=1, sort_keys=True)
    f.write("\n")
EOF
}

rm -rf "$OUT/v1-sqlite" "$OUT/v1-redis"
mkdir -p "$OUT/v1-sqlite" "$OUT/v1-redis"

# --- SQLite -----------------------------------------------------------------------------
start_callops "$WORK/sqlite/callops.db"
write_data_set "$OUT/v1-sqlite/expected.json"
stop_callops
# One self-contained file: fold the WAL in, leave rollback-journal mode (a reader then
# needs no -wal/-shm), compact.
python3 - "$WORK/sqlite/callops.db" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
db.execute("PRAGMA journal_mode=DELETE")
db.execute("VACUUM")
counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
          for t in ("operations", "seen", "parked")}
version = db.execute("PRAGMA user_version").fetchone()[0]
db.close()
print(f"sqlite: user_version {version}, rows {counts}")
EOF
for extra in -wal -shm -journal; do
  [ ! -e "$WORK/sqlite/callops.db$extra" ] || { echo "callops.db$extra left behind" >&2; exit 1; }
done
cp "$WORK/sqlite/callops.db" "$OUT/v1-sqlite/callops.db"

# --- Redis ------------------------------------------------------------------------------
REDIS_PORT=$(free_port)
mkdir -p "$WORK/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" \
  --appendonly yes --appendfsync always --save "" --daemonize no \
  >"$WORK/redis-server.log" 2>&1 &
REDIS_PID=$!
await "redis-server on $REDIS_PORT" 20 "redis-cli -p $REDIS_PORT ping | grep -qx PONG"
start_callops "redis://127.0.0.1:$REDIS_PORT"
write_data_set "$OUT/v1-redis/expected.json"
stop_callops
redis-cli -p "$REDIS_PORT" SAVE | grep -qx OK
echo "redis: $(redis-cli -p "$REDIS_PORT" DBSIZE) keys"
cp "$WORK/redis/dump.rdb" "$OUT/v1-redis/dump.rdb"
redis-cli -p "$REDIS_PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
wait "$REDIS_PID" 2>/dev/null || true
REDIS_PID=""

ls -l "$OUT/v1-sqlite" "$OUT/v1-redis"
