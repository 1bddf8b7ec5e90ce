#!/usr/bin/env bash
# `make bench-proxy`: the same upstream reached directly, through chassis-oauth-proxy
# and through oauth2-proxy v7 (built from Go modules), each with a valid session
# cookie from a real login at the same OpenID provider (e2e/oidc). Open-loop load at
# moderate rates first (latency, RSS), then closed-loop load at two concurrencies
# (throughput), where HAProxy (Debian's package, no login, nothing but the hop) shows
# what any reverse proxy costs on this machine; writes the `proxy` section of
# docs/BENCHMARKS.md.
# Env: BENCH_ROUNDS (3), BENCH_SECONDS (10).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
. e2e/cluster/versions.env
ROUNDS=${BENCH_ROUNDS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
OAUTH2_PROXY_VERSION=v7.15.6

# The proxy as shipped (Dockerfile.oauth-proxy): profile release-proxy.
cargo build -q --profile release-proxy -p chassis-oauth-proxy
# A list made for other dependencies or another compiler packs less (see make proxy-symbol-order).
python3 e2e/bench/symbol_order.py --check target/release-proxy/chassis-oauth-proxy oauth-proxy/symbol-order.txt >&2
cargo build -q --release -p chassis-bench
load=target/release/proxy-load
cache=${CHASSIS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chassis}/tools-$(go env GOVERSION)
mkdir -p "$cache"
if [ ! -x "$cache/oauth2-proxy-$OAUTH2_PROXY_VERSION" ]; then
  echo "building oauth2-proxy $OAUTH2_PROXY_VERSION from Go modules" >&2
  tmp=$(mktemp -d)
  GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS= GOBIN="$tmp" \
    go install -trimpath "github.com/oauth2-proxy/oauth2-proxy/v7@$OAUTH2_PROXY_VERSION"
  mv "$tmp/oauth2-proxy" "$cache/oauth2-proxy-$OAUTH2_PROXY_VERSION" && rmdir "$tmp"
fi

if ! command -v haproxy >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing Debian's haproxy (the plain-proxy peer)" >&2
  $sudo apt-get update -qq && $sudo apt-get install -y -qq haproxy >/dev/null
fi

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(free_port); chassis=$(free_port); chassis_metrics=$(free_port); o2p=$(free_port)
chassis_split=$(free_port); chassis_split_metrics=$(free_port); o2p_split=$(free_port)
hap=$(free_port); hap_split=$(free_port)

cat >"$work/oidc.json" <<EOF
{"offline_access_without_prompt_consent": true,
 "clients": [{"client_id": "chassis", "client_secret": "chassis-secret",
   "redirect_uris": ["http://127.0.0.1:$chassis/oauth2/callback", "http://127.0.0.1:$o2p/oauth2/callback"],
   "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
   "token_endpoint_auth_method": "client_secret_basic"}],
 "users": [{"sub": "alice", "password": "alice-pass", "email": "alice@example.com", "email_verified": true,
   "name": "Alice", "preferred_username": "alice", "groups": ["developers"]}]}
EOF
PORT=0 OIDC_CONFIG="$work/oidc.json" ACCESS_TOKEN_TTL=3600 ID_TOKEN_TTL=3600 \
  bash e2e/oidc/start.sh >"$work/oidc.out" 2>"$work/oidc.err" &
pids+=($!)
for _ in $(seq 1 600); do grep -q '^ready ' "$work/oidc.out" 2>/dev/null && break; sleep 0.2; done
issuer=$(sed -n 's/^ready //p' "$work/oidc.out")
[ -n "$issuer" ] || { echo "the OpenID provider did not start:"; cat "$work/oidc.err"; exit 1; }

"$load" upstream --port "$up" & up_pid=$!; pids+=($up_pid)
# PORT METRICS-PORT [launcher...]: the proxy as a process of its own (pid in $!), its
# log in $work/chassis-PORT.log. Logins go through the first pair only, so every
# process names that pair's callback as its redirect URL.
launch_chassis() {
  local port=$1 metrics=$2; shift 2
  "$@" target/release-proxy/chassis-oauth-proxy --http-address "127.0.0.1:$port" --metrics-address "127.0.0.1:$metrics" \
    --upstream "http://127.0.0.1:$up" --oidc-issuer-url "$issuer" --client-id chassis --client-secret chassis-secret \
    --redirect-url "http://127.0.0.1:$chassis/oauth2/callback" --cookie-secure false --email-domains '*' \
    --cookie-secret MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY= >"$work/chassis-$port.log" 2>&1 &
}
launch_o2p() {
  local port=$1; shift
  "$@" "$cache/oauth2-proxy-$OAUTH2_PROXY_VERSION" --provider oidc --oidc-issuer-url "$issuer" \
    --client-id chassis --client-secret chassis-secret --redirect-url "http://127.0.0.1:$o2p/oauth2/callback" \
    --upstream "http://127.0.0.1:$up" --http-address "127.0.0.1:$port" --cookie-secure=false \
    --cookie-secret 0123456789abcdef0123456789abcdef --email-domain '*' --skip-provider-button \
    --code-challenge-method S256 --scope "openid email profile" --request-logging=false \
    >"$work/o2p-$port.log" 2>&1 &
}
# PORT [launcher...]: HAProxy forwarding to the upstream over kept-alive connections,
# threads as many as the cores it may use (its default), no logging.
launch_haproxy() {
  local port=$1; shift
  cat >"$work/haproxy-$port.cfg" <<EOF
global
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend bench
  bind 127.0.0.1:$port
  default_backend upstream
backend upstream
  server up 127.0.0.1:$up
EOF
  "$@" haproxy -db -f "$work/haproxy-$port.cfg" >"$work/haproxy-$port.log" 2>&1 &
}
launch_chassis "$chassis" "$chassis_metrics"; chassis_pid=$!; pids+=($chassis_pid)
launch_o2p "$o2p"; o2p_pid=$!; pids+=($o2p_pid)
launch_haproxy "$hap"; hap_pid=$!; pids+=($hap_pid)
# For the split placement, a second set of proxies started on core 1 alone, as in a pod
# with one CPU: each sizes itself to what it may use at start (tokio: one thread, Go:
# GOMAXPROCS 1, HAProxy: one thread), which moving a running process to one core would
# not do. Sessions are sealed with the same secrets, so the cookies of the logins below
# work for both sets.
split_ok=false
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  split_ok=true
  launch_chassis "$chassis_split" "$chassis_split_metrics" taskset -c 1; chassis_split_pid=$!; pids+=($chassis_split_pid)
  launch_o2p "$o2p_split" taskset -c 1; o2p_split_pid=$!; pids+=($o2p_split_pid)
  launch_haproxy "$hap_split" taskset -c 1; hap_split_pid=$!; pids+=($hap_split_pid)
fi
# URL: waits up to 20 s for it to answer, or stops the benchmark with the logs.
await() {
  for _ in $(seq 1 100); do curl -fs "$1" >/dev/null && return 0; sleep 0.2; done
  echo "no answer from $1 after 20 s; logs:"; tail -n 20 "$work"/chassis-*.log "$work"/o2p-*.log "$work"/haproxy-*.log; exit 1
}
proxies=("$chassis" "$o2p" "$hap"); ready=("$chassis")
if $split_ok; then proxies+=("$chassis_split" "$o2p_split" "$hap_split"); ready+=("$chassis_split"); fi
for port in "${proxies[@]}"; do await "http://127.0.0.1:$port/ping"; done
for port in "${ready[@]}"; do await "http://127.0.0.1:$port/ready"; done

chassis_cookie=$("$load" login --proxy "http://127.0.0.1:$chassis" --user alice --password alice-pass)
o2p_cookie=$("$load" login --proxy "http://127.0.0.1:$o2p" --user alice --password alice-pass)

results="$work/results.jsonl"
# CPU time (user + system, clock ticks) of a process so far: every process's share of the cores.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Two placements. shared: every process may run on every core (generator, upstream and
# proxy compete). split: generator and upstream on core 0, the proxies (the set started
# on core 1) on core 1, so a proxy gets a core of its own as it would in its own pod;
# direct runs then have the generator and upstream on core 0 as well.
placements="shared"
$split_ok && placements="shared split"
# Sets the generator's launcher, the upstream's cores and which proxy pair is measured.
place() {
  gen=(); cur_chassis=$chassis; cur_chassis_pid=$chassis_pid; cur_o2p=$o2p; cur_o2p_pid=$o2p_pid
  cur_hap=$hap; cur_hap_pid=$hap_pid
  command -v taskset >/dev/null || return 0
  if [ "$1" = split ]; then
    gen=(taskset -c 0); taskset -a -pc 0 "$up_pid" >/dev/null
    cur_chassis=$chassis_split; cur_chassis_pid=$chassis_split_pid; cur_o2p=$o2p_split; cur_o2p_pid=$o2p_split_pid
    cur_hap=$hap_split; cur_hap_pid=$hap_split_pid
  else
    taskset -a -pc "0-$(( $(nproc) - 1 ))" "$up_pid" >/dev/null
  fi
}
target_args() { # target route -> proxy-load arguments
  case $1 in
    direct) args=(--url "http://127.0.0.1:$up$2") ;;
    chassis) args=(--url "http://127.0.0.1:$cur_chassis$2" --cookie "$chassis_cookie") ;;
    oauth2-proxy) args=(--url "http://127.0.0.1:$cur_o2p$2" --cookie "$o2p_cookie") ;;
    haproxy) args=(--url "http://127.0.0.1:$cur_hap$2") ;;
  esac
}
rss() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
# Moderate load first, on fresh processes: open loop (requests sent on a fixed schedule,
# latency counted from the scheduled time) at rates far below what the proxies sustain,
# on `/` and on `/app`; the peak RSS of this phase is recorded before the saturating runs.
place shared
for round in $(seq 1 "$ROUNDS"); do
  for spec in "/ 1000" "/ 2000" "/app 1000"; do
    set -- $spec
    for target in direct chassis oauth2-proxy; do
      target_args "$target" "$1"
      out=$("$load" load "${args[@]}" --rate "$2" --concurrency 64 --seconds "$SECONDS_PER_RUN")
      echo "{\"round\": $round, \"placement\": \"shared\", \"route\": \"$1\", \"target\": \"$target\", \"result\": $out, \"ticks\": {}}" | tee -a "$results"
    done
  done
done
moderate_rss="$(rss "$chassis_pid") $(rss "$o2p_pid")"
for round in $(seq 1 "$ROUNDS"); do
  for placement in $placements; do
    place "$placement"
    for c in 16 64; do
      for target in direct chassis oauth2-proxy haproxy; do
        target_args "$target" /
        c0=$(cpu "$cur_chassis_pid"); o0=$(cpu "$cur_o2p_pid"); h0=$(cpu "$cur_hap_pid"); u0=$(cpu "$up_pid")
        out=$("${gen[@]}" "$load" load "${args[@]}" --concurrency "$c" --seconds "$SECONDS_PER_RUN")
        ticks="{\"chassis\": $(( $(cpu "$cur_chassis_pid") - c0 )), \"oauth2-proxy\": $(( $(cpu "$cur_o2p_pid") - o0 )), \"haproxy\": $(( $(cpu "$cur_hap_pid") - h0 )), \"upstream\": $(( $(cpu "$up_pid") - u0 ))}"
        echo "{\"round\": $round, \"placement\": \"$placement\", \"route\": \"ok\", \"target\": \"$target\", \"result\": $out, \"ticks\": $ticks}" | tee -a "$results"
      done
    done
  done
  # An upstream that does what apps do, wait (2 ms on /app), at moderate load: what a
  # proxy in front of a real application costs it.
  place shared
  for target in direct chassis oauth2-proxy; do
    target_args "$target" /app
    out=$("$load" load "${args[@]}" --concurrency 16 --seconds "$SECONDS_PER_RUN")
    echo "{\"round\": $round, \"placement\": \"shared\", \"route\": \"app\", \"target\": \"$target\", \"result\": $out, \"ticks\": {}}" | tee -a "$results"
  done
done
# The higher peak of chassis' and oauth2-proxy's two processes each (shared and split).
peak() { local m=0 v p; for p in "$@"; do v=$(rss "$p" 2>/dev/null || true); [ "${v:-0}" -gt "$m" ] && m=$v; done; echo "$m"; }
python3 - "$results" "$(peak "$chassis_pid" ${chassis_split_pid:-})" "$(peak "$o2p_pid" ${o2p_split_pid:-})" "$OAUTH2_PROXY_VERSION" "$SECONDS_PER_RUN" "$ROUNDS" $moderate_rss <<'PY'
import json, re, statistics, sys, datetime, os
path, chassis_rss, o2p_rss, version, seconds, rounds, chassis_rss_moderate, o2p_rss_moderate = sys.argv[1:9]
rows = [json.loads(l) for l in open(path)]
opened = [r for r in rows if r["result"].get("rate") is not None]
rows = [r for r in rows if r["result"].get("rate") is None]
placements = [p for p in ("shared", "split") if any(r["placement"] == p for r in rows)]
def sel(target, c, placement, route="ok"):
    return [r for r in rows if r["target"] == target and r["result"]["concurrency"] == c
            and r["placement"] == placement and r["route"] == route]
def med(target, c, key, placement="shared", route="ok"):
    return statistics.median(r["result"][key] for r in sel(target, c, placement, route))
tck = os.sysconf("SC_CLK_TCK")
def cpu_us(target, c, who, placement="shared"):
    return statistics.median((r["result"]["cpu_ticks"] if who == "generator" else r["ticks"][who]) / tck
                             / r["result"]["requests"] * 1e6 for r in sel(target, c, placement) if r["result"]["requests"])
cores = os.cpu_count(); mem = int(open("/proc/meminfo").readline().split()[1]) / 1024 / 1024
lines = ["<!-- proxy:begin -->",
 f"### Proxy run of {datetime.date.today()} ({cores} cores, {mem:.0f} GiB)", "",
 "Command: `make bench-proxy` (`e2e/bench/proxy.sh`). One tiny upstream (`ok`), reached directly, through",
 f"chassis-oauth-proxy (profile release-proxy, as shipped) and through oauth2-proxy {version} (built from Go modules),",
 "each with the session cookie of a real login at the same OpenID provider; load from `proxy-load` (HTTP/1.1",
 f"keep-alive) on the same machine; {seconds} s per run, median of {rounds} rounds. RSS is each proxy's peak (VmHWM).",
 "oauth2-proxy runs with `--request-logging=false` (its default logs a line per request; the other two log none).",
 "Every request carries the one session cookie, so chassis-oauth-proxy opens it from its cache of opened sessions",
 "(512 entries) rather than decrypting it each time, as it does for any user who comes back within the cache.",
 "", "**Moderate load** first, on fresh processes: open loop (requests sent on a fixed schedule from a thread of",
 "their own, up to 64 connections, latency counted from the scheduled time so that waiting behind a slow answer",
 "counts; failed requests are counted, not timed), all processes on both cores. `/app` is the upstream waiting",
 "2 ms before it answers (no CPU, like an application waiting on its database; a thread's sleep: tokio's timer",
 "rounds to its 1 ms ticks, which until 2026-11-27 made it 3 or 4 ms and the added p99 0.1 or 1 ms by chance).", "",
 "| route | requests/s sent | target | answered/s | errors | p50 ms | p99 ms | p99.9 ms |",
 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
def omed(target, route, rate, key):
    return statistics.median(r["result"][key] for r in opened
                             if r["target"] == target and r["route"] == route and r["result"]["rate"] == rate)
specs = sorted({(r["route"], r["result"]["rate"]) for r in opened})
for route, rate in specs:
    for t in ("direct", "chassis", "oauth2-proxy"):
        errors = sum(r["result"]["errors"] for r in opened
                     if r["target"] == t and r["route"] == route and r["result"]["rate"] == rate)
        lines.append(f"| `{route}` | {rate} | {t} | {omed(t, route, rate, 'rps'):.0f} | {errors} | "
                     f"{omed(t, route, rate, 'p50_ms'):.2f} | {omed(t, route, rate, 'p99_ms'):.2f} | "
                     f"{omed(t, route, rate, 'p999_ms'):.2f} |")
lines.append("")
# Latency counts answered requests only: when direct or chassis failed requests or fell
# behind the schedule, their percentiles would flatter them, so the run stops instead.
for route, rate in specs:
    for t in ("direct", "chassis"):
        bad = [r for r in opened if r["target"] == t and r["route"] == route and r["result"]["rate"] == rate
               and (r["result"]["errors"] or r["result"]["rps"] < 0.95 * rate)]
        if bad:
            sys.exit(f"{t} on {route} at {rate} requests/s failed requests or fell behind: {bad}")
for route, rate in specs:
    d = omed("direct", route, rate, "p99_ms")
    lines.append(f"- `{route}` at {rate} requests/s: added p99 chassis-oauth-proxy **{omed('chassis', route, rate, 'p99_ms') - d:.2f} ms** "
                 f"(goal at most 1 ms), oauth2-proxy {omed('oauth2-proxy', route, rate, 'p99_ms') - d:.2f} ms")
lines.append(f"- peak RSS after the moderate runs: chassis-oauth-proxy **{int(chassis_rss_moderate) / 1024:.1f} MiB**, oauth2-proxy "
             f"**{int(o2p_rss_moderate) / 1024:.1f} MiB** (ratio {int(chassis_rss_moderate) / int(o2p_rss_moderate):.2f}, goal at most 0.33)")
lines += ["", "**Saturating load** next: closed loop (each connection sends its next request when the last one answered).",
 "Placement **shared**: every process may use both cores; **split** (`taskset`): generator and upstream on core 0,",
 "the proxy on core 1, as when the proxy has a pod of its own with one CPU: a second chassis-oauth-proxy,",
 "oauth2-proxy and HAProxy started on core 1 alone, so each sizes itself to one core (tokio: one thread; Go:",
 "GOMAXPROCS 1; HAProxy: one thread). HAProxy (Debian's package, no login: it only forwards, over kept-alive",
 "upstream connections) is the peer for what one extra hop costs any proxy here. In the split placement the direct",
 "runs have only core 0 (generator and upstream) while the proxied runs have core 1 as well: there \"of direct\" is",
 "against one core, and shows what a proxy with a core of its own costs the path, not a like-for-like share.",
 "Requests answered with anything but 200 count as errors (the sum of the rounds), not in requests/s.", "",
 "| placement | concurrency | target | requests/s | errors | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
def errors(t, c, pl, route="ok"):
    return sum(r["result"]["errors"] for r in sel(t, c, pl, route))
for pl in placements:
    for c in (16, 64):
        for t in ("direct", "chassis", "oauth2-proxy", "haproxy"):
            lines.append(f"| {pl} | {c} | {t} | {med(t, c, 'rps', pl):.0f} | {errors(t, c, pl)} | {med(t, c, 'p50_ms', pl):.2f} | "
                         f"{med(t, c, 'p99_ms', pl):.2f} |")
# Throughput counts answered requests only: failed ones would make a target look only slower.
for pl in placements:
    for c in (16, 64):
        for t in ("direct", "chassis", "haproxy"):
            if errors(t, c, pl):
                sys.exit(f"{t} failed {errors(t, c, pl)} requests ({pl}, concurrency {c}): see the results")
lines.append("")
for pl in placements:
    for c in (16, 64):
        ch, o2, d = med("chassis", c, "rps", pl), med("oauth2-proxy", c, "rps", pl), med("direct", c, "rps", pl)
        hp = med("haproxy", c, "rps", pl)
        added = med("chassis", c, "p99_ms", pl) - med("direct", c, "p99_ms", pl)
        lines.append(f"- {pl}, concurrency {c}: chassis / oauth2-proxy throughput **{ch / o2:.2f}x** (goal 2x); "
                     f"chassis / direct **{100 * ch / d:.0f} %** (goal 80 %; HAProxy, which only forwards: "
                     f"{100 * hp / d:.0f} %); added p99 **{added:.2f} ms** (goal 1 ms)")
lines += ["", "The same at concurrency 16 on `/app` (closed loop, shared placement):", "",
          "| target | requests/s | errors | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
for t in ("direct", "chassis", "oauth2-proxy"):
    lines.append(f"| {t} | {med(t, 16, 'rps', route='app'):.0f} | {errors(t, 16, 'shared', 'app')} | "
                 f"{med(t, 16, 'p50_ms', route='app'):.2f} | {med(t, 16, 'p99_ms', route='app'):.2f} |")
ch, o2, d = (med(t, 16, "rps", route="app") for t in ("chassis", "oauth2-proxy", "direct"))
added = med("chassis", 16, "p99_ms", route="app") - med("direct", 16, "p99_ms", route="app")
lines += ["", f"- `/app`, concurrency 16: chassis / oauth2-proxy **{ch / o2:.2f}x**; chassis / direct **{100 * ch / d:.0f} %**; "
          f"added p99 **{added:.2f} ms**", ""]
lines.append(f"- peak RSS over the whole run, saturating runs included (the higher of each proxy's shared and split process): chassis-oauth-proxy **{int(chassis_rss) / 1024:.1f} MiB**, oauth2-proxy "
             f"**{int(o2p_rss) / 1024:.1f} MiB** (ratio {int(chassis_rss) / int(o2p_rss):.2f}, goal at most 0.33)")
lines += ["", "CPU time per request in microseconds, shared placement (user + system from `/proc`, median of the rounds):",
          "", "| concurrency | target | generator | upstream | proxy | total |", "| --- | --- | --- | --- | --- | --- |"]
for c in (16, 64):
    for t in ("direct", "chassis", "oauth2-proxy", "haproxy"):
        g, u = cpu_us(t, c, "generator"), cpu_us(t, c, "upstream")
        p = 0 if t == "direct" else cpu_us(t, c, t)
        lines.append(f"| {c} | {t} | {g:.0f} | {u:.0f} | {'-' if t == 'direct' else f'{p:.0f}'} | {g + u + p:.0f} |")
lines.append("")
for c in (16, 64):
    g, u, p = cpu_us("direct", c, "generator"), cpu_us("direct", c, "upstream"), cpu_us("chassis", c, "chassis")
    lines.append(f"- concurrency {c}: on shared cores, 80 % of direct needs a proxy costing at most a quarter of "
                 f"generator + upstream, **{(g + u) / 4:.0f} µs** per request; chassis-oauth-proxy costs **{p:.0f} µs**, "
                 f"HAProxy {cpu_us('haproxy', c, 'haproxy'):.0f} µs (a proxy makes two HTTP exchanges where the upstream makes one)")
lines.append("<!-- proxy:end -->")
section = "\n".join(lines)
doc = open("docs/BENCHMARKS.md").read()
if "<!-- proxy:begin -->" in doc:
    doc = re.sub(r"<!-- proxy:begin -->.*<!-- proxy:end -->", lambda _: section, doc, flags=re.S)
else:
    doc = doc.rstrip("\n") + "\n\n## Authenticating proxy (issue 5)\n\n" + section + "\n"
open("docs/BENCHMARKS.md", "w").write(doc)
print(section)
PY
