#!/usr/bin/env bash
# Proxy benchmark: wrk against (a) the upstream directly, (b) nginx proxy_pass with upstream
# keep-alive, (c) bare pingora (examples/bare_pingora.rs: pingora with no filter of ours, the
# framework's floor), (d) infergate-proxy with a valid token and (e) the same signing each
# forward for the runtime (--internal-signing-keys, an Ed25519 JWT per request); same upstream,
# same worker count, one run. Prints requests/s, p50 and p99 per target, the ratios, and the
# proxy's CPU time per request with and without signing. Not a CI test.
#
#   proxy/bench/run.sh [--duration 10s] [--connections 64] [--workers 1]
set -euo pipefail

duration=10s connections=64 workers=1
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    *) echo "usage: $0 [--duration 10s] [--connections 64] [--workers 1]" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bench="$repo/proxy/bench"
for tool in wrk nginx; do
  command -v "$tool" >/dev/null || { echo "installing $tool"; apt-get install -y -qq wrk nginx-light >/dev/null; }
done
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
cargo build --release --locked -q -p proxy --bin infergate-proxy --example bare_pingora
cargo build --release --locked -q -p internal-token --example signing_keys
target="$INFERGATE_TARGET"

work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
upstream_port=$(port) nginx_port=$(port) proxy_port=$(port) metrics_port=$(port) bare_port=$(port)
signed_port=$(port) signed_metrics_port=$(port)

nginx_conf() {  # $1: worker count, $2: server block
  cat <<CONF
worker_processes $1;
daemon off;
pid $work/nginx-$RANDOM.pid;
error_log stderr error;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work; proxy_temp_path $work;
  $2
}
CONF
}

# The upstream: a fixed JSON answer, as small as a real embedding call's overhead allows.
nginx_conf 1 "server { listen 127.0.0.1:$upstream_port; keepalive_requests 1000000;
  location / { default_type application/json; return 200 '{\"ok\":true}'; } }" > "$work/upstream.conf"
nginx_conf "$workers" "upstream model { server 127.0.0.1:$upstream_port; keepalive 128; }
  server { listen 127.0.0.1:$nginx_port; keepalive_requests 1000000;
    location /models/bench/proxy/ { proxy_pass http://model/; proxy_http_version 1.1;
      proxy_set_header Connection \"\"; proxy_set_header Authorization \"\"; proxy_buffering off; } }" > "$work/nginx.conf"
nginx -c "$work/upstream.conf" -e stderr & pids+=($!)
nginx -c "$work/nginx.conf" -e stderr & pids+=($!)

token_json="$(cargo run --release --locked -q -p crds --example bench_token)"
token="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["token"])' "$token_json")"
record="$(python3 -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1])["record"]))' "$token_json")"
cat > "$work/proxy.yaml" <<YAML
listen: 127.0.0.1:$proxy_port
metrics: 127.0.0.1:$metrics_port
threads: $workers
models:
  - {id: bench, endpoints: ["127.0.0.1:$upstream_port"]}
tokens: [$record]
YAML
RUST_LOG=warn "$target/release/infergate-proxy" --config "$work/proxy.yaml" 2>"$work/proxy.log" & pids+=($!)
proxy_pid=$!
sed -e "s/127.0.0.1:$proxy_port/127.0.0.1:$signed_port/" -e "s/127.0.0.1:$metrics_port/127.0.0.1:$signed_metrics_port/" \
  "$work/proxy.yaml" > "$work/signed.yaml"
"$target/release/examples/signing_keys" > "$work/signing.json"
RUST_LOG=warn "$target/release/infergate-proxy" --config "$work/signed.yaml" \
  --internal-signing-keys "$work/signing.json" 2>"$work/signed.log" & pids+=($!)
signed_pid=$!
"$target/release/examples/bare_pingora" "127.0.0.1:$bare_port" "127.0.0.1:$upstream_port" "$workers" 2>"$work/bare.log" & pids+=($!)

for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$proxy_port/readyz" >/dev/null && curl -sf "http://127.0.0.1:$signed_port/readyz" >/dev/null \
    && curl -sf "http://127.0.0.1:$nginx_port/models/bench/proxy/" >/dev/null && break
  sleep 0.1
done

# CPU time (user + system) of a process so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ticks_per_second=$(getconf CLK_TCK)

run() {  # $1: label, $2: connections, $3: url, $4: pid whose CPU to count (or -), $5...: wrk args
  local label="$1" conns="$2" url="$3" pid="$4"; shift 4
  wrk -t1 -c"$conns" -d2s "$@" "$url" >/dev/null  # warm-up: pools and caches
  local line before=0 after=0
  [ "$pid" = - ] || before=$(cpu_ticks "$pid")
  line="$(wrk -t1 -c"$conns" -d"$duration" -s "$bench/report.lua" "$@" "$url" | grep '^RESULT')"
  [ "$pid" = - ] || after=$(cpu_ticks "$pid")
  echo "$label c$conns $line cpu_s=$(python3 -c "print(($after - $before) / $ticks_per_second)")"
}

echo "wrk -t1 -d$duration; saturation at -c$connections, added latency at -c1; workers=$workers; $(nproc) cores"
results="$(
  for conns in "$connections" 1; do
    run direct    "$conns" "http://127.0.0.1:$upstream_port/v1/embed" -
    run nginx     "$conns" "http://127.0.0.1:$nginx_port/models/bench/proxy/v1/embed" -
    run pingora   "$conns" "http://127.0.0.1:$bare_port/v1/embed" -
    run infergate "$conns" "http://127.0.0.1:$proxy_port/models/bench/proxy/v1/embed" "$proxy_pid" -H "Authorization: Bearer $token"
    run signed    "$conns" "http://127.0.0.1:$signed_port/models/bench/proxy/v1/embed" "$signed_pid" -H "Authorization: Bearer $token"
  done
)"
python3 - "$results" <<'PY'
import re, sys
rows = {}
for line in sys.argv[1].splitlines():
    label, conns, rest = line.split(" ", 2)
    rows[(label, conns)] = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", rest)}
print(f"{'target':<10} {'conns':>5} {'req/s':>10} {'p50 µs':>8} {'p99 µs':>8} {'errors':>7} {'non-2xx':>8}")
for (label, conns), r in rows.items():
    print(f"{label:<10} {conns:>5} {r['rps']:>10.0f} {r['p50_us']:>8.0f} {r['p99_us']:>8.0f} {r['errors']:>7.0f} {r['non2xx']:>8.0f}")
sat, one = sorted({c for _, c in rows}, key=lambda c: -int(c[1:]))
ratio = rows[("infergate", sat)]["rps"] / rows[("nginx", sat)]["rps"]
print(f"throughput at {sat}, infergate/nginx: {ratio:.2f}x")
floor = rows[("pingora", sat)]["rps"]
print(f"throughput at {sat}, bare pingora/nginx: {floor / rows[('nginx', sat)]['rps']:.2f}x; infergate/bare pingora: {rows[('infergate', sat)]['rps'] / floor:.2f}x")
for conns in (sat, one):
    cost = {t: rows[(t, conns)]["cpu_s"] * 1e6 / rows[(t, conns)]["requests"] for t in ("infergate", "signed")}
    print(f"proxy CPU per request at {conns}: {cost['infergate']:.1f} µs unsigned, {cost['signed']:.1f} µs signing a JWT (+{cost['signed'] - cost['infergate']:.1f} µs); "
          f"throughput signed/unsigned {rows[('signed', conns)]['rps'] / rows[('infergate', conns)]['rps']:.2f}x")
for pct in ("p50_us", "p99_us"):
    added = {t: rows[(t, one)][pct] - rows[("direct", one)][pct] for t in ("infergate", "signed", "pingora", "nginx")}
    print(f"{pct[:3]} added over direct at c1: infergate {added['infergate']:.0f} µs (signing {added['signed']:.0f} µs), bare pingora {added['pingora']:.0f} µs, nginx {added['nginx']:.0f} µs")
PY
