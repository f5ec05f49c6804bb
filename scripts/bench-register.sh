#!/usr/bin/env bash
# Registration benchmark (docs/architecture.md "Data flows", docs/benchmarks.md): N simulated clusters register with
# one `meshca server` and issue their intermediates. Builds `meshca` and `register-load` in release
# mode, starts `meshca server` on a free 127.0.0.1 port with a temporary data directory, runs the
# load generator, prints the server's peak RSS (VmHWM) and CPU time, and stops the server.
#
# Usage: scripts/bench-register.sh [register-load options]     e.g. --clusters 1000 --concurrency 64
#   (see `register-load --help`; --server, --credentials and --server-pid are filled in)
# Environment:
#   CARGO_TARGET_DIR    where cargo builds (default: the workspace's target/)
#   BENCH_NO_BUILD=1    use the binaries already built
#   BENCH_DATA_PARENT   where the server's temporary data directory goes (default: $TMPDIR or /tmp);
#                       e.g. /dev/shm to take the disk's fsyncs out of the picture
#   BENCH_STORE         the server's --store: sqlite (its default) or dir
#   BENCH_KEEP_DATA=1   keep the data directory (and the server log) afterwards
#   RUST_LOG            the server's log filter (its log goes to <data dir>/server.log)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
log() { printf '[bench-register] %s\n' "$*" >&2; }

# A non-default intermediate key algorithm needs a policy that allows it.
key_alg=ecdsa-p256
prev=
for a in "$@"; do
    case "$a" in --key-algorithm=*) key_alg=${a#*=} ;; esac
    [ "$prev" = --key-algorithm ] && key_alg=$a
    prev=$a
done

if [ -z "${BENCH_NO_BUILD:-}" ]; then
    log "building meshca and register-load (release) in $target"
    cargo build --release -p meshca -p meshca-bench --bin meshca --bin register-load
fi
meshca=$target/release/meshca
load=$target/release/register-load
for b in "$meshca" "$load"; do
    [ -x "$b" ] || { log "missing $b (build it, or unset BENCH_NO_BUILD)"; exit 1; }
done

data=$(mktemp -d "${BENCH_DATA_PARENT:-${TMPDIR:-/tmp}}/meshca-bench.XXXXXX")
server_pid=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -INT "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    if [ -n "${BENCH_KEEP_DATA:-}" ]; then log "kept $data"; else rm -rf "$data"; fi
}
trap cleanup EXIT

policy_args=()
if [ "$key_alg" != ecdsa-p256 ]; then
    cat >"$data/policy.yaml" <<EOF
apiVersion: meshca.io/v1alpha1
kind: RootTrustPolicy
metadata: { name: mesh }
spec:
  config:
    generated: {}
  intermediateCertOptions: { keyAlgorithm: $key_alg }
EOF
    policy_args=(--policy "$data/policy.yaml")
fi

log "machine: $(nproc) cores; $(uptime)"
log "data directory: $data ($(df -T "$data" | awk 'NR == 2 { print $2 }'))"
# Port 0: the server binds a free port and records it in operator/server.
# The per-address budget of registrations is lifted: every simulated cluster shares 127.0.0.1.
"$meshca" server --data-dir "$data" --listen 127.0.0.1:0 --store "${BENCH_STORE:-sqlite}" "${policy_args[@]}" \
    --peer-requests-per-second 0 \
    2>"$data/server.log" &
server_pid=$!
for _ in $(seq 300); do
    [ -s "$data/operator/server" ] && break
    kill -0 "$server_pid" 2>/dev/null || { log "the server exited:"; cat "$data/server.log" >&2; exit 1; }
    sleep 0.1
done
[ -s "$data/operator/server" ] || { log "the server did not start in 30 s"; cat "$data/server.log" >&2; exit 1; }
addr=$(cat "$data/operator/server")
log "meshca server pid $server_pid on $addr; idle RSS $(awk '/^VmRSS/ { print $2, $3 }' "/proc/$server_pid/status")"

status=0
"$load" --server "$addr" --credentials "$data/operator" --server-pid "$server_pid" "$@" || status=$?

hwm=$(awk '/^VmHWM/ { print $2, $3 }' "/proc/$server_pid/status")
rss=$(awk '/^VmRSS/ { print $2, $3 }' "/proc/$server_pid/status")
cpu=$(awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f s", ($12 + $13) / hz }' "/proc/$server_pid/stat")
echo "server: peak RSS (VmHWM) $hwm, RSS now $rss, CPU since start $cpu"
if [ -d "$data/store" ]; then
    echo "server: store $(du -sh "$data/store" | cut -f1) in $(find "$data/store" | wc -l) entries"
else
    echo "server: store $(du -ch "$data"/store.db* | tail -n1 | cut -f1) (store.db, -wal, -shm)"
fi
exit "$status"
