#!/usr/bin/env bash
# Builds / installs every external test peer, one after the other (the machine has 2 cores),
# and prints how long each took. Cached peers take seconds. See docs/peers.md.
#
# Usage: all.sh [--smoke]     --smoke: afterwards run smoke.sh (start each peer, prove it with curl)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

smoke=
case "${1:-}" in
    "") ;;
    --smoke) smoke=1 ;;
    *) sed -n '5p' "$0" | sed 's/^# //' >&2; exit 2 ;;
esac

peers_need_root
TIMEFORMAT='[peers] %0R s'
step() {
    local name=$1; shift
    peers_log "== $name"
    time "$@" >/dev/null
}
step "kube-apiserver + etcd" "$here/kube-apiserver.sh" build
step "vault" "$here/vault.sh" build
step "cfssl" "$here/cfssl.sh" install
step "helm" "$here/helm.sh" build
step "chromium" "$here/chromium.sh" build
step "spire" "$here/spire.sh" build

peers_log "kube-apiserver: $("$here/kube-apiserver.sh" path)"
peers_log "etcd:           $(command -v etcd)"
peers_log "vault:          $("$here/vault.sh" path)"
peers_log "cfssl:          $("$here/cfssl.sh" path)"
peers_log "helm:           $("$here/helm.sh" path)"
peers_log "chromium:       $("$here/chromium.sh" path)"
peers_log "spire-server:   $("$here/spire.sh" path)"

if [ -n "$smoke" ]; then
    "$here/smoke.sh"
fi
