#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm, and the cyclonus oracle) from Go modules into a cache folder keyed
# by every pinned version, and prints that folder. A warm run only checks files.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.env"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
goversion=$(go env GOVERSION)
cache_root=${CHASSIS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chassis}
bin="$cache_root/bin-kube${KUBE_VERSION}-etcd${ETCD_VERSION}-kwok${KWOK_VERSION}-helm${HELM_VERSION}-${goversion}"
mkdir -p "$bin"

minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=${KUBE_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build() { # name, then go build arguments
  local name=$1; shift
  if [ -x "$bin/$name" ]; then return; fi
  echo "building $name" >&2
  (cd "$here" && go build -trimpath -o "$bin/$name.tmp" "$@") && mv "$bin/$name.tmp" "$bin/$name"
}

build etcd ./cmd/etcd
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build "$cmd" -ldflags "$ldflags" "k8s.io/kubernetes/cmd/$cmd"
done
# kwok and helm have no replace directives, so `go install` builds them at their own pins.
for tool in "kwok sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}" "helm helm.sh/helm/v4/cmd/helm@${HELM_VERSION}"; do
  set -- $tool
  if [ ! -x "$bin/$1" ]; then
    echo "building $1" >&2
    GOFLAGS= GOBIN="$bin" go install -trimpath "$2"
  fi
done
# cyclonus (the independent NetworkPolicy evaluator the oracle test compares with).
if [ ! -x "$bin/cyclonus-${CYCLONUS_VERSION}" ]; then
  echo "building cyclonus" >&2
  tmp=$(mktemp -d)
  GOFLAGS= GOBIN="$tmp" go install -trimpath "github.com/mattfenwick/cyclonus/cmd/cyclonus@${CYCLONUS_VERSION}"
  mv "$tmp/cyclonus" "$bin/cyclonus-${CYCLONUS_VERSION}" && rmdir "$tmp"
fi
echo "$bin"
