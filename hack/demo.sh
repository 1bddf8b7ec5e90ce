#!/usr/bin/env bash
# `make demo`: with the local control plane up (make cluster-up), installs the CRDs,
# runs chassis-operator in the background, applies examples/ and shows the result.
# `hack/demo.sh stop` stops the background operator.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state=${CHASSIS_E2E_DIR:-$root/target/e2e}
pidfile=$state/pids/demo-operator.pid
log=$state/logs/demo-operator.log

stop() {
  if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
      echo "stopped the demo operator (pid $pid)"
    fi
    rm -f "$pidfile"
  fi
}

if [ "${1:-}" = "stop" ]; then stop; exit 0; fi

# shellcheck disable=SC1091
. "$state/env"
kubectl=("$CHASSIS_BIN/kubectl" --kubeconfig "$state/kubeconfig")

"${kubectl[@]}" apply --server-side --force-conflicts -f "$root/crds" >/dev/null
"${kubectl[@]}" wait --for=condition=Established --timeout=60s -f "$root/crds" >/dev/null

stop
mkdir -p "$(dirname "$pidfile")" "$(dirname "$log")"
setsid "$root/target/debug/chassis-operator" --kubeconfig "$state/kubeconfig" \
  --metrics-addr 127.0.0.1:8080 --webhook-addr 127.0.0.1:9443 --webhook-register \
  --log-format json >"$log" 2>&1 < /dev/null &
echo $! >"$pidfile"
ready=""
for _ in $(seq 1 150); do
  if curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1; then ready=yes; break; fi
  if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "chassis-operator exited; its log ($log) ends with:" >&2; tail -20 "$log" >&2; exit 1
  fi
  sleep 0.2
done
if [ -z "$ready" ]; then
  echo "chassis-operator did not become ready within 30 s; its log ($log) ends with:" >&2
  tail -20 "$log" >&2
  exit 1
fi

# The API server loads the two webhook configurations on its own schedule: wait until
# a dry-run create comes back with the requester recorded by the mutating one.
for _ in $(seq 1 100); do
  requester=$(printf 'apiVersion: tenancy.chassis.dev/v1alpha1\nkind: Project\nmetadata: {name: admission-probe}\n' \
    | "${kubectl[@]}" create --dry-run=server -f - \
      -o jsonpath='{.metadata.annotations.tenancy\.chassis\.dev/requester}' 2>/dev/null || true)
  [ -n "$requester" ] && break
  sleep 0.2
done
if [ -z "$requester" ]; then
  echo "Project admission did not record the requester within 20 s; operator log ($log):" >&2
  tail -20 "$log" >&2
  exit 1
fi
"${kubectl[@]}" apply --server-side --force-conflicts -f "$root/examples"
if ! "${kubectl[@]}" wait --for=condition=Ready --timeout=90s project --all >/dev/null; then
  echo "the example projects did not become Ready; operator log ($log):" >&2
  tail -20 "$log" >&2
  "${kubectl[@]}" get projects -o yaml >&2
  exit 1
fi

# Self-service: alice (group developers) asks for a project with only a name.
alice=("$CHASSIS_BIN/kubectl" --kubeconfig "$state/kubeconfig-alice")
if ! "${kubectl[@]}" get project alice-sandbox >/dev/null 2>&1; then
  printf 'apiVersion: tenancy.chassis.dev/v1alpha1\nkind: Project\nmetadata: {name: alice-sandbox}\n' \
    | "${alice[@]}" create -f -
fi
"${kubectl[@]}" wait --for=condition=Ready --timeout=60s project/alice-sandbox >/dev/null
echo "alice's project, as alice sees it:"
"${alice[@]}" get project alice-sandbox \
  -o custom-columns='NAME:.metadata.name,REQUESTER:.metadata.annotations.tenancy\.chassis\.dev/requester,ADMINS:.spec.admins[*].name,READY:.status.conditions[?(@.type=="Ready")].status'

echo
echo "== kubectl get chassis"
"${kubectl[@]}" get chassis
echo
echo "== the namespaces the projects created"
"${kubectl[@]}" get namespaces -l app.kubernetes.io/managed-by=chassis --show-labels
cat <<MSG

Chassis is running against a local Kubernetes $("${kubectl[@]}" version -o json | sed -n 's/.*"gitVersion": "\(v1\.[^"]*\)".*/\1/p' | tail -1).
Point kubectl at it (the kubectl and helm built for this cluster are in the first line):
  export PATH=$CHASSIS_BIN:\$PATH
  export KUBECONFIG=$state/kubeconfig         # as cluster admin, or:
  export KUBECONFIG=$state/kubeconfig-alice   # as alice (group developers)
Operator log: $log
Metrics:      http://127.0.0.1:8080/metrics
Stop everything with: make down
MSG
