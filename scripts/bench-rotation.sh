#!/usr/bin/env bash
# Root rotation benchmark (docs/root-rotation.md, docs/benchmarks.md): how long a whole root rotation
# takes in `meshca up` with N clusters and sample traffic, against its lower bound — the waits the
# protocol cannot skip, half the maximum leaf lifetime plus skew, then the maximum leaf lifetime plus
# skew (1.5 L + 2 × skew). What is left over is what meshca adds: agents re-issuing and reporting at each
# of the four steps, the controller noticing.
#
# Starts `meshca up --clusters N --leaf-ttl L --rotation-skew S`, waits until every cluster serves,
# runs `meshca rotate root`, polls `meshca status -o json` every 0.2 s until the rotation is over,
# reads each phase change from the management plane's journal, checks that no handshake or leaf
# request of the sample workloads failed, and prints one result line per phase and a total.
#
# Usage: scripts/bench-rotation.sh [--clusters N] [--leaf-ttl 30s] [--skew 5s]
# Environment:
#   CARGO_TARGET_DIR   where cargo builds (default: the workspace's target/)
#   MESHCA_BIN         the meshca binary to use (default: build target/release/meshca)
#   BENCH_KEEP_DATA=1  keep the `meshca up` folder afterwards
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { printf '[bench-rotation] %s\n' "$*" >&2; }
clusters=3 leaf=30s skew=5s
while [ $# -gt 0 ]; do
    case "$1" in
        --clusters) clusters=$2; shift 2 ;;
        --leaf-ttl) leaf=$2; shift 2 ;;
        --skew) skew=$2; shift 2 ;;
        *) echo "usage: $0 [--clusters N] [--leaf-ttl 30s] [--skew 5s]" >&2; exit 2 ;;
    esac
done
secs() { # 30s | 2m | 1h -> seconds
    case "$1" in *ms) echo 0 ;; *s) echo "${1%s}" ;; *m) echo $((${1%m} * 60)) ;; *h) echo $((${1%h} * 3600)) ;; *) echo "$1" ;; esac
}
L=$(secs "$leaf") S=$(secs "$skew")

meshca=${MESHCA_BIN:-}
if [ -z "$meshca" ]; then
    target=${CARGO_TARGET_DIR:-$root/target}
    log "building meshca (release) in $target"
    cargo build --release -p meshca --bin meshca
    meshca=$target/release/meshca
fi
[ -x "$meshca" ] || { log "missing $meshca"; exit 1; }

. scripts/lib/bench-up.sh

bench_up rotation "$meshca" --clusters "$clusters" --leaf-ttl "$leaf" --rotation-skew "$skew" \
    --intermediate-ttl 1h --call-interval 1s
creds=$dir/up/mgmt/operator
status() { "$meshca" status -o json --credentials "$creds"; }
# Every cluster reporting Ready under the current generation.
for _ in $(seq 600); do
    status | python3 -c '
import json, sys
st = json.load(sys.stdin)
ok = st["clusters"] and all(c["phase"] == "Ready" and c["policyGeneration"] == st["policyGeneration"] for c in st["clusters"])
sys.exit(0 if ok and len(st["clusters"]) == int(sys.argv[1]) else 1)' "$clusters" && break
    sleep 0.5
done

log "rotating the root of $clusters clusters (leaves $leaf, skew $skew)"
start=$(date +%s.%N)
"$meshca" rotate root --credentials "$creds" >&2
while :; do
    phase=$(status | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootRotation"]["phase"])')
    [ "$phase" = Idle ] && break
    kill -0 "$up_pid" || { log "meshca up died"; exit 1; }
    sleep 0.2
done
end=$(date +%s.%N)
python3 - "$dir/up/mgmt" "$dir/up/status.json" "$start" "$end" "$L" "$S" "$clusters" <<'EOF'
import json, os, sqlite3, sys
mgmt, status, start, end, L, S, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
# The journal, from the management plane's store: SQLite (store.db, the default) or a directory.
db = os.path.join(mgmt, "store.db")
if os.path.exists(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    (raw,) = con.execute("SELECT value FROM object_data WHERE namespace = 'meshca' AND name = 'root-rotation' AND key = 'record.json'").fetchone()
    journal = json.loads(raw)
else:
    journal = json.load(open(os.path.join(mgmt, "store/meshca/root-rotation/record.json")))
h = journal["history"][0]
st = json.load(open(status))
if st["handshakes_failed"] or st["leaves_failed"]:
    sys.exit(f"FAILED: {st['handshakes_failed']} handshakes and {st['leaves_failed']} leaf requests failed")
t = [x["at"] for x in h["transitions"]] + [h["finished_at"]]
names = [x["phase"] for x in h["transitions"]]
waits = {"Distributing": L / 2 + S, "Switching": 0, "Draining": L + S, "Retiring": 0}
total = end - start
bound = 1.5 * L + 2 * S
print(f"clusters {n}, leaf lifetime {L}s, skew {S}s, {st['handshakes_ok']} handshakes ok, 0 failed")
for name, a, b in zip(names, t, t[1:]):
    print(f"  {name:<12} {b - a:5d} s   (protocol wait {waits[name]:5.1f} s)")
print(f"  whole rotation {total:6.1f} s (meshca rotate root -> status Idle); lower bound 1.5 L + 2 skew = {bound:.1f} s; overhead {total - bound:.1f} s ({100 * (total - bound) / bound:.0f} %)")
EOF
