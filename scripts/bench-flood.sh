#!/usr/bin/env bash
# Anonymous-flood benchmark (docs/benchmarks.md, issue 19): the rate real workloads keep getting
# certificates at from `meshca workload-ca` while one address floods it with requests carrying no
# token or a token with a corrupted signature.
#
# It makes a one-cluster `meshca up` topology (for a real intermediate, its demo issuer's JWKS and
# tokens), stops it, starts `meshca workload-ca` on it with its DEFAULT limits (plus
# $BENCH_WCA_FLAGS), and runs ca-flood (crates/bench/src/bin/ca-flood.rs): N real workloads, each
# from its own 127.0.1.x address with its own service-account token at a paced rate, first alone,
# then beside M flooding connections from 127.0.0.2. It prints both phases (certificates/s,
# latency, server CPU) and what the flood got back.
#
# On a machine with 2+ cores the CA is pinned to CPU 0 and the load generator to CPU 1 (taskset);
# BENCH_NO_PIN=1 turns that off.
#
# Usage: scripts/bench-flood.sh [ca-flood options]   e.g. --workloads 32 --per-workload-rate 2
# Environment:
#   CARGO_TARGET_DIR   where cargo builds (default: the workspace's target/)
#   BENCH_NO_BUILD=1   use the binaries already built
#   BENCH_MESHCA=PATH  the meshca binary to put under load (e.g. an older build, to compare)
#   BENCH_WCA_FLAGS    extra flags for `meshca workload-ca` (e.g. "--peer-requests-per-second 0")
#   BENCH_KEEP_DATA=1  keep the temporary folder (logs, cacerts) afterwards
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
log() { printf '[bench-flood] %s\n' "$*" >&2; }

if [ -z "${BENCH_NO_BUILD:-}" ]; then
    log "building meshca and ca-flood (release) in $target"
    cargo build --release -p meshca -p meshca-bench --bin meshca --bin ca-flood
fi
meshca=$target/release/meshca
load=$target/release/ca-flood
under_test=${BENCH_MESHCA:-$meshca}
for b in "$meshca" "$load" "$under_test"; do
    [ -x "$b" ] || { log "missing $b (build it, or unset BENCH_NO_BUILD)"; exit 1; }
done

server_on=() load_on=()
if [ -z "${BENCH_NO_PIN:-}" ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    server_on=(taskset -c 0) load_on=(taskset -c 1)
    log "pinning: CA on CPU 0, load generator on CPU 1"
fi

data=$(mktemp -d "${TMPDIR:-/tmp}/meshca-bench-flood.XXXXXX")
server_pid=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    if [ -n "${BENCH_KEEP_DATA:-}" ]; then log "kept $data"; else rm -rf "$data"; fi
}
trap cleanup EXIT

log "making a one-cluster topology in $data/up"
"$meshca" up --clusters 1 --dir "$data/up" --duration 5s >"$data/up.log" 2>&1
read -r cacerts issuer < <(python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))["clusters"][0]
print(c["cacerts_dir"], c["jwt_issuer"])' "$data/up/topology.json")
cp -r "$cacerts" "$data/cacerts"
jwks=$(find "$data/up" -name jwks.json -path '*cluster-1*' | head -n1)
[ -n "$jwks" ] || { log "no jwks.json under $data/up"; exit 1; }
tokens=()
for i in $(seq 0 63); do
    "$meshca" token --dir "$data/up" --cluster cluster-1 --service-account "workload-$i" --ttl 2h >"$data/token-$i"
    tokens+=("$data/token-$i")
done

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# shellcheck disable=SC2086
RUST_LOG=warn "${server_on[@]}" "$under_test" workload-ca --cacerts "$data/cacerts" --listen "127.0.0.1:$port" \
    --jwt-issuer "$issuer" --jwks "$jwks" ${BENCH_WCA_FLAGS:-} >"$data/workload-ca.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { log "the workload CA exited; see $data/workload-ca.log"; exit 1; }
    sleep 0.1
done
echo "== $under_test workload-ca ${BENCH_WCA_FLAGS:-(default limits)}"
"${load_on[@]}" "$load" --address "127.0.0.1:$port" --ca-file "$data/cacerts/root-cert.pem" \
    --server-pid "$server_pid" --token-files "${tokens[@]}" "$@"
