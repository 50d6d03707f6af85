#!/usr/bin/env bash
# Debian packages that the tests use as real tools, installed once:
#   chromium   - the built-in dashboard is checked in headless Chromium
#   prometheus - promtool checks the rules; a real Prometheus scrapes a running stack
#   postgresql - the TLS test runs Debian's PostgreSQL (the embedded wheel has no OpenSSL)
#   caddy      - the TLS test runs the deploy's proxy config (deploy/proxy/Caddyfile)
set -euo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
command -v caddy >/dev/null 2>&1 || need+=(caddy)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages for the tests: ${need[*]}"
$sudo apt-get update -qq
# policy-rc.d 101: install only, never start a packaged daemon (Prometheus would take :9090,
# PostgreSQL :5432, Caddy :80)
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod +x /usr/sbin/policy-rc.d
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
