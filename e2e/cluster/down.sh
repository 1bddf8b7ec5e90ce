#!/usr/bin/env bash
# Stops the local control plane that up.sh started: kwok, kube-scheduler,
# kube-controller-manager, kube-apiserver, etcd, in that order. Each gets SIGTERM
# and, after 10 s, SIGKILL. Removes the pid files and etcd's data (the next up.sh
# starts from an empty cluster) and keeps the logs. Nothing running is not an error.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
state=${CHASSIS_E2E_DIR:-$root/target/e2e}
components=(kwok kube-scheduler kube-controller-manager kube-apiserver etcd)
grace_s=10

say() { echo "down: $*" >&2; }

if [ ! -d "$state" ]; then
  say "No cluster state in $state; nothing to stop."
  exit 0
fi

# runs PID NAME: the pid is alive and still runs the component's binary (not a
# reused pid, not a zombie).
runs() {
  local argv0
  kill -0 "$1" 2>/dev/null || return 1
  IFS= read -r -d '' argv0 <"/proc/$1/cmdline" 2>/dev/null || return 1
  [ "${argv0##*/}" = "$2" ]
}

stopped=0
for name in "${components[@]}"; do
  file=$state/pids/$name.pid
  [ -f "$file" ] || continue
  pid=$(<"$file")
  if [[ $pid =~ ^[0-9]+$ ]] && runs "$pid" "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    waited=0
    while runs "$pid" "$name" && [ "$waited" -lt $((grace_s * 10)) ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    if runs "$pid" "$name"; then
      say "$name (pid $pid) did not stop within $grace_s s after SIGTERM; sending SIGKILL."
      kill -KILL "$pid" 2>/dev/null || true
      for _ in 1 2 3 4 5 6 7 8 9 10; do runs "$pid" "$name" || break; sleep 0.1; done
    fi
    say "Stopped $name (pid $pid)."
    stopped=$((stopped + 1))
  fi
  rm -f "$file"
done

rm -rf "$state/etcd"
if [ "$stopped" = 0 ]; then
  say "No cluster processes were running in $state."
else
  say "Stopped $stopped processes; logs are kept in $state/logs."
fi
