#!/usr/bin/env bash
# Project benchmark (`make bench-projects`, issue 3): BENCH_PROJECTS (1000) Projects
# created at once until all are Ready, against a floor client that creates the same
# child objects directly, then BENCH_IDLE (120) idle seconds. Each phase gets a fresh
# control plane of its own (beside the e2e one, in target/bench-cluster) so neither
# inherits the other's objects. Results go between the markers in docs/BENCHMARKS.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
n=${BENCH_PROJECTS:-1000}
inflight=${BENCH_CONCURRENCY:-32}
idle=${BENCH_IDLE:-120}
state=$root/target/bench-cluster
results=$root/target/bench-results
mkdir -p "$results"

cargo build --release -q -p chassis-operator -p chassis-bench
bench=$root/target/release/chassis-bench

stop() { CHASSIS_E2E_DIR=$state bash "$root/e2e/cluster/down.sh" >/dev/null 2>&1 || true; rm -rf "$state"; }
fresh() {
  stop
  CHASSIS_E2E_DIR=$state bash "$root/e2e/cluster/up.sh" >/dev/null
  # shellcheck disable=SC1091
  . "$state/env"
  local k=("$CHASSIS_BIN/kubectl" --kubeconfig "$state/kubeconfig")
  "${k[@]}" apply --server-side -f "$root/crds" >/dev/null
  "${k[@]}" wait --for=condition=Established --timeout=60s -f "$root/crds" >/dev/null
}
trap stop EXIT

echo "bench: floor phase ($n projects' children, $inflight in flight)" >&2
fresh
"$bench" floor --kubeconfig "$state/kubeconfig" --count "$n" --concurrency "$inflight" --out "$results/floor.json"

echo "bench: operator phase ($n projects, then $idle s idle)" >&2
fresh
"$bench" operator --kubeconfig "$state/kubeconfig" --count "$n" --concurrency "$inflight" \
  --operator "$root/target/release/chassis-operator" --logs "$results" --idle "$idle" \
  --out "$results/operator.json"

"$bench" report --floor "$results/floor.json" --operator "$results/operator.json" \
  --doc "$root/docs/BENCHMARKS.md" --command "make bench-projects (BENCH_PROJECTS=$n BENCH_CONCURRENCY=$inflight BENCH_IDLE=$idle)"
