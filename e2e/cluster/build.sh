#!/usr/bin/env bash
# Builds the control plane of the cluster test bed from Go modules (Kubernetes v1.36.3, etcd
# v3.6.8; see components/go.mod) into a cache outside the clone. A second run with unchanged
# modules only checks a stamp.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${INFERGATE_CLUSTER_BIN:-$HOME/.cache/infergate/cluster/bin}"
mkdir -p "$bin"
stamp="$bin/.components"
wanted="$(cat "$here/components/go.mod" "$here/components/go.sum" "$here/components/cmd/etcd/main.go" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  exit 0
fi
cd "$here/components"
export CGO_ENABLED=0 GOFLAGS=-trimpath
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  echo "cluster: building $cmd" >&2
  go build -ldflags=-s -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"
done
echo "cluster: building etcd" >&2
go build -ldflags=-s -o "$bin/etcd" ./cmd/etcd
echo "$wanted" > "$stamp"
