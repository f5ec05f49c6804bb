#!/usr/bin/env bash
# Debian's Chromium, for the dashboard's tests in a real browser (crates/meshca/tests/dashboard_browser.rs),
# driven headless over the DevTools protocol. Never a browser build downloaded by a tool.
#
# Usage:
#   chromium.sh build   install the `chromium` package if missing (root); print the binary's path
#   chromium.sh path    print the binary's path (exit 1 if not installed)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

case "${1:-}" in
    build)
        command -v chromium >/dev/null || { peers_need_root; peers_apt_install chromium; }
        command -v chromium
        ;;
    path) command -v chromium ;;
    *) sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
