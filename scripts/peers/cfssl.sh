#!/usr/bin/env bash
# CloudFlare's cfssl (Debian package golang-cfssl) as a comparison signer for meshca's benchmarks:
# `cfssl serve` signs CSRs POSTed to /api/v1/cfssl/sign with a given CA. See docs/peers.md.
#
# Usage:
#   cfssl.sh install                          apt-get install golang-cfssl (once)
#   cfssl.sh path                             print the cfssl binary path (exit 1 if not installed)
#   cfssl.sh start DIR PORT CA_CERT CA_KEY    `cfssl serve` on 127.0.0.1:PORT; writes DIR/env
#   cfssl.sh stop DIR                         stop what `start DIR` started
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

CFSSL_BIN=/usr/bin/cfssl

usage() { sed -n '5,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd_install() {
    peers_need_root
    peers_lock cfssl
    peers_apt_install golang-cfssl curl ca-certificates openssl
    echo "$CFSSL_BIN"
}

cmd_path() {
    [ -x "$CFSSL_BIN" ] || { peers_log "cfssl not installed; run: $0 install"; exit 1; }
    echo "$CFSSL_BIN"
}

cmd_start() {
    [ $# -eq 4 ] || usage
    local dir=$1 port=$2 ca_cert=$3 ca_key=$4
    [[ $port =~ ^[0-9]+$ ]] && [ "$port" -gt 1024 ] && [ "$port" -lt 65536 ] || peers_die "bad PORT: $port"
    [ -f "$ca_cert" ] || peers_die "CA certificate not found: $ca_cert"
    [ -f "$ca_key" ] || peers_die "CA key not found: $ca_key"
    ca_cert=$(cd "$(dirname "$ca_cert")" && pwd)/$(basename "$ca_cert")
    ca_key=$(cd "$(dirname "$ca_key")" && pwd)/$(basename "$ca_key")
    mkdir -p "$dir"; dir=$(cd "$dir" && pwd)

    if [ -f "$dir/env" ]; then
        local pid; pid=$(peers_env_get "$dir/env" CFSSL_PID)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            peers_log "already running ($dir/env)"; cat "$dir/env"; return 0
        fi
        cmd_stop "$dir"
    fi
    local bin; bin=$(cmd_path)
    peers_port_free "$port" || peers_die "port $port on 127.0.0.1 is in use"

    # Leaf profile shaped like meshca's workload certificates (EKU server+client, short-lived).
    # "default" applies when a request names no profile; "leaf" can be named explicitly.
    cat >"$dir/cfssl-config.json" <<'EOF'
{
  "signing": {
    "default": {
      "expiry": "24h",
      "usages": ["digital signature", "key encipherment", "server auth", "client auth"]
    },
    "profiles": {
      "leaf": {
        "expiry": "24h",
        "usages": ["digital signature", "key encipherment", "server auth", "client auth"]
      }
    }
  }
}
EOF
    setsid "$bin" serve -address 127.0.0.1 -port "$port" -ca "$ca_cert" -ca-key "$ca_key" \
        -config "$dir/cfssl-config.json" -loglevel 2 </dev/null >"$dir/cfssl.log" 2>&1 &
    local pid=$!
    {
        echo "CFSSL_URL=http://127.0.0.1:$port"
        echo "CFSSL_SIGN_URL=http://127.0.0.1:$port/api/v1/cfssl/sign"
        echo "CFSSL_PID=$pid"
    } >"$dir/env"
    local deadline=$((SECONDS + 30))
    until curl -fsS --max-time 2 -X POST -d '{}' "http://127.0.0.1:$port/api/v1/cfssl/info" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ] || ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$dir/cfssl.log" >&2
            cmd_stop "$dir"
            peers_die "cfssl serve did not come up (log: $dir/cfssl.log)"
        fi
        sleep 0.3
    done
    peers_log "cfssl ready at http://127.0.0.1:$port (env: $dir/env)"
    cat "$dir/env"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local dir=$1
    [ -f "$dir/env" ] || { peers_log "nothing started in $dir"; return 0; }
    peers_kill_pid "$(peers_env_get "$dir/env" CFSSL_PID)"
    rm -f "$dir/env"
    peers_log "stopped ($dir)"
}

case "${1:-}" in
    install) shift; cmd_install "$@" ;;
    path) shift; cmd_path "$@" ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    *) usage ;;
esac
