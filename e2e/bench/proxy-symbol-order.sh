#!/usr/bin/env bash
# `make proxy-symbol-order`: regenerates oauth-proxy/symbol-order.txt, the functions of
# chassis-oauth-proxy that run when it serves, hottest first. The linker puts them
# together at the start of the code (oauth-proxy/build.rs), so the pages that serve
# requests are few and contiguous: the kernel maps code in 64 KB blocks around each
# page that runs, and scattered functions kept most of the proxy's code resident
# (docs/BENCHMARKS.md, session 18).
#
# Runs the shipped build (profile release-proxy) under valgrind's callgrind through
# what the benchmark and a user do: start-up and discovery at a real OpenID provider
# (e2e/oidc), a browser login, proxied requests at several concurrencies (and one
# slow upstream path), /oauth2/userinfo, /oauth2/auth, /ping, /ready, /metrics,
# refused requests, sign-out, shutdown: under a minute once built. Regenerate after
# any change of the proxy's code, its dependencies or the compiler: some names change
# with them (copies of small generic helpers carry an LLVM number, `name.1234`, that
# shifts with any code change; std's names carry the compiler's hash). The linker skips
# names that no longer exist, so a stale list only helps less, but `make test` fails when
# the list names functions the build no longer has (`make proxy-symbol-order-check`), as
# it does on stale CRDs. valgrind's CPU
# lacks AVX-512, so code a production CPU picks by feature may be missing from the
# list (it then runs from pages outside the packed block). Env: PROXY, another build to
# profile; OUT, where to write the list.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
command -v valgrind >/dev/null || { echo "valgrind is needed (Debian: apt-get install valgrind)" >&2; exit 1; }

[ -n "${PROXY:-}" ] || cargo build -q --profile release-proxy -p chassis-oauth-proxy
cargo build -q --release -p chassis-bench
load=target/release/proxy-load
proxy=${PROXY:-target/release-proxy/chassis-oauth-proxy}

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(free_port); port=$(free_port); metrics=$(free_port)

cat >"$work/oidc.json" <<EOF
{"clients": [{"client_id": "chassis", "client_secret": "chassis-secret",
   "redirect_uris": ["http://127.0.0.1:$port/oauth2/callback"],
   "post_logout_redirect_uris": ["http://127.0.0.1:$port/"],
   "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
   "token_endpoint_auth_method": "client_secret_basic"}],
 "users": [{"sub": "alice", "password": "alice-pass", "email": "alice@example.com", "email_verified": true,
   "name": "Alice", "preferred_username": "alice", "groups": ["developers"]}]}
EOF
PORT=0 OIDC_CONFIG="$work/oidc.json" bash e2e/oidc/start.sh >"$work/oidc.out" 2>"$work/oidc.err" &
pids+=($!)
for _ in $(seq 1 600); do grep -q '^ready ' "$work/oidc.out" 2>/dev/null && break; sleep 0.2; done
issuer=$(sed -n 's/^ready //p' "$work/oidc.out")
[ -n "$issuer" ] || { echo "the OpenID provider did not start:"; cat "$work/oidc.err"; exit 1; }
"$load" upstream --port "$up" & pids+=($!)

valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$work/callgrind.out" \
  "$proxy" --http-address "127.0.0.1:$port" --metrics-address "127.0.0.1:$metrics" \
  --upstream "http://127.0.0.1:$up" --oidc-issuer-url "$issuer" --client-id chassis --client-secret chassis-secret \
  --redirect-url "http://127.0.0.1:$port/oauth2/callback" --cookie-secure false --email-domains '*' \
  --cookie-secret MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY= >"$work/proxy.log" 2>&1 &
proxy_pid=$!; pids+=($proxy_pid)
ready=""
for _ in $(seq 1 300); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ready")" = 200 ] && { ready=1; break; }
  kill -0 "$proxy_pid" 2>/dev/null || break
  sleep 0.5
done
[ -n "$ready" ] || { echo "the proxy did not become ready under valgrind:"; tail -n 20 "$work/proxy.log"; exit 1; }
base="http://127.0.0.1:$port"
cookie=$("$load" login --proxy "$base" --user alice --password alice-pass)
for concurrency in 1 16 64 256; do
  "$load" load --url "$base/" --cookie "$cookie" --concurrency "$concurrency" --seconds 3 >/dev/null
done
"$load" load --url "$base/" --cookie "$cookie" --concurrency 64 --seconds 3 --rate 300 >/dev/null
"$load" load --url "$base/app" --cookie "$cookie" --concurrency 64 --seconds 3 --rate 300 >/dev/null
for path in /ping /ready /oauth2/userinfo /oauth2/auth "/oauth2/start?rd=/x" /no/session; do
  curl -s -o /dev/null -H "Cookie: $cookie" "$base$path" || true
  curl -s -o /dev/null -H "Accept: text/html" "$base$path" || true
done
curl -s -o /dev/null "http://127.0.0.1:$metrics/metrics"
curl -s -o /dev/null -H "Cookie: $cookie" "$base/oauth2/sign_out"
# SIGTERM: the drain path runs too, and callgrind writes its profile at exit.
kill -TERM "$proxy_pid"
wait "$proxy_pid" || true
python3 e2e/bench/symbol_order.py "$work/callgrind.out" "$proxy" "${OUT:-oauth-proxy/symbol-order.txt}"
