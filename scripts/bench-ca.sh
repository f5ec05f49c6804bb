#!/usr/bin/env bash
# Workload CA benchmark (docs/benchmarks.md): CreateCertificate throughput of `meshca workload-ca`
# against `cfssl serve` signing the same P-256 CSRs with the same cluster intermediate, plus the
# raw aws-lc-rs P-256 sign/verify rates measured by the load generator in the same run.
#
# It makes a one-cluster `meshca up` topology (for a real intermediate, its demo issuer's key and
# JWKS), stops it, then runs in turn, each on its own 127.0.0.1 port, every caller with a token
# of its own (service account bench/caller-<i>):
#   1. meshca workload-ca with its default settings: tokens verified (signature, iss, aud, exp)
#      and trusted for --token-cache-ttl (10 s), so a revoked token is refused within 10 s
#   2. meshca workload-ca --token-cache-ttl 0s: every request's token verified
#   3. cfssl serve (Debian's golang-cfssl; no caller authentication at all)
#   4. ca-floor: the workload CA's transport (the same gRPC server, TLS and serving certificate)
#      answering one fixed chain without authenticating, verifying or signing — what a call
#      costs before any CA work, so what bounds any CA that speaks Istio's gRPC API here
# and prints ca-load's report for each (requests/s, latency, server CPU per request), then
#   5. the herd: HERD (default 10000, 0 to skip) distinct workloads, each with its own token, CSR
#      and connection, asking once within HERD_SECONDS (default 30) of one workload CA with its
#      default settings (not pinned): how many were served, latency, the CA's peak RSS.
#
# On a machine with 2+ cores the CA is pinned to CPU 0 and the load generator to CPU 1
# (taskset), so the CA under test gets exactly one core — the crypto bound ca-load prints is
# then the one-core bound — and the load generator does not steal its CPU. BENCH_NO_PIN=1 turns
# that off.
#
# Usage: scripts/bench-ca.sh [ca-load options]      e.g. --concurrency 64 --seconds 20
# Environment:
#   CARGO_TARGET_DIR    where cargo builds (default: the workspace's target/)
#   BENCH_NO_BUILD=1    use the binaries already built
#   BENCH_KEEP_DATA=1   keep the temporary folder (logs, cacerts) afterwards
#   HERD, HERD_SECONDS  the herd (step 5)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
log() { printf '[bench-ca] %s\n' "$*" >&2; }

if [ -z "${BENCH_NO_BUILD:-}" ]; then
    log "building meshca, ca-load and ca-floor (release) in $target"
    cargo build --release -p meshca -p meshca-bench --bin meshca --bin ca-load --bin ca-floor
fi
meshca=$target/release/meshca
load=$target/release/ca-load
floor=$target/release/ca-floor
for b in "$meshca" "$load" "$floor"; do
    [ -x "$b" ] || { log "missing $b (build it, or unset BENCH_NO_BUILD)"; exit 1; }
done
cfssl=$(bash scripts/peers/cfssl.sh path 2>/dev/null || bash scripts/peers/cfssl.sh install | tail -n1)

server_on=() load_on=()
if [ -z "${BENCH_NO_PIN:-}" ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    server_on=(taskset -c 0) load_on=(taskset -c 1)
    log "pinning: CA on CPU 0, load generator on CPU 1"
fi

data=$(mktemp -d "${TMPDIR:-/tmp}/meshca-bench-ca.XXXXXX")
server_pid=
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -INT "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    server_pid=
}
cleanup() {
    stop_server
    bash scripts/peers/cfssl.sh stop "$data/cfssl" >/dev/null 2>&1 || true
    if [ -n "${BENCH_KEEP_DATA:-}" ]; then log "kept $data"; else rm -rf "$data"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    local port=$1 pid=$2
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { log "server exited; see its log in $data"; exit 1; }
        sleep 0.1
    done
    log "port $port never opened"; exit 1
}

log "making a one-cluster topology in $data/up"
"$meshca" up --clusters 1 --dir "$data/up" --duration 5s >"$data/up.log" 2>&1
read -r cacerts issuer < <(python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))["clusters"][0]
print(c["cacerts_dir"], c["jwt_issuer"])' "$data/up/topology.json")
cp -r "$cacerts" "$data/cacerts"
jwks=$(find "$data/up" -name jwks.json -path '*cluster-1*' | head -n1)
[ -n "$jwks" ] || { log "no jwks.json under $data/up"; exit 1; }
idp_key=$data/up/idp/key.pem
[ -s "$idp_key" ] || { log "no demo issuer key at $idp_key"; exit 1; }

# load_grpc NAME TITLE COMMAND...: starts COMMAND (a gRPC CA, pinned; `PORT` in its arguments
# becomes a free port), loads it with ca-load as a meshca target, stops it.
load_grpc() {
    local name=$1 title=$2; shift 2
    local port; port=$(free_port)
    RUST_LOG=warn "${server_on[@]}" "${@//PORT/$port}" >"$data/$name.log" 2>&1 &
    server_pid=$!
    wait_port "$port" "$server_pid"
    echo "== $title"
    "${load_on[@]}" "$load" --target meshca --address "127.0.0.1:$port" --ca-file "$data/cacerts/root-cert.pem" \
        --idp-key "$idp_key" --jwt-issuer "$issuer" --server-pid "$server_pid" "${load_args[@]}"
    stop_server
}

run_meshca() {
    local name=$1; shift
    load_grpc "$name" "meshca workload-ca $*" "$meshca" workload-ca --cacerts "$data/cacerts" \
        --listen "127.0.0.1:PORT" --jwt-issuer "$issuer" --jwks "$jwks" "$@"
}

load_args=("$@")
# The request limits (issue 19) are lifted for the throughput runs: they are a policy for callers
# each on an address and identity of their own, not a cost, and here 64 callers share 127.0.0.1 and
# would be held to one address's 20 requests a second. Tokens are verified as by default.
no_limits=(--peer-requests-per-second 0 --identity-requests-per-second 0)
run_meshca default "${no_limits[@]}"
run_meshca verify-every-request --token-cache-ttl 0s "${no_limits[@]}"

port=$(free_port)
"${server_on[@]}" bash scripts/peers/cfssl.sh start "$data/cfssl" "$port" "$data/cacerts/ca-cert.pem" "$data/cacerts/ca-key.pem" >/dev/null
cfssl_pid=$(sed -n 's/^CFSSL_PID=//p' "$data/cfssl/env")
echo "== cfssl serve ($cfssl, $(dpkg-query -W -f '${Version}' golang-cfssl 2>/dev/null || echo unknown))"
"${load_on[@]}" "$load" --target cfssl --address "127.0.0.1:$port" --server-pid "$cfssl_pid" "${load_args[@]}"

load_grpc floor "transport floor (ca-floor: the workload CA's gRPC server and TLS, a fixed answer, no CA work)" \
    "$floor" --cacerts "$data/cacerts" --listen "127.0.0.1:PORT"

herd=${HERD:-10000}
if [ "$herd" -gt 0 ]; then
    # One connection per workload, all in one load-generator process.
    ulimit -n "$(( herd * 2 + 1024 ))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    port=$(free_port)
    # Default settings but the per-address budget: a herd's workloads are pods with addresses of
    # their own; here they all come from 127.0.0.1. Identity budgets and the admission queue stay.
    RUST_LOG=warn "$meshca" workload-ca --cacerts "$data/cacerts" --listen "127.0.0.1:$port" \
        --jwt-issuer "$issuer" --jwks "$jwks" --peer-requests-per-second 0 >"$data/herd.log" 2>&1 &
    server_pid=$!
    wait_port "$port" "$server_pid"
    echo "== herd: $herd workloads within ${HERD_SECONDS:-30} s, meshca workload-ca (default settings, per-address budget lifted)"
    "$load" --target meshca --address "127.0.0.1:$port" --ca-file "$data/cacerts/root-cert.pem" \
        --idp-key "$idp_key" --jwt-issuer "$issuer" --server-pid "$server_pid" \
        --herd "$herd" --herd-seconds "${HERD_SECONDS:-30}"
    stop_server
fi
