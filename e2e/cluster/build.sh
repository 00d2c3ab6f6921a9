#!/usr/bin/env bash
# Builds the control plane of the cluster test bed from Go modules (Kubernetes v1.36.3, etcd
# v3.6.8; see components/go.mod) and its OCI registry (CNCF distribution v3.1.2; see
# registry/go.mod) and its S3-compatible object store (Versity's S3 gateway v1.8.0; see
# objectstore/go.mod) into a cache outside the clone. A second run with unchanged modules only
# checks a stamp.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${INFERGATE_CLUSTER_BIN:-$HOME/.cache/infergate/cluster/bin}"
mkdir -p "$bin"
stamp="$bin/.components"
wanted="$(cat "$here/build.sh" "$here/components/go.mod" "$here/components/go.sum" "$here/components/cmd/etcd/main.go" \
  "$here/registry/go.mod" "$here/registry/go.sum" "$here/objectstore/go.mod" "$here/objectstore/go.sum" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  exit 0
fi
cd "$here/components"
export CGO_ENABLED=0 GOFLAGS=-trimpath
# The version Kubernetes' own build stamps in (clients such as Helm check it against a chart's
# kubeVersion); a plain `go build` would report v0.0.0-master.
version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' go.mod)"
minor="$(echo "$version" | cut -d. -f2)"
stamp_version=""
for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp_version+=" -X $package.gitVersion=$version -X $package.gitMajor=1 -X $package.gitMinor=$minor"
  stamp_version+=" -X $package.gitTreeState=clean -X $package.buildDate=1970-01-01T00:00:00Z"
done
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  echo "cluster: building $cmd" >&2
  go build -ldflags="-s $stamp_version" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"
done
echo "cluster: building etcd" >&2
go build -ldflags=-s -o "$bin/etcd" ./cmd/etcd
echo "cluster: building the registry" >&2
(cd "$here/registry" && go build -ldflags=-s -o "$bin/registry" github.com/distribution/distribution/v3/cmd/registry)
echo "cluster: building the object store" >&2
(cd "$here/objectstore" && go build -ldflags=-s -o "$bin/versitygw" github.com/versity/versitygw/cmd/versitygw)
echo "$wanted" > "$stamp"
