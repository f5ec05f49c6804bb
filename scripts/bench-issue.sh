#!/usr/bin/env bash
# IssueIntermediate vs Vault (docs/benchmarks.md, "IssueIntermediate vs Vault"): cluster
# intermediates per second from one `meshca server` and from a real Vault's
# `pki/root/sign-intermediate`, for the same P-256 CSRs, in the same run.
#
# Both keep their state durably on the same disk: meshca its default store (`<data>/store.db`,
# SQLite, fsync before each answer, shared by concurrent issuances); Vault its integrated storage
# (raft, the storage HashiCorp recommends; one node, init + unseal), with an EC P-256 root at
# `pki`. The management plane runs with its per-cluster issuance rate limit lifted (the limit is a
# policy, not a cost). `issue-load` (crates/bench) registers the clusters, makes the CSRs and loads
# both, alternating which goes first each round; it prints each rate, p50/p99, CPU per issuance
# and the ratio.
#
# Usage: scripts/bench-issue.sh [issue-load options]      e.g. --csrs 2000 --concurrency 64 --rounds 3
# Environment:
#   MESHCA_VAULT_BIN    the Vault binary (default: the peers cache, scripts/peers/vault.sh)
#   BENCH_NO_BUILD=1    use the binaries already built
#   BENCH_DATA_PARENT   where the data directories go (default: $TMPDIR or /tmp)
#   BENCH_KEEP_DATA=1   keep them afterwards
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
log() { printf '[bench-issue] %s\n' "$*" >&2; }
export MESHCA_PEERS_CACHE="${MESHCA_PEERS_CACHE:-/var/cache/meshca-peers}"

if [ -z "${BENCH_NO_BUILD:-}" ]; then
    log "building meshca and issue-load (release) in $target"
    cargo build --release -p meshca -p meshca-bench --bin meshca --bin issue-load
fi
meshca=$target/release/meshca
load=$target/release/issue-load
vault=${MESHCA_VAULT_BIN:-$(bash scripts/peers/vault.sh path)}
for b in "$meshca" "$load" "$vault"; do
    [ -x "$b" ] || { log "missing $b"; exit 1; }
done

data=$(mktemp -d "${BENCH_DATA_PARENT:-${TMPDIR:-/tmp}}/meshca-bench-issue.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    if [ -n "${BENCH_KEEP_DATA:-}" ]; then log "kept $data"; else rm -rf "$data"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

log "machine: $(nproc) cores; $(uptime)"
log "data: $data ($(df -T "$data" | awk 'NR == 2 { print $2 }'))"

# ---- Vault: raft storage, init, unseal, an EC P-256 root at pki ----
vport=$(free_port)
vaddr=http://127.0.0.1:$vport
mkdir -p "$data/vault/raft"
cat >"$data/vault/vault.hcl" <<EOF
storage "raft" {
  path    = "$data/vault/raft"
  node_id = "bench"
}
listener "tcp" {
  address     = "127.0.0.1:$vport"
  tls_disable = true
}
api_addr      = "$vaddr"
cluster_addr  = "http://127.0.0.1:$((vport + 1))"
disable_mlock = true
ui            = false
EOF
HOME=$data/vault "$vault" server -config="$data/vault/vault.hcl" >"$data/vault/vault.log" 2>&1 &
vault_pid=$!
pids+=("$vault_pid")
for _ in $(seq 150); do curl -s -o /dev/null "$vaddr/v1/sys/health" && break; sleep 0.2; done
init=$(curl -sS -X PUT "$vaddr/v1/sys/init" -d '{"secret_shares":1,"secret_threshold":1}')
vtoken=$(json '["root_token"]' <<<"$init")
unseal=$(json '["keys_base64"][0]' <<<"$init")
curl -sS -o /dev/null -X PUT "$vaddr/v1/sys/unseal" -d "{\"key\":\"$unseal\"}"
for _ in $(seq 150); do [ "$(curl -s -o /dev/null -w '%{http_code}' "$vaddr/v1/sys/health")" = 200 ] && break; sleep 0.2; done
vapi() { curl -sS --fail-with-body -H "X-Vault-Token: $vtoken" -X "$1" "$vaddr/v1/$2" ${3:+-d "$3"}; }
vapi POST sys/mounts/pki '{"type":"pki"}' >/dev/null
vapi POST sys/mounts/pki/tune '{"max_lease_ttl":"87600h"}' >/dev/null
vapi POST pki/root/generate/internal '{"common_name":"bench root","key_type":"ec","key_bits":256,"ttl":"87600h"}' >/dev/null
printf '%s' "$vtoken" >"$data/vault/token"
log "vault $("$vault" version | head -n1) pid $vault_pid on $vaddr (raft storage, EC P-256 root)"

# ---- meshca: the default store, the rate limits lifted ----
# (The per-cluster issuance limit and the per-address budget of calls without a client certificate
# are policies, not costs; every simulated cluster here shares 127.0.0.1.)
"$meshca" server --data-dir "$data/meshca" --listen 127.0.0.1:0 --issue-burst 1000000 --issue-per-minute 1e9 \
    --peer-requests-per-second 0 \
    2>"$data/meshca-server.log" &
server_pid=$!
pids+=("$server_pid")
for _ in $(seq 300); do [ -s "$data/meshca/operator/server" ] && break; sleep 0.1; done
[ -s "$data/meshca/operator/server" ] || { log "meshca server did not start"; cat "$data/meshca-server.log" >&2; exit 1; }
addr=$(cat "$data/meshca/operator/server")
log "meshca server pid $server_pid on $addr"

"$load" --server "$addr" --credentials "$data/meshca/operator" --server-pid "$server_pid" \
    --vault-addr "$vaddr" --vault-token-file "$data/vault/token" --vault-pid "$vault_pid" "$@"
echo "meshca server: peak RSS $(awk '/^VmHWM/ { print $2, $3 }' "/proc/$server_pid/status"); vault: peak RSS $(awk '/^VmHWM/ { print $2, $3 }' "/proc/$vault_pid/status")"
