#!/usr/bin/env bash
# Proxy benchmark, one run, side by side on the same upstreams and worker count:
#   direct     the upstream itself (the floor),
#   nginx      nginx proxy_pass with upstream keep-alive and no buffering,
#   pingora    bare pingora-proxy with no filter of ours (examples/bare_pingora.rs),
#   infergate  infergate-proxy with a valid token, built as it ships (the `dist` profile: LTO,
#              one codegen unit),
#   signed     the same, signing a JWT for the runtime on every forward (--internal-signing-keys,
#              as the chart runs it),
#   release    infergate as `infergate`, from the plain release profile (what LTO is worth).
# Scenarios: a small JSON answer at saturation (-c64) and at one connection (the latency a
# proxy adds), 1 KB and 64 KB answers at saturation, and 200 server-sent-event streams at once
# (proxy/examples/sse_bench.rs). CPU per request is the user + system time of the proxy's
# processes from /proc over the measured run. Where the machine has two cores or more, the
# proxies run pinned to the last core and the load generators and upstreams to the others, so
# that a proxy's time is its own. Not a CI test: figures depend on the machine.
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
for tool in wrk nginx taskset; do
  command -v "$tool" >/dev/null || { echo "installing $tool"; apt-get install -y -qq wrk nginx-light util-linux >/dev/null; }
done
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
cargo build --profile dist --locked -q -p proxy --bin infergate-proxy --example bare_pingora --example sse_bench
cargo build --release --locked -q -p proxy --bin infergate-proxy
cargo build --release --locked -q -p internal-token --example signing_keys
cargo build --release --locked -q -p crds --example bench_token
target="$INFERGATE_TARGET"
dist="$target/dist"

cores=$(nproc)
if [ "$cores" -ge 2 ]; then
  pin_proxy=(taskset -c "$((cores - 1))") pin_load=(taskset -c "0-$((cores - 2))")
  placement="proxies pinned to core $((cores - 1)), load and upstreams to cores 0-$((cores - 2))"
else
  pin_proxy=() pin_load=() placement="one core: nothing pinned"
fi

work="$(mktemp -d)"
pids=()
# Every process started here leads its own process group, so that the proxies' workers
# and any stray child go with it.
cleanup() { for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
started=
start() {  # $1: log file, $2...: command; its pid goes to $started
  local log="$1"; shift
  setsid "$@" >/dev/null 2>"$log" &
  started=$!
  pids+=("$started")
}

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
upstream_port=$(port) sse_port=$(port) nginx_port=$(port) bare_port=$(port) bare_sse_port=$(port)
proxy_port=$(port) metrics_port=$(port) signed_port=$(port) signed_metrics_port=$(port)
release_port=$(port) release_metrics_port=$(port)

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

# The upstream: a fixed small JSON answer (an embedding call's overhead), and 1 KB and 64 KB ones.
python3 -c 'import json,sys; [open(f"{sys.argv[1]}/{n}.json","w").write(json.dumps({"data": "x" * (size - 12)})) for n, size in (("1k", 1024), ("64k", 65536))]' "$work"
nginx_conf 1 "server { listen 127.0.0.1:$upstream_port; keepalive_requests 1000000; default_type application/json;
  location = /v1/1k { alias $work/1k.json; }
  location = /v1/64k { alias $work/64k.json; }
  location / { return 200 '{\"ok\":true}'; } }" > "$work/upstream.conf"
nginx_conf "$workers" "upstream model { server 127.0.0.1:$upstream_port; keepalive 256; }
  upstream sse { server 127.0.0.1:$sse_port; keepalive 256; }
  server { listen 127.0.0.1:$nginx_port; keepalive_requests 1000000;
    location /models/bench/proxy/ { proxy_pass http://model/; proxy_http_version 1.1;
      proxy_set_header Connection \"\"; proxy_set_header Authorization \"\"; proxy_buffering off; }
    location /models/bench-sse/proxy/ { proxy_pass http://sse/; proxy_http_version 1.1;
      proxy_set_header Connection \"\"; proxy_set_header Authorization \"\"; proxy_buffering off; } }" > "$work/nginx.conf"
start "$work/upstream.log" "${pin_load[@]}" nginx -c "$work/upstream.conf" -e stderr
sse_events=100 sse_interval_ms=50 sse_streams=200
start "$work/sse.log" "${pin_load[@]}" "$dist/examples/sse_bench" upstream "127.0.0.1:$sse_port" "$sse_events" "$sse_interval_ms"
start "$work/nginx.log" "${pin_proxy[@]}" nginx -c "$work/nginx.conf" -e stderr
nginx_pid=$started

token_json="$("$target/release/examples/bench_token")"
token="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["token"])' "$token_json")"
record="$(python3 -c 'import json,sys; r=json.loads(sys.argv[1])["record"]; r["models"].append("bench-sse"); print(json.dumps(r))' "$token_json")"
cat > "$work/proxy.yaml" <<YAML
listen: 127.0.0.1:$proxy_port
metrics: 127.0.0.1:$metrics_port
threads: $workers
models:
  - {id: bench, endpoints: ["127.0.0.1:$upstream_port"]}
  - {id: bench-sse, endpoints: ["127.0.0.1:$sse_port"]}
tokens: [$record]
YAML
sed -e "s/127.0.0.1:$proxy_port/127.0.0.1:$signed_port/" -e "s/127.0.0.1:$metrics_port/127.0.0.1:$signed_metrics_port/" \
  "$work/proxy.yaml" > "$work/signed.yaml"
"$target/release/examples/signing_keys" > "$work/signing.json"
export RUST_LOG=warn
start "$work/proxy.log" "${pin_proxy[@]}" "$dist/infergate-proxy" --config "$work/proxy.yaml"
proxy_pid=$started
sed -e "s/127.0.0.1:$proxy_port/127.0.0.1:$release_port/" -e "s/127.0.0.1:$metrics_port/127.0.0.1:$release_metrics_port/" \
  "$work/proxy.yaml" > "$work/release.yaml"
start "$work/release.log" "${pin_proxy[@]}" "$target/release/infergate-proxy" --config "$work/release.yaml"
release_pid=$started
start "$work/signed.log" "${pin_proxy[@]}" "$dist/infergate-proxy" --config "$work/signed.yaml" \
  --internal-signing-keys "$work/signing.json"
signed_pid=$started
start "$work/bare.log" "${pin_proxy[@]}" "$dist/examples/bare_pingora" "127.0.0.1:$bare_port" "127.0.0.1:$upstream_port" "$workers"
bare_pid=$started
start "$work/bare-sse.log" "${pin_proxy[@]}" "$dist/examples/bare_pingora" "127.0.0.1:$bare_sse_port" "127.0.0.1:$sse_port" "$workers"
bare_sse_pid=$started

for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$proxy_port/readyz" >/dev/null && curl -sf "http://127.0.0.1:$signed_port/readyz" >/dev/null \
    && curl -sf "http://127.0.0.1:$release_port/readyz" >/dev/null \
    && curl -sf "http://127.0.0.1:$nginx_port/models/bench/proxy/" >/dev/null \
    && curl -sf "http://127.0.0.1:$bare_port/" >/dev/null && break
  sleep 0.1
done

# CPU time (user + system) so far of a process group (the proxy and its workers), in ticks.
cpu_ticks() {
  local total=0 pid
  for pid in $(pgrep -g "$1"); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
ticks_per_second=$(getconf CLK_TCK)

url_of() {  # $1: target, $2: upstream path
  case "$1" in
    direct) echo "http://127.0.0.1:$upstream_port$2" ;;
    nginx) echo "http://127.0.0.1:$nginx_port/models/bench/proxy$2" ;;
    pingora) echo "http://127.0.0.1:$bare_port$2" ;;
    infergate) echo "http://127.0.0.1:$proxy_port/models/bench/proxy$2" ;;
    signed) echo "http://127.0.0.1:$signed_port/models/bench/proxy$2" ;;
    release) echo "http://127.0.0.1:$release_port/models/bench/proxy$2" ;;
  esac
}
pid_of() {
  case "$1" in
    direct) echo - ;; nginx) echo "$nginx_pid" ;; pingora) echo "$bare_pid" ;;
    infergate) echo "$proxy_pid" ;; signed) echo "$signed_pid" ;; release) echo "$release_pid" ;;
  esac
}

run() {  # $1: scenario, $2: target, $3: connections, $4: upstream path
  local scenario="$1" who="$2" conns="$3" url pid line before=0 after=0
  url="$(url_of "$who" "$4")" pid="$(pid_of "$who")"
  local auth=(-H "Authorization: Bearer $token")
  "${pin_load[@]}" wrk -t1 -c"$conns" -d2s "${auth[@]}" "$url" >/dev/null  # warm-up: pools and caches
  [ "$pid" = - ] || before=$(cpu_ticks "$pid")
  line="$("${pin_load[@]}" wrk -t1 -c"$conns" -d"$duration" -s "$bench/report.lua" "${auth[@]}" "$url" | grep '^RESULT')"
  [ "$pid" = - ] || after=$(cpu_ticks "$pid")
  echo "$scenario $who $line cpu_s=$(python3 -c "print(($after - $before) / $ticks_per_second)")"
}

sse_run() {  # $1: target
  local who="$1" url pid line before=0 after=0
  case "$who" in
    direct) url="http://127.0.0.1:$sse_port/v1/chat/completions" pid=- ;;
    nginx) url="http://127.0.0.1:$nginx_port/models/bench-sse/proxy/v1/chat/completions" pid=$nginx_pid ;;
    pingora) url="http://127.0.0.1:$bare_sse_port/v1/chat/completions" pid=$bare_sse_pid ;;
    infergate) url="http://127.0.0.1:$proxy_port/models/bench-sse/proxy/v1/chat/completions" pid=$proxy_pid ;;
    signed) url="http://127.0.0.1:$signed_port/models/bench-sse/proxy/v1/chat/completions" pid=$signed_pid ;;
    release) url="http://127.0.0.1:$release_port/models/bench-sse/proxy/v1/chat/completions" pid=$release_pid ;;
  esac
  [ "$pid" = - ] || before=$(cpu_ticks "$pid")
  line="$("${pin_load[@]}" "$dist/examples/sse_bench" client "$url" "$sse_streams" "Authorization: Bearer $token")"
  [ "$pid" = - ] || after=$(cpu_ticks "$pid")
  echo "sse $who $line cpu_s=$(python3 -c "print(($after - $before) / $ticks_per_second)")"
}

targets=(direct nginx pingora infergate signed release)
echo "wrk -t1 -d$duration; workers=$workers; $cores cores; $placement"
results="$(
  for who in "${targets[@]}"; do run small-c$connections "$who" "$connections" /v1/embed; done
  for who in "${targets[@]}"; do run small-c1 "$who" 1 /v1/embed; done
  for who in "${targets[@]}"; do run 1k-c$connections "$who" "$connections" /v1/1k; done
  for who in "${targets[@]}"; do run 64k-c$connections "$who" "$connections" /v1/64k; done
  for who in "${targets[@]}"; do sse_run "$who"; done
)"
python3 - "$results" "$connections" "$sse_streams" "$sse_events" <<'PY'
import re, sys
results, conns, streams, events = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = {}
for line in results.splitlines():
    scenario, who, rest = line.split(" ", 2)
    rows[(scenario, who)] = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", rest)}
proxies = ("nginx", "pingora", "infergate", "signed", "release")
def cpu_us(scenario, who, unit="requests"):
    r = rows[(scenario, who)]
    return r["cpu_s"] * 1e6 / r[unit] if r.get(unit) else float("nan")

print(f"{'scenario':<10} {'target':<10} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'CPU µs/req':>11} {'errors':>7} {'non-2xx':>8}")
for (scenario, who), r in rows.items():
    if scenario == "sse":
        continue
    cpu = "" if who == "direct" else f"{cpu_us(scenario, who):.1f}"
    print(f"{scenario:<10} {who:<10} {r['rps']:>9.0f} {r['p50_us']:>8.0f} {r['p99_us']:>8.0f} {cpu:>11} {r['errors']:>7.0f} {r['non2xx']:>8.0f}")
print()
print(f"sse: {streams} streams at once, {events} events each")
print(f"{'target':<10} {'complete':>9} {'events/s':>9} {'delay p50 µs':>13} {'delay p99 µs':>13} {'CPU µs/event':>13}")
for who in ("direct",) + proxies:
    r = rows[("sse", who)]
    cpu = "" if who == "direct" else f"{cpu_us('sse', who, 'events'):.1f}"
    print(f"{who:<10} {r['streams']:>5.0f}/{streams:<3} {r['events_per_s']:>9.0f} {r['delay_p50_us']:>13.0f} {r['delay_p99_us']:>13.0f} {cpu:>13}")
print()
sat = f"small-c{conns}"
for who in ("infergate", "signed", "release", "pingora"):
    print(f"{who} / nginx:")
    for scenario in (sat, f"1k-c{conns}", f"64k-c{conns}"):
        print(f"  {scenario:<10} throughput {rows[(scenario, who)]['rps'] / rows[(scenario, 'nginx')]['rps']:.2f}x, "
              f"CPU per request {cpu_us(scenario, who) / cpu_us(scenario, 'nginx'):.2f}x")
    for pct in ("p50_us", "p99_us"):
        added = rows[("small-c1", who)][pct] - rows[("small-c1", "direct")][pct]
        nginx_added = rows[("small-c1", "nginx")][pct] - rows[("small-c1", "direct")][pct]
        print(f"  small-c1   added {pct[:3]} {added:.0f} µs vs nginx's {nginx_added:.0f} µs: {added / nginx_added:.2f}x")
    print(f"  sse        CPU per event {cpu_us('sse', who, 'events') / cpu_us('sse', 'nginx', 'events'):.2f}x")
PY
