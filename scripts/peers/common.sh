# shellcheck shell=bash
# Sourced helpers for the external test peers (kube-apiserver, Vault, cfssl).
#
# Binaries are cached OUTSIDE the checkout so a fresh clone (CI) on the same machine reuses them,
# and builds take a per-peer flock so two concurrent invocations never build the same thing twice.

: "${MESHCA_PEERS_CACHE:=/var/cache/meshca-peers}"
export MESHCA_PEERS_CACHE

peers_log() { printf '[peers] %s\n' "$*" >&2; }
peers_die() { printf '[peers] ERROR: %s\n' "$*" >&2; exit 1; }

peers_need_root() {
    [ "$(id -u)" -eq 0 ] || peers_die "must run as root (installs Debian packages)"
}

# peers_lock NAME: takes an exclusive lock held until the calling shell exits.
# A second caller waits (up to MESHCA_PEERS_LOCK_TIMEOUT seconds, default 1 h) and then
# finds the finished result in the cache.
peers_lock() {
    local name=$1 fd
    mkdir -p "$MESHCA_PEERS_CACHE"
    exec {fd}>"$MESHCA_PEERS_CACHE/.$name.lock"
    if ! flock -n "$fd"; then
        peers_log "another invocation holds the $name lock; waiting for it"
        flock -w "${MESHCA_PEERS_LOCK_TIMEOUT:-3600}" "$fd" || peers_die "timed out waiting for the $name lock"
    fi
}

# apt-get update at most once per invocation tree (PEERS_APT_UPDATED is exported to children).
peers_apt_update() {
    [ -z "${PEERS_APT_UPDATED:-}" ] || return 0
    peers_log "apt-get update"
    mkdir -p "$MESHCA_PEERS_CACHE"
    DEBIAN_FRONTEND=noninteractive apt-get update -o DPkg::Lock::Timeout=600 >>"$MESHCA_PEERS_CACHE/apt.log" 2>&1 ||
        { tail -n 20 "$MESHCA_PEERS_CACHE/apt.log" >&2; peers_die "apt-get update failed"; }
    PEERS_APT_UPDATED=1; export PEERS_APT_UPDATED
}

# peers_apt_install PKG...: installs only what is missing.
peers_apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    peers_apt_update
    peers_log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=600 \
        "${missing[@]}" >>"$MESHCA_PEERS_CACHE/apt.log" 2>&1 ||
        { tail -n 20 "$MESHCA_PEERS_CACHE/apt.log" >&2; peers_die "apt-get install ${missing[*]} failed"; }
}

# peers_wait_http URL TIMEOUT_S [curl args...]: polls until URL answers 2xx.
peers_wait_http() {
    local url=$1 timeout=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.5
    done
}

# peers_port_free PORT: true when nothing listens on 127.0.0.1:PORT.
peers_port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# peers_kill_pid PID: TERM, then KILL after 10 s if the process is still alive.
peers_kill_pid() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}

# peers_env_get FILE KEY: reads KEY=VALUE from an env file without sourcing it.
peers_env_get() {
    sed -n "s/^$2=//p" "$1" 2>/dev/null | tail -n1 | sed -e "s/^'//" -e "s/'\$//"
}
