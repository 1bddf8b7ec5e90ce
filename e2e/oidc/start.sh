#!/usr/bin/env bash
# Start the e2e OpenID provider; installs its locked dependencies on first use.
# Env: PORT (default 5556), OIDC_CONFIG, ACCESS_TOKEN_TTL, ID_TOKEN_TTL, ... (see README.md)
cd "$(dirname "$0")" && { [ -d node_modules ] || npm ci --silent; } && exec node server.mjs
