#!/usr/bin/env bash
# Runs every cargo-fuzz target of proxy/fuzz and runtime/fuzz for N seconds (default 60), from
# the committed seeds (<crate>/fuzz/seeds/<target>) and the corpus kept in the cache, without a
# sanitizer (`-s none`, so stable Rust builds it). A crash fails the run and leaves its input
# in the cache's fuzz-artifacts/<target>/: add it to the seeds and turn it into a unit test.
# Prints one line per target: executions, corpus size, result.
#
# --dev builds the targets unoptimised (still instrumented, with debug assertions and overflow
# checks): on 2 cores about 6 minutes from nothing instead of 25, for fewer executions a second.
# The test command's short slice uses it; long runs should not.
#
#   scripts/fuzz.sh [--seconds 60] [--dev] [TARGET...]
set -euo pipefail

seconds=60
profile=release
only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --dev) profile=dev; shift ;;
    -*) echo "usage: $0 [--seconds 60] [--dev] [TARGET...]" >&2; exit 2 ;;
    *) only+=("$1"); shift ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
cache="${INFERGATE_CACHE:-$HOME/.cache/infergate}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz --version 0.13.2
# The chat_template target renders through the runtime's own sandboxed helper: the binary in
# INFERGATE_RUNTIME_BIN (the test command passes the one its tests built), else a debug build,
# made before RUSTC_BOOTSTRAP is set (cargo would otherwise rebuild the whole target directory).
if [ -z "${INFERGATE_RUNTIME_BIN:-}" ]; then
  cargo build -q -p runtime --bin infergate-runtime
  export INFERGATE_RUNTIME_BIN="$INFERGATE_TARGET/debug/infergate-runtime"
fi
export INFERGATE_RUNTIME_BIN
# cargo-fuzz's instrumentation flags need it on stable; its own target directories only.
fuzz() { RUSTC_BOOTSTRAP=1 cargo fuzz "$@"; }
build_flags=(-s none)
[ "$profile" = dev ] && build_flags+=(--dev)
# One target directory for both fuzz crates: the dependencies they share are built once.
target_dir="$cache/fuzz-target/$profile"

failed=0
for crate in proxy runtime; do
  fuzz_dir="$repo/$crate/fuzz"
  fuzz build "${build_flags[@]}" --fuzz-dir "$fuzz_dir" --target-dir "$target_dir" >/dev/null
  for target in $(fuzz list --fuzz-dir "$fuzz_dir"); do
    if [ "${#only[@]}" -gt 0 ] && [[ ! " ${only[*]} " == *" $target "* ]]; then
      continue
    fi
    corpus="$cache/fuzz-corpus/$target"
    artifacts="$cache/fuzz-artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    log="$(mktemp)"
    if fuzz run "${build_flags[@]}" --fuzz-dir "$fuzz_dir" --target-dir "$target_dir" "$target" \
        "$corpus" "$fuzz_dir/seeds/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
        -max_len=65536 -timeout=10 -artifact_prefix="$artifacts/" -print_final_stats=1 \
        >"$log" 2>&1; then
      result=ok
    else
      result=CRASH
      failed=1
      tail -40 "$log" >&2
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    printf 'fuzz %-16s %10s runs  %6s corpus  %s\n' "$target" "${runs:-?}" \
      "$(find "$corpus" -type f | wc -l)" "$result"
    rm -f "$log"
  done
done
exit "$failed"
