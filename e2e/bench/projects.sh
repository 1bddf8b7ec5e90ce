#!/usr/bin/env bash
# Project benchmark (`make bench-projects`, issue 3): BENCH_PROJECTS (1000) Projects
# created at once until all are Ready, against a floor client that creates the same
# Projects and child objects directly, BENCH_ROUNDS (3) times each (the median
# counts), then BENCH_IDLE (120) idle seconds. Each phase gets a fresh
# control plane of its own (beside the e2e one, in target/bench-cluster) so neither
# inherits the other's objects. Results go between the markers in docs/BENCHMARKS.md.
# BENCH_RUST_LOG sets the operator's RUST_LOG (default info), e.g. to see its watches.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
n=${BENCH_PROJECTS:-1000}
inflight=${BENCH_CONCURRENCY:-32}
# The floor must be as fast as the API server allows: 128 requests in flight measured
# fastest for it (2026-11-27, 1000 projects: 16 6.2-9.4 s, 32 5.7-6.6 s, 64 7.0 s,
# 128 5.2-5.8 s, 256 5.3 s), while the operator phase's client was no faster at 128.
floor_inflight=${BENCH_FLOOR_CONCURRENCY:-128}
idle=${BENCH_IDLE:-120}
rounds=${BENCH_ROUNDS:-3}
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
  settle "$(cat "$state/pids/kube-apiserver.pid")"
}

# settle PID: after start and CRD installation the API server rebuilds its OpenAPI
# documents for a while; timing starts once it uses under 10 % of a core for 3 s.
settle() {
  local quiet=0 before after
  for _ in $(seq 1 90); do
    before=$(awk '{print $14 + $15}' "/proc/$1/stat"); sleep 1
    after=$(awk '{print $14 + $15}' "/proc/$1/stat")
    if [ $((after - before)) -lt 10 ]; then quiet=$((quiet + 1)); else quiet=0; fi
    [ "$quiet" -ge 3 ] && return 0
  done
  echo "bench: the API server did not settle within 90 s; measuring anyway" >&2
}
trap stop EXIT

floors=() operators=()
for round in $(seq 1 "$rounds"); do
  echo "bench: round $round/$rounds: floor ($n Projects and their children, $floor_inflight in flight)" >&2
  fresh
  "$bench" floor --kubeconfig "$state/kubeconfig" --count "$n" --concurrency "$floor_inflight" \
    --out "$results/floor-$round.json" --pids "$state/pids"
  floors+=(--floor "$results/floor-$round.json")

  # Only the last round waits out the idle window.
  wait_idle=5; [ "$round" = "$rounds" ] && wait_idle=$idle
  echo "bench: round $round/$rounds: operator ($n Projects, then $wait_idle s idle)" >&2
  fresh
  "$bench" operator --kubeconfig "$state/kubeconfig" --count "$n" --concurrency "$inflight" \
    --operator "$root/target/release/chassis-operator" --logs "$results" --idle "$wait_idle" \
    --webhooks "${BENCH_WEBHOOKS:-true}" --out "$results/operator-$round.json" --pids "$state/pids"
  operators+=(--operator "$results/operator-$round.json")
done

echo "bench: Projects alone ($n, no operator, no webhooks)" >&2
fresh
"$bench" projects-only --kubeconfig "$state/kubeconfig" --count "$n" --concurrency "$inflight" \
  --out "$results/projects-only.json" --pids "$state/pids"

"$bench" report "${floors[@]}" "${operators[@]}" --projects-only "$results/projects-only.json" \
  --doc "$root/docs/BENCHMARKS.md" \
  --command "make bench-projects (BENCH_PROJECTS=$n BENCH_ROUNDS=$rounds BENCH_CONCURRENCY=$inflight BENCH_FLOOR_CONCURRENCY=$floor_inflight BENCH_IDLE=$idle BENCH_WEBHOOKS=${BENCH_WEBHOOKS:-true})"
