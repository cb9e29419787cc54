#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ one after the other, each for a bounded time, then
# prints what each did. Exits non-zero when a target crashed (or could not run).
#
# usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 60
#   TARGET              acs_events, graph_notifications, connection_string, token (default: all)
#
# Environment: FUZZ_SANITIZER (address, the cargo-fuzz default, or none; none is faster),
# FIXTURES (where the seed fixtures are; default tests/fixtures), CARGO_TARGET_DIR as usual.
# Crash inputs land in fuzz/artifacts/<target>/, the corpus grows in fuzz/corpus/<target>/,
# libFuzzer's output is kept in fuzz/logs/<target>.log.
set -euo pipefail

ALL_TARGETS=(acs_events graph_notifications connection_string token)

usage() {
  sed -n '5,7s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

seconds=60
if [[ $# -gt 0 ]]; then
  [[ $1 =~ ^[1-9][0-9]*$ ]] || usage
  seconds=$1
  shift
fi
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=("${ALL_TARGETS[@]}")
fi
for target in "${targets[@]}"; do
  [[ " ${ALL_TARGETS[*]} " == *" $target "* ]] || { echo "unknown target: $target" >&2; usage; }
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
fuzz_dir=$root/fuzz
fixtures=${FIXTURES:-$root/tests/fixtures}
sanitizer=${FUZZ_SANITIZER:-address}

# cargo-fuzz, and a nightly toolchain for it (it needs -Z flags).
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
if rustc --version | grep -q -- -nightly; then
  cargo_fuzz=(cargo fuzz)
elif rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  cargo_fuzz=(cargo +nightly fuzz)
else
  echo "cargo fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 1
fi
# Overflow checks and debug assertions on, so arithmetic bugs panic too.
build_flags=(--fuzz-dir "$fuzz_dir" --debug-assertions --sanitizer "$sanitizer")

max_len() {
  case $1 in
    connection_string) echo 4096 ;;
    token) echo 16384 ;; # the longest token read
    *) echo 262144 ;; # the HTTP body limit (http.body_limit_bytes)
  esac
}

dict() {
  case $1 in
    connection_string) echo "$fuzz_dir/dict/connection_string.dict" ;;
    *) echo "$fuzz_dir/dict/json.dict" ;;
  esac
}

# Seeds: the recorded callbacks for the decoders, a few connection strings for the parser.
# Copied under their own names, so a rerun adds nothing new.
seed() {
  local target=$1 corpus=$fuzz_dir/corpus/$1 file
  mkdir -p "$corpus"
  case $target in
    acs_events) set -- "$fixtures"/acs/*.json ;;
    graph_notifications) set -- "$fixtures"/graph/*.json ;;
    connection_string) set -- "$fuzz_dir"/seeds/connection_string/* ;;
    token) set -- "$fuzz_dir"/seeds/token/* ;;
  esac
  for file in "$@"; do
    local copy=$corpus/seed-$(basename "$file")
    if [[ -f $file && ! -e $copy ]]; then
      cp "$file" "$copy"
    fi
  done
}

echo "== building ${targets[*]} (sanitizer: $sanitizer)" >&2
for target in "${targets[@]}"; do
  "${cargo_fuzz[@]}" build "${build_flags[@]}" "$target"
done

mkdir -p "$fuzz_dir/logs"
rows=()
failed=0
for target in "${targets[@]}"; do
  seed "$target"
  artifacts=$fuzz_dir/artifacts/$target
  mkdir -p "$artifacts"
  log=$fuzz_dir/logs/$target.log
  marker=$(mktemp)
  echo "== fuzzing $target for ${seconds}s (log: $log)" >&2
  start=$(date +%s)
  status=0
  "${cargo_fuzz[@]}" run "${build_flags[@]}" "$target" "$fuzz_dir/corpus/$target" -- \
    -max_total_time="$seconds" \
    -max_len="$(max_len "$target")" \
    -timeout=5 \
    -rss_limit_mb=2048 \
    -dict="$(dict "$target")" \
    -artifact_prefix="$artifacts/" \
    -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  elapsed=$(($(date +%s) - start))
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  # Crashes of this run: the inputs libFuzzer saved while it ran.
  crashes=$(find "$artifacts" -maxdepth 1 -type f -newer "$marker" | wc -l)
  rm -f "$marker"
  corpus=$(find "$fuzz_dir/corpus/$target" -maxdepth 1 -type f | wc -l)
  if [[ $crashes -gt 0 || $status -ne 0 ]]; then
    failed=1
    echo "!! $target: exit status $status, $crashes new file(s) in $artifacts; end of its log:" >&2
    grep -v '^#[0-9]' "$log" | tail -n 40 >&2
  fi
  rows+=("$(printf '%-20s %8s %14s %8s %7s %8s %7s' "$target" "$elapsed" "${executions:-?}" \
    "${rate:-?}" "$corpus" "$crashes" "$status")")
done

printf '\n%-20s %8s %14s %8s %7s %8s %7s\n' target seconds executions exec/s corpus crashes status
printf '%s\n' "${rows[@]}"
exit "$failed"
