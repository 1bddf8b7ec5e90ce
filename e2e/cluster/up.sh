#!/usr/bin/env bash
# Starts a local Kubernetes control plane on loopback: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and kwok with three fake nodes, all from
# the binaries build.sh produces. Idempotent: a cluster that is already up and
# ready in the state folder is left alone.
#
# State folder: $CHASSIS_E2E_DIR, default <repo>/target/e2e. It holds
#   env                         CHASSIS_BIN=... and KUBE_APISERVER=... (KEY=VALUE lines)
#   kubeconfig                  admin (group system:masters), context chassis-admin
#   kubeconfig-alice, -bob      group developers, contexts chassis-alice, chassis-bob
#   pki/ tokens.csv             CA, serving cert, service-account key, static tokens
#   logs/<name>.log pids/<name>.pid
# Stop it with down.sh (make cluster-down).
set -euo pipefail

started_ns=$(date +%s%N)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
state=${CHASSIS_E2E_DIR:-$root/target/e2e}
mkdir -p "$state"
state=$(cd "$state" && pwd)
export CHASSIS_E2E_DIR=$state # down.sh must act on the same folder
umask 077                      # keys, tokens and kubeconfigs are private

components=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
timeout_s=300 # a cold, busy machine; wait_for stops at once when a component dies
nodes=3

say() { echo "up: $*" >&2; }
die() { echo "up: $*" >&2; exit 1; }

elapsed() { # seconds since the start, one decimal
  local ms=$((($(date +%s%N) - started_ns) / 1000000))
  printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100))
}

# pid_of NAME prints the pid of a running component, or fails. The pid must be
# alive and still run the component's binary (guards against reused pids and zombies).
pid_of() {
  local file=$state/pids/$1.pid pid argv0
  [ -r "$file" ] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  IFS= read -r -d '' argv0 <"/proc/$pid/cmdline" 2>/dev/null || return 1
  [ "${argv0##*/}" = "$1" ] || return 1
  echo "$pid"
}

read_env() { # KEY: prints its value from $state/env
  local key value
  [ -r "$state/env" ] || return 1
  while IFS='=' read -r key value; do
    if [ "$key" = "$1" ]; then echo "$value"; return 0; fi
  done <"$state/env"
  return 1
}

summary() { # HEADLINE: prints it and how to use and stop the cluster
  cat <<EOF
$1
  server:           $server
  state:            $state
  admin kubeconfig: $state/kubeconfig        (context chassis-admin, group system:masters)
  alice kubeconfig: $state/kubeconfig-alice  (context chassis-alice, group developers)
  bob kubeconfig:   $state/kubeconfig-bob    (context chassis-bob, group developers)
  nodes:            kwok-node-0..$((nodes - 1)) (kwok, label type=kwok)
  kubectl:          $bin/kubectl
Use it:   export KUBECONFIG=$state/kubeconfig
Stop it:  make cluster-down   (or $here/down.sh)
EOF
}

# ---------------------------------------------------------------- already up?
if bin=$(read_env CHASSIS_BIN) && server=$(read_env KUBE_APISERVER) && [ -x "$bin/kubectl" ]; then
  alive=1
  for c in "${components[@]}"; do pid_of "$c" >/dev/null || alive=0; done
  # Each test binary runs this script: one slow answer from a busy API server must not
  # tear down the cluster the other tests use, so ask for up to 30 s.
  ready=0
  if [ "$alive" = 1 ]; then
    for try in 1 2 3; do
      if "$bin/kubectl" --kubeconfig "$state/kubeconfig" --request-timeout=10s get --raw /readyz >/dev/null 2>&1; then
        ready=1 && break
      fi
      [ "$try" = 3 ] || sleep 1
    done
  fi
  if [ "$ready" = 1 ]; then
    summary "A cluster is already running; nothing to do (checked in $(elapsed))."
    exit 0
  fi
fi

# ---------------------------------------------------------------- clean start
"$here/down.sh" || die "Stopping the leftovers of a previous cluster failed; see the messages above."
# (pids/ and logs/ may hold other tools' files, e.g. hack/demo.sh's; down.sh removed ours)
rm -rf "$state/pki" "$state/apiserver-certs" "$state/etcd" \
  "$state/env" "$state/tokens.csv" "$state/kubeconfig" "$state/kubeconfig-alice" \
  "$state/kubeconfig-bob" "$state/kwok.yaml"
logs=$state/logs
pki=$state/pki
mkdir -p "$logs" "$state/pids" "$pki"

command -v openssl >/dev/null || die "openssl is required to generate the cluster's certificates but is not installed."

say "Building or checking the control-plane binaries with build.sh."
if ! bin=$("$here/build.sh" | tail -n 1); then
  die "build.sh failed to build the control-plane binaries; see its output above."
fi
for c in "${components[@]}" kubectl; do
  [ -x "$bin/$c" ] || die "build.sh reported the folder '$bin', but it has no executable $c."
done
[[ $bin =~ ^[A-Za-z0-9_./+=:@-]+$ ]] ||
  die "The binary folder '$bin' contains characters that would break the env file; set CHASSIS_CACHE to a plain path."
kubectl=$bin/kubectl
# shellcheck source-path=SCRIPTDIR source=versions.env
. "$here/versions.env" # KWOK_VERSION, for kwok's stage files

# kwok v0.8 refuses to start without stages (it has no built-in ones). Use the
# "fast" set that kwokctl configures for the binary runtime, taken from the pinned
# kwok module: node-initialize, node-heartbeat-with-lease, pod-ready, pod-complete,
# pod-delete. kwok renews the node leases (--node-lease-duration-seconds).
kwok_stages() {
  local dir f
  dir=$(cd / && GOFLAGS='' GOTOOLCHAIN=local go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p') || true
  if [ -z "$dir" ] || [ ! -d "$dir/kustomize/stage" ]; then
    die "Could not find the kwok $KWOK_VERSION module (for its stage files) with 'go mod download'."
  fi
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [ -r "$dir/kustomize/stage/$f" ] || die "The kwok $KWOK_VERSION module has no stage file kustomize/stage/$f."
    echo "---"
    cat "$dir/kustomize/stage/$f"
  done
}

kwok_stages >"$state/kwok.yaml" # an explicit --config also keeps ~/.kwok/kwok.yaml out

# ---------------------------------------------------------------- ports
free_ports() { # COUNT: prints COUNT distinct free loopback TCP ports
  if command -v python3 >/dev/null; then
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
  else # probe random ports below the usual ephemeral range with bash's /dev/tcp
    local found=() p tries=0
    while [ "${#found[@]}" -lt "$1" ] && [ $((tries += 1)) -lt 1000 ]; do
      p=$((20000 + RANDOM % 12000))
      [[ " ${found[*]} " == *" $p "* ]] && continue
      if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then found+=("$p"); fi
    done
    echo "${found[*]}"
  fi
}
read -r etcd_port peer_port api_port kcm_port sched_port kwok_port <<<"$(free_ports 6)" || true
[ -n "${kwok_port:-}" ] || die "Could not find six free TCP ports on 127.0.0.1."
server=https://127.0.0.1:$api_port
printf 'CHASSIS_BIN=%s\nKUBE_APISERVER=%s\n' "$bin" "$server" >"$state/env"

# ---------------------------------------------------------------- PKI and tokens
say "Generating the CA, the apiserver serving certificate, the service-account key and tokens."
ossl() {
  openssl "$@" >>"$logs/openssl.log" 2>&1 ||
    die "openssl $1 failed while generating the cluster's keys; see $logs/openssl.log."
}
cat >"$pki/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
[dn]
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1, IP:10.96.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
EOF
: >"$logs/openssl.log"
ossl req -x509 -new -config "$pki/openssl.cnf" -extensions v3_ca -newkey rsa:2048 -nodes \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 3650 -subj "/CN=chassis-e2e-ca"
ossl req -new -config "$pki/openssl.cnf" -newkey rsa:2048 -nodes \
  -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" -subj "/CN=kube-apiserver"
ossl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
  -set_serial "0x$(openssl rand -hex 16)" -days 3650 \
  -extfile "$pki/openssl.cnf" -extensions v3_server -out "$pki/apiserver.crt"
ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key"
ossl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

admin_token=$(openssl rand -hex 32)
alice_token=$(openssl rand -hex 32)
bob_token=$(openssl rand -hex 32)
cat >"$state/tokens.csv" <<EOF
$admin_token,admin,uid-admin,"system:masters"
$alice_token,alice,uid-alice,"developers"
$bob_token,bob,uid-bob,"developers"
EOF
chmod 600 "$state/tokens.csv"

ca_data=$(base64 <"$pki/ca.crt" | tr -d '\n')
write_kubeconfig() { # FILE USER TOKEN
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: chassis
  cluster:
    server: $server
    certificate-authority-data: $ca_data
users:
- name: chassis-$2
  user:
    token: $3
contexts:
- name: chassis-$2
  context:
    cluster: chassis
    user: chassis-$2
    namespace: default
current-context: chassis-$2
EOF
  chmod 600 "$1"
}
write_kubeconfig "$state/kubeconfig" admin "$admin_token"
write_kubeconfig "$state/kubeconfig-alice" alice "$alice_token"
write_kubeconfig "$state/kubeconfig-bob" bob "$bob_token"
admin_kubeconfig=$state/kubeconfig

# ---------------------------------------------------------------- processes
ok=0
cleanup() {
  if [ "$ok" != 1 ]; then
    say "Stopping the partly started cluster; its logs stay in $logs."
    "$here/down.sh" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() { # NAME ARGS...: starts $bin/NAME in its own session, logs and pid in the state folder
  local name=$1; shift
  setsid nohup "$bin/$name" "$@" </dev/null >"$logs/$name.log" 2>&1 &
  local pid=$! end=$((SECONDS + 20))
  echo "$pid" >"$state/pids/$name.pid"
  # setsid and nohup exec the binary in place (this script does not use job control,
  # so the child is no process-group leader and setsid need not fork): the pid stays
  # the same. Wait for the exec so pid_of recognises the process. The exec is quick,
  # but on two busy cores (the other components starting) the shell behind it may
  # wait seconds for a core: a CI run once failed after 2 s.
  while ((SECONDS < end)); do
    pid_of "$name" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || return 0 # died: wait_for reports it with the log
    sleep 0.05
  done
  die "$name (pid $pid) did not start within 20 s."
}

deadline=$(($(date +%s) + timeout_s))
fail_log() { # LOG MESSAGE: fails with MESSAGE, then shows the end of logs/LOG.log
  echo "up: $2" >&2
  echo "--- last lines of $logs/$1.log:" >&2
  tail -n 25 "$logs/$1.log" >&2 || true
  echo "---" >&2
  exit 1
}
# wait_for WHAT LOG CMD...: polls CMD until it succeeds; fails when a started
# component dies or when the overall $timeout_s s deadline passes.
wait_for() {
  local what=$1 log=$2 c; shift 2
  until "$@" >/dev/null 2>&1; do
    for c in "${components[@]}"; do
      if [ -f "$state/pids/$c.pid" ] && ! pid_of "$c" >/dev/null; then
        fail_log "$c" "$c exited while waiting for $what; see $logs/$c.log."
      fi
    done
    if [ "$(date +%s)" -ge "$deadline" ]; then
      fail_log "$log" "Timed out after $timeout_s s waiting for $what; see $logs/$log.log."
    fi
    sleep 0.2
  done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
healthz() { # SCHEME PORT: the component's /healthz on loopback answers ok (self-signed cert)
  if command -v curl >/dev/null; then
    [ "$(curl -ksS --max-time 2 "$1://127.0.0.1:$2/healthz")" = ok ]
  else
    port_open "$2"
  fi
}
k() { "$kubectl" --kubeconfig "$admin_kubeconfig" --request-timeout=30s "$@"; }

say "Starting etcd on 127.0.0.1:$etcd_port."
start etcd --name=chassis --data-dir="$state/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
  --initial-cluster="chassis=http://127.0.0.1:$peer_port" --initial-cluster-state=new \
  --unsafe-no-fsync --log-level=warn
wait_for "etcd to listen on 127.0.0.1:$etcd_port" etcd port_open "$etcd_port"

# --endpoint-reconciler-type=none: the default reconciler would write 127.0.0.1 into
# the Endpoints of the `kubernetes` Service every 10 s and fail (loopback addresses
# are invalid there), so that Service has no endpoints either way.
say "Starting kube-apiserver on $server."
start kube-apiserver \
  --etcd-servers="http://127.0.0.1:$etcd_port" \
  --advertise-address=127.0.0.1 --bind-address=127.0.0.1 --secure-port="$api_port" \
  --cert-dir="$state/apiserver-certs" \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --api-audiences=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --token-auth-file="$state/tokens.csv" \
  --authorization-mode=Node,RBAC \
  --service-cluster-ip-range=10.96.0.0/16 \
  --allow-privileged=true \
  --endpoint-reconciler-type=none
wait_for "kube-apiserver /readyz" kube-apiserver k get --raw /readyz

# kube-controller-manager and kube-scheduler serve /healthz on a loopback port
# (self-signed, anonymous; /healthz is always allowed) for the readiness check.
# Without --authentication-kubeconfig they do not look for the
# extension-apiserver-authentication ConfigMap, which this apiserver never writes
# (it has no --client-ca-file), so their logs stay quiet.
say "Starting kube-controller-manager, kube-scheduler and kwok."
start kube-controller-manager \
  --kubeconfig="$admin_kubeconfig" \
  --leader-elect=false \
  --bind-address=127.0.0.1 --secure-port="$kcm_port" \
  --root-ca-file="$pki/ca.crt" \
  --service-account-private-key-file="$pki/sa.key" \
  --use-service-account-credentials=false
start kube-scheduler \
  --kubeconfig="$admin_kubeconfig" \
  --leader-elect=false \
  --bind-address=127.0.0.1 --secure-port="$sched_port"
start kwok \
  --config="$state/kwok.yaml" \
  --kubeconfig="$admin_kubeconfig" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --cidr=10.244.0.0/16 \
  --node-lease-duration-seconds=40 \
  --server-address="127.0.0.1:$kwok_port"

node_yaml() {
  local i
  for ((i = 0; i < nodes; i++)); do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    type: kwok
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110"}
EOF
  done
}
node_yaml >"$state/nodes.yaml"
# Applied until it succeeds (apply repeats safely): the API server is at its busiest
# while the other components start.
apply_nodes() { k apply -f "$state/nodes.yaml" >/dev/null 2>"$logs/nodes.log"; }
wait_for "the kwok Node objects to be created" nodes apply_nodes

nodes_ready() { # all nodes Ready, untainted (the not-ready taint is gone) and with 32 CPUs
  local out
  out=$(k get nodes -l type=kwok -o \
    'jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status} {.status.allocatable.cpu} taints={.spec.taints}{"\n"}{end}')
  [ "$(grep -c ' True 32 taints=$' <<<"$out")" -eq "$nodes" ]
}
wait_for "kube-controller-manager /healthz" kube-controller-manager healthz https "$kcm_port"
wait_for "kube-scheduler /healthz" kube-scheduler healthz https "$sched_port"
wait_for "kwok /healthz" kwok healthz http "$kwok_port"
wait_for "the default ServiceAccount (made by kube-controller-manager)" kube-controller-manager \
  k get serviceaccount default -n default
wait_for "$nodes Ready and untainted kwok nodes" kwok nodes_ready

ok=1
summary "Cluster is up after $(elapsed)."
