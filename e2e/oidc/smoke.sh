#!/usr/bin/env bash
# Smoke test of the e2e OpenID provider, by hand with curl (no browser):
# discovery + JWKS, authorization code + PKCE (S256) + nonce with the login
# form, automatic consent, token exchange (client_secret_basic), ID token
# claims and signature, refresh token grant (rotation and reuse), userinfo,
# wrong password, PKCE required, code replay, offline_access without
# prompt=consent, RP-initiated logout.
#
# Starts its own server on a free port (PORT=0) with example-config.json and
# stops it on exit. Exits non-zero on the first failure.
#   bash e2e/oidc/smoke.sh        (from the repository root, or anywhere)
# `A && B || fail ...` is meant: fail when either check is false (fail exits).
# shellcheck disable=SC2015
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"
[ -d node_modules ] || npm ci --silent

T="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$T"
}
trap cleanup EXIT

PASSED=0
ok() { PASSED=$((PASSED + 1)); echo "ok - $*"; }
fail() {
  echo "FAIL - $*" >&2
  if [ -s "$T/server.err" ]; then echo "--- server stderr:" >&2; tail -n 30 "$T/server.err" >&2; fi
  echo "smoke: $PASSED passed, 1 failed" >&2
  exit 1
}

# node is there anyway (the server needs it); use it for JSON and JWTs.
json() { # json FILE EXPR  -> prints the JS expression evaluated on the parsed file as `j`
  node -e 'const j=JSON.parse(require("fs").readFileSync(process.argv[1],"utf8")); const v=eval(process.argv[2]); process.stdout.write(typeof v==="string"?v:JSON.stringify(v))' "$1" "$2"
}
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }

# ------------------------------------------------------------------ start
PORT=0 OIDC_CONFIG="$HERE/example-config.json" ACCESS_TOKEN_TTL=300 ID_TOKEN_TTL=300 \
  node server.mjs >"$T/server.out" 2>"$T/server.err" &
SERVER_PID=$!
for _ in $(seq 1 100); do
  grep -q '^ready ' "$T/server.out" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "server exited before ready"
  sleep 0.1
done
grep -q '^ready ' "$T/server.out" || fail "server not ready after 10s"
ISSUER="$(sed -n 's/^ready //p' "$T/server.out" | head -n1)"
ok "server ready at $ISSUER"

CLIENT_ID=chassis
CLIENT_SECRET=chassis-secret
REDIRECT_URI=http://127.0.0.1:4180/oauth2/callback
POST_LOGOUT_URI=http://127.0.0.1:4180/

# req METHOD URL JAR [curl args...]: sets STATUS, LOCATION (absolute); body in $T/body
req() {
  local method="$1" url="$2" jar="$3"; shift 3
  STATUS="$(curl -sS -X "$method" -o "$T/body" -D "$T/headers" -w '%{http_code}' \
    -b "$jar" -c "$jar" "$@" "$url")" || fail "curl $method $url"
  LOCATION="$(tr -d '\r' <"$T/headers" | sed -n 's/^[Ll]ocation: //p' | tail -n1)"
  case "$LOCATION" in /*) LOCATION="$ISSUER$LOCATION" ;; esac
}

# ------------------------------------------------------------------ discovery
curl -sSf "$ISSUER/.well-known/openid-configuration" -o "$T/disco.json" || fail "discovery"
[ "$(json "$T/disco.json" j.issuer)" = "$ISSUER" ] || fail "discovery issuer"
AUTH_EP="$(json "$T/disco.json" j.authorization_endpoint)"
TOKEN_EP="$(json "$T/disco.json" j.token_endpoint)"
USERINFO_EP="$(json "$T/disco.json" j.userinfo_endpoint)"
END_SESSION_EP="$(json "$T/disco.json" j.end_session_endpoint)"
JWKS_URI="$(json "$T/disco.json" j.jwks_uri)"
[ "$(json "$T/disco.json" 'j.code_challenge_methods_supported.join(",")')" = "S256" ] || fail "S256 only"
[ "$(json "$T/disco.json" 'j.response_types_supported.join(",")')" = "code" ] || fail "response_types code only"
for s in openid email profile groups offline_access; do
  [ "$(json "$T/disco.json" "j.scopes_supported.includes('$s')")" = true ] || fail "scope $s not supported"
done
[ -n "$END_SESSION_EP" ] || fail "no end_session_endpoint"
ok "discovery: auth=$AUTH_EP token=$TOKEN_EP end_session=$END_SESSION_EP"

curl -sSf "$JWKS_URI" -o "$T/jwks.json" || fail "jwks"
[ "$(json "$T/jwks.json" 'j.keys.filter(k=>k.kty==="RSA"&&k.alg==="RS256"&&k.use==="sig"&&!k.d).length')" = 1 ] || fail "jwks: one public RS256 key"
ok "jwks: one RSA RS256 public key"

# ------------------------------------------------------------------ flows
# authorize JAR EXTRA_QUERY...: sends the authorization request with a fresh
# PKCE verifier, state and nonce (VERIFIER, STATE, NONCE are set).
authorize() {
  local jar="$1"; shift
  VERIFIER="$(openssl rand 48 | b64url)"
  CHALLENGE="$(printf '%s' "$VERIFIER" | openssl dgst -sha256 -binary | b64url)"
  STATE="$(openssl rand -hex 12)"
  NONCE="$(openssl rand -hex 12)"
  req GET "$AUTH_EP" "$jar" -G \
    --data-urlencode "client_id=$CLIENT_ID" \
    --data-urlencode "redirect_uri=$REDIRECT_URI" \
    --data-urlencode "response_type=code" \
    --data-urlencode "state=$STATE" \
    --data-urlencode "nonce=$NONCE" \
    --data-urlencode "code_challenge=$CHALLENGE" \
    --data-urlencode "code_challenge_method=S256" \
    "$@"
}

# follow JAR: follows GET redirects on the issuer until one leaves it; sets LOCATION.
follow() {
  local jar="$1" n=0
  while :; do
    case "$LOCATION" in "$ISSUER"/*) ;; *) return 0 ;; esac
    n=$((n + 1)); [ "$n" -le 10 ] || fail "too many redirects"
    req GET "$LOCATION" "$jar"
    case "$STATUS" in 302 | 303) ;; *) fail "expected a redirect from the OP, got $STATUS: $(head -c 400 "$T/body")" ;; esac
  done
}

# login_page: GET the interaction page at $LOCATION; sets FORM_ACTION
login_page() {
  local jar="$1"
  case "$LOCATION" in "$ISSUER"/interaction/*) ;; *) fail "expected the interaction page, got Location '$LOCATION' (status $STATUS)" ;; esac
  req GET "$LOCATION" "$jar"
  [ "$STATUS" = 200 ] || fail "interaction page status $STATUS"
  grep -q 'name="login"' "$T/body" || fail 'no input name="login"'
  grep -q 'name="password"' "$T/body" || fail 'no input name="password"'
  grep -q 'id="submit"' "$T/body" || fail 'no button id="submit"'
  FORM_ACTION="$(sed -n 's/.*<form id="login-form" method="post" action="\([^"]*\)".*/\1/p' "$T/body")"
  [ -n "$FORM_ACTION" ] || fail "no form action"
  FORM_ACTION="$ISSUER$FORM_ACTION"
}

# callback_code: checks $LOCATION is the redirect_uri with our state; sets CODE
callback_code() {
  case "$LOCATION" in "$REDIRECT_URI"\?*) ;; *) fail "expected redirect to $REDIRECT_URI, got '$LOCATION'" ;; esac
  local q="${LOCATION#*\?}"
  CODE="$(printf '%s' "$q" | tr '&' '\n' | sed -n 's/^code=//p')"
  local st; st="$(printf '%s' "$q" | tr '&' '\n' | sed -n 's/^state=//p')"
  local iss; iss="$(printf '%s' "$q" | tr '&' '\n' | sed -n 's/^iss=//p')"
  [ -n "$CODE" ] || fail "no code in callback: $LOCATION"
  [ "$st" = "$STATE" ] || fail "state mismatch: $st != $STATE"
  [ "$(node -e 'process.stdout.write(decodeURIComponent(process.argv[1]))' "$iss")" = "$ISSUER" ] || fail "iss in callback: $iss"
}

# token_exchange CODE VERIFIER -> $T/token.json, sets STATUS
token_exchange() {
  STATUS="$(curl -sS -o "$T/token.json" -w '%{http_code}' -u "$CLIENT_ID:$CLIENT_SECRET" \
    --data-urlencode grant_type=authorization_code \
    --data-urlencode "code=$1" \
    --data-urlencode "redirect_uri=$REDIRECT_URI" \
    --data-urlencode "code_verifier=$2" \
    "$TOKEN_EP")"
}

# id_token_claims FILE_WITH_TOKEN_RESPONSE -> $T/claims.json (after verifying the RS256 signature with the JWKS)
id_token_claims() {
  node -e '
    const fs = require("fs"), crypto = require("crypto");
    const tok = JSON.parse(fs.readFileSync(process.argv[1], "utf8")).id_token;
    const jwks = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
    const [h, p, s] = tok.split(".");
    const header = JSON.parse(Buffer.from(h, "base64url"));
    const jwk = jwks.keys.find((k) => k.kid === header.kid);
    if (header.alg !== "RS256" || !jwk) { console.error("bad header", header); process.exit(1); }
    const key = crypto.createPublicKey({ key: jwk, format: "jwk" });
    if (!crypto.verify("RSA-SHA256", Buffer.from(h + "." + p), key, Buffer.from(s, "base64url"))) { console.error("bad signature"); process.exit(1); }
    fs.writeFileSync(process.argv[3], Buffer.from(p, "base64url"));
  ' "$1" "$T/jwks.json" "$T/claims.json" || fail "ID token signature"
}

FULL_SCOPE="openid email profile groups offline_access"

# ---- 1. alice, full flow with prompt=consent (offline_access needs it)
JAR="$T/alice.jar"
authorize "$JAR" --data-urlencode "scope=$FULL_SCOPE" --data-urlencode "prompt=consent"
[ "$STATUS" = 303 ] || fail "authorization request: status $STATUS $(head -c 300 "$T/body")"
INTERACTION_URL="$LOCATION"
login_page "$JAR"
ok "authorization request -> 303 to the login form at ${INTERACTION_URL#"$ISSUER"}"

req POST "$FORM_ACTION" "$JAR" --data-urlencode login=alice --data-urlencode password=wrong
[ "$STATUS" = 403 ] || fail "wrong password: status $STATUS"
grep -q 'id="error"' "$T/body" || fail "wrong password: no id=error"
grep -q 'id="submit"' "$T/body" || fail "wrong password: form not shown again"
ok "wrong password refused (403, id=error, form shown again)"

req POST "$FORM_ACTION" "$JAR" --data-urlencode login=alice --data-urlencode password=alice-pass
[ "$STATUS" = 303 ] || fail "login: status $STATUS"
follow "$JAR"
callback_code
ok "login as alice -> redirected to the callback with code and state (no consent page)"

token_exchange "$CODE" "$VERIFIER"
[ "$STATUS" = 200 ] || fail "token exchange: $STATUS $(cat "$T/token.json")"
[ "$(json "$T/token.json" j.token_type)" = Bearer ] || fail "token_type"
REFRESH_TOKEN="$(json "$T/token.json" 'j.refresh_token||""')"
ACCESS_TOKEN="$(json "$T/token.json" j.access_token)"
[ -n "$REFRESH_TOKEN" ] || fail "no refresh_token: $(cat "$T/token.json")"
[ "$(json "$T/token.json" j.expires_in)" = 300 ] || fail "expires_in != ACCESS_TOKEN_TTL"
[ "$(json "$T/token.json" j.scope)" = "$FULL_SCOPE" ] || fail "granted scope: $(json "$T/token.json" j.scope)"
ok "code exchanged (client_secret_basic + code_verifier): access_token, id_token, refresh_token, scope '$FULL_SCOPE'"

id_token_claims "$T/token.json"
ID_TOKEN="$(json "$T/token.json" j.id_token)"
echo "   ID token payload: $(cat "$T/claims.json")"
c() { json "$T/claims.json" "$1"; }
[ "$(c j.iss)" = "$ISSUER" ] || fail "iss"
[ "$(c j.aud)" = "$CLIENT_ID" ] || fail "aud"
[ "$(c j.sub)" = alice ] || fail "sub"
[ "$(c j.nonce)" = "$NONCE" ] || fail "nonce"
[ "$(c j.email)" = alice@example.com ] || fail "email"
[ "$(c j.email_verified)" = true ] || fail "email_verified"
[ "$(c j.preferred_username)" = alice ] || fail "preferred_username"
[ "$(c j.name)" = "Alice Example" ] || fail "name"
[ "$(c j.groups)" = '["developers"]' ] || fail "groups"
[ "$(c 'j.exp-j.iat')" = 300 ] || fail "ID token lifetime != ID_TOKEN_TTL"
ok "ID token (RS256, signature verified with JWKS) has iss aud sub nonce email email_verified preferred_username name groups"

curl -sSf -H "Authorization: Bearer $ACCESS_TOKEN" "$USERINFO_EP" -o "$T/userinfo.json" || fail "userinfo"
[ "$(json "$T/userinfo.json" j.groups)" = '["developers"]' ] || fail "userinfo groups"
ok "userinfo: $(cat "$T/userinfo.json")"

STATUS="$(curl -sS -o "$T/refresh.json" -w '%{http_code}' -u "$CLIENT_ID:$CLIENT_SECRET" \
  --data-urlencode grant_type=refresh_token --data-urlencode "refresh_token=$REFRESH_TOKEN" "$TOKEN_EP")"
[ "$STATUS" = 200 ] || fail "refresh: $STATUS $(cat "$T/refresh.json")"
[ -n "$(json "$T/refresh.json" 'j.access_token||""')" ] || fail "refresh: no access_token"
[ -n "$(json "$T/refresh.json" 'j.id_token||""')" ] || fail "refresh: no id_token"
NEW_REFRESH="$(json "$T/refresh.json" 'j.refresh_token||""')"
[ -n "$NEW_REFRESH" ] && [ "$NEW_REFRESH" != "$REFRESH_TOKEN" ] || fail "refresh: not rotated"
id_token_claims "$T/refresh.json"
[ "$(c j.groups)" = '["developers"]' ] && [ "$(c j.email)" = alice@example.com ] || fail "refreshed ID token claims"
ok "refresh_token grant: new access_token, id_token (same claims) and a rotated refresh_token"

STATUS="$(curl -sS -o "$T/refresh.json" -w '%{http_code}' -u "$CLIENT_ID:$CLIENT_SECRET" \
  --data-urlencode grant_type=refresh_token --data-urlencode "refresh_token=$REFRESH_TOKEN" "$TOKEN_EP")"
[ "$STATUS" = 400 ] && [ "$(json "$T/refresh.json" j.error)" = invalid_grant ] || fail "used refresh token accepted again: $STATUS"
STATUS="$(curl -sS -o "$T/refresh.json" -w '%{http_code}' -u "$CLIENT_ID:$CLIENT_SECRET" \
  --data-urlencode grant_type=refresh_token --data-urlencode "refresh_token=$NEW_REFRESH" "$TOKEN_EP")"
[ "$STATUS" = 400 ] || fail "new refresh token still valid after reuse of the old one: $STATUS"
ok "reusing the rotated-away refresh token is refused (invalid_grant) and revokes the grant (the new one fails too)"

token_exchange "$CODE" "$VERIFIER"
[ "$STATUS" = 400 ] && [ "$(json "$T/token.json" j.error)" = invalid_grant ] || fail "code replay accepted: $STATUS"
ok "code replay refused (invalid_grant)"

# ---- 2. RP-initiated logout for alice
req GET "$END_SESSION_EP" "$JAR" -G --data-urlencode "id_token_hint=$ID_TOKEN" \
  --data-urlencode "post_logout_redirect_uri=$POST_LOGOUT_URI" --data-urlencode state=bye
[ "$STATUS" = 200 ] || fail "end_session: $STATUS $(head -c 300 "$T/body")"
grep -q 'id="op.logoutForm"' "$T/body" && grep -q 'id="logout-confirm"' "$T/body" || fail "logout page"
LOGOUT_ACTION="$(sed -n 's/.*<form id="op.logoutForm" method="post" action="\([^"]*\)".*/\1/p' "$T/body")"
XSRF="$(sed -n 's/.*name="xsrf" value="\([^"]*\)".*/\1/p' "$T/body")"
req POST "$LOGOUT_ACTION" "$JAR" --data-urlencode "xsrf=$XSRF" --data-urlencode logout=yes
[ "$STATUS" = 303 ] && [ "$LOCATION" = "${POST_LOGOUT_URI}?state=bye" ] || fail "logout confirm: $STATUS '$LOCATION'"
authorize "$JAR" --data-urlencode "scope=openid email"
login_page "$JAR"
ok "RP-initiated logout: logout page auto-confirms, redirect to ${POST_LOGOUT_URI}?state=bye; next authorization asks for login again"

# ---- 3. offline_access without prompt=consent (spec: ignored), as bob
JAR="$T/bob.jar"
authorize "$JAR" --data-urlencode "scope=$FULL_SCOPE"
login_page "$JAR"
req POST "$FORM_ACTION" "$JAR" --data-urlencode login=bob@corp.example --data-urlencode password=bob-pass
follow "$JAR"
callback_code
token_exchange "$CODE" "$VERIFIER"
[ "$STATUS" = 200 ] || fail "bob token exchange: $STATUS $(cat "$T/token.json")"
[ -z "$(json "$T/token.json" 'j.refresh_token||""')" ] || fail "refresh_token issued without prompt=consent"
id_token_claims "$T/token.json"
[ "$(c j.sub)" = bob ] && [ "$(c j.email_verified)" = false ] && [ "$(c j.groups)" = '["qa"]' ] || fail "bob claims: $(cat "$T/claims.json")"
ok "bob (login by email): email_verified=false, groups [qa]; no refresh_token without prompt=consent"

# ---- 4. PKCE is required; a wrong verifier is refused
JAR="$T/nopkce.jar"
req GET "$AUTH_EP" "$JAR" -G --data-urlencode "client_id=$CLIENT_ID" --data-urlencode "redirect_uri=$REDIRECT_URI" \
  --data-urlencode response_type=code --data-urlencode "scope=openid" --data-urlencode state=s1
case "$LOCATION" in "$REDIRECT_URI"\?*error=invalid_request*) ;; *) fail "no-PKCE request not refused: $STATUS '$LOCATION'" ;; esac
JAR="$T/alice.jar"
authorize "$JAR" --data-urlencode "scope=openid"
login_page "$JAR"
req POST "$FORM_ACTION" "$JAR" --data-urlencode login=alice --data-urlencode password=alice-pass
follow "$JAR"
callback_code
token_exchange "$CODE" "wrong-verifier-wrong-verifier-wrong-verifier-0123456789"
[ "$STATUS" = 400 ] && [ "$(json "$T/token.json" j.error)" = invalid_grant ] || fail "wrong code_verifier accepted: $STATUS"
ok "authorization without code_challenge refused (invalid_request); wrong code_verifier refused (invalid_grant)"

echo "smoke: $PASSED passed, 0 failed"
