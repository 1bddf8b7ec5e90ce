#!/usr/bin/env bash
# Foundation benchmark (`make bench`): with the local control plane up, measures
#  - the warm (cached) control-plane build, and
#  - chassis-operator's memory while idle with N Ready projects, next to
#    kube-scheduler's in the same run as the peer (both hold informer caches),
# and writes the results between the markers in docs/BENCHMARKS.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
state=${CHASSIS_E2E_DIR:-$root/target/e2e}
n=${BENCH_PROJECTS:-100}
# shellcheck disable=SC1091
. "$state/env"
k=("$CHASSIS_BIN/kubectl" --kubeconfig "$state/kubeconfig")

ms() { date +%s%3N; }
kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

t0=$(ms); bash "$root/e2e/cluster/build.sh" >/dev/null; warm_build_ms=$(( $(ms) - t0 ))

"${k[@]}" apply --server-side --force-conflicts -f "$root/crds" >/dev/null
"${k[@]}" wait --for=condition=Established --timeout=60s -f "$root/crds" >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
webhook=$(free_port)
log=$state/logs/bench-operator.log
"$root/target/debug/chassis-operator" --kubeconfig "$state/kubeconfig" --metrics-addr "127.0.0.1:$port" \
  --webhook-addr "127.0.0.1:$webhook" --webhook-register \
  >"$log" 2>&1 </dev/null &
op=$!
trap 'kill $op 2>/dev/null || true; "${k[@]}" delete projects -l bench=foundation --wait=false >/dev/null 2>&1 || true' EXIT
until curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do sleep 0.2; done

tpl=bench-foundation
"${k[@]}" apply -f - >/dev/null <<YAML
apiVersion: tenancy.chassis.dev/v1alpha1
kind: ProjectTemplate
metadata: {name: $tpl}
spec: {podSecurity: baseline}
YAML
t0=$(ms)
for i in $(seq 1 "$n"); do
  printf 'apiVersion: tenancy.chassis.dev/v1alpha1\nkind: Project\nmetadata: {name: bench-%s, labels: {bench: foundation}}\nspec: {template: %s}\n---\n' "$i" "$tpl"
done | "${k[@]}" apply -f - >/dev/null
"${k[@]}" wait --for=condition=Ready --timeout=300s project -l bench=foundation >/dev/null
ready_ms=$(( $(ms) - t0 ))
sleep 20 # idle
op_rss=$(kib "$op" VmRSS); op_hwm=$(kib "$op" VmHWM)
sched=$(cat "$state/pids/kube-scheduler.pid")
sched_rss=$(kib "$sched" VmRSS)
ratio=$(awk -v a="$op_rss" -v b="$sched_rss" 'BEGIN {printf "%.2f", a / b}')

kill "$op"; wait "$op" 2>/dev/null || true
"${k[@]}" delete projects -l bench=foundation --wait=false >/dev/null
"${k[@]}" delete projecttemplate "$tpl" >/dev/null

cores=$(nproc); mem=$(free -g | awk '/^Mem:/ {print $2}')
section=$(cat <<MD
<!-- foundation:begin -->
### Foundation run of $(date -u +%Y-%m-%d) (\`make bench\`, $cores cores, $mem GiB)

| measure | value |
| --- | --- |
| warm control-plane build (\`e2e/cluster/build.sh\`, all binaries cached) | $warm_build_ms ms |
| $n projects created at once until all Ready (debug build of chassis-operator) | $ready_ms ms |
| chassis-operator RSS, idle with $n projects (peak) | $((op_rss / 1024)) MiB ($((op_hwm / 1024)) MiB) |
| kube-scheduler RSS in the same run (peer: also a set of informer caches) | $((sched_rss / 1024)) MiB |
| ratio operator / scheduler | $ratio |
<!-- foundation:end -->
MD
)
doc=$root/docs/BENCHMARKS.md
python3 - "$doc" "$section" <<'PY'
import re, sys
path, section = sys.argv[1], sys.argv[2]
text = open(path).read()
new = re.sub(r"<!-- foundation:begin -->.*?<!-- foundation:end -->", lambda _: section, text, flags=re.S)
if new == text and section not in text:
    new = text.rstrip("\n") + "\n\n" + section + "\n"
open(path, "w").write(new)
PY
echo "$section"
