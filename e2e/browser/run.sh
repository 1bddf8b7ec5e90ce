#!/usr/bin/env bash
# Headless login driver; installs its locked dependencies on first use. Arguments: see README.md.
cd "$(dirname "$0")" && { [ -d node_modules ] || npm ci --silent; } && exec node login.mjs "$@"
