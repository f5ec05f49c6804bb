#!/usr/bin/env bash
# Soak (docs/benchmarks.md, "Soak"): `meshca up` with 10 clusters, 10 s leaves and 60 s
# intermediates for 30 minutes — every workload renews its leaf every ~5 s and every cluster its
# intermediate every ~48 s, while sample workloads keep making mutual-TLS calls across clusters.
# Samples the process's RSS and open file descriptors every second (from /proc), and at the end
# prints the handshakes ok/failed, the rotations, and how far RSS and fds moved after warm-up
# (the first 5 minutes) as a share of their post-warm-up mean. Open descriptors are reported three
# ways, because the sample workloads open a connection per call (4 calls a second per workload), so
# a single sample also counts the sockets of calls in flight at that instant: every sample, the
# floor of each minute (what the process holds between calls — a leak raises it), and the
# descriptors that are not sockets (files, the store, pipes).
#
# Usage: scripts/soak-up.sh [--minutes 30] [--clusters 10] [--warmup-minutes 5]
# Environment: BENCH_NO_BUILD=1 (use target/release/meshca), BENCH_DATA_PARENT, BENCH_KEEP_DATA=1
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
log() { printf '[soak-up] %s\n' "$*" >&2; }
minutes=30 clusters=10 warmup=5
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) minutes=$2; shift 2 ;;
        --clusters) clusters=$2; shift 2 ;;
        --warmup-minutes) warmup=$2; shift 2 ;;
        *) echo "usage: scripts/soak-up.sh [--minutes N] [--clusters N] [--warmup-minutes N]" >&2; exit 2 ;;
    esac
done
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    cargo build --release -p meshca --bin meshca
fi
meshca=$target/release/meshca
data=$(mktemp -d "${BENCH_DATA_PARENT:-${TMPDIR:-/tmp}}/meshca-soak.XXXXXX")
up_pid=
cleanup() {
    [ -n "$up_pid" ] && kill -INT "$up_pid" 2>/dev/null || true
    if [ -n "${BENCH_KEEP_DATA:-}" ]; then log "kept $data"; else rm -rf "$data"; fi
}
trap cleanup EXIT

log "machine: $(nproc) cores; $(uptime)"
"$meshca" up --clusters "$clusters" --dir "$data/up" --leaf-ttl 10s --intermediate-ttl 60s \
    --duration "${minutes}m" >"$data/up.out" 2>&1 &
up_pid=$!
samples=$data/samples.tsv
printf 'second\trss_kb\tfds\tnon_socket_fds\n' >"$samples"
start=$(date +%s)
while kill -0 "$up_pid" 2>/dev/null; do
    now=$(( $(date +%s) - start ))
    rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$up_pid/status" 2>/dev/null || true)
    links=$(find "/proc/$up_pid/fd" -mindepth 1 -printf '%l\n' 2>/dev/null || true)
    fds=$(printf '%s' "$links" | grep -c . || true)
    files=$(printf '%s' "$links" | grep -vc '^socket:' || true)
    [ -n "$rss" ] && printf '%s\t%s\t%s\t%s\n' "$now" "$rss" "$fds" "$files" >>"$samples"
    sleep 1
done
status=0
wait "$up_pid" || status=$?
up_pid=
tail -n "$((clusters + 2))" "$data/up.out"
python3 - "$samples" "$((warmup * 60))" "$data/up/summary.json" "$((minutes * 60))" <<'EOF'
import json, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n")[1:] if l]
rows = [tuple(int(x) for x in r) for r in rows]
# From the end of warm-up to the end of the run: samples taken while `up` shuts down (its
# descriptors closing, its memory freed) are not the steady state.
after = [r for r in rows if int(sys.argv[2]) <= r[0] < int(sys.argv[4]) and r[2] > 0]
if not after:
    sys.exit("no samples after warm-up")
def spread(i, name, unit, vals=None):
    vals = vals or [r[i] for r in after]
    mean = sum(vals) / len(vals)
    lo, hi = min(vals), max(vals)
    print(f"{name}: after warm-up min {lo} {unit}, max {hi} {unit}, mean {mean:.0f} {unit}; "
          f"range {100 * (lo - mean) / mean:+.1f} % .. {100 * (hi - mean) / mean:+.1f} % of the mean "
          f"({len(vals)} samples; first {vals[0]}, last {vals[-1]})")
spread(1, "RSS", "kB")
spread(2, "open fds, every sample", "")
floors = {}
for r in after:
    m = r[0] // 60
    floors[m] = min(floors.get(m, r[2]), r[2])
spread(2, "open fds, floor of each minute", "", [floors[m] for m in sorted(floors)])
spread(3, "open fds that are not sockets", "")
s = json.load(open(sys.argv[3]))
print(f"handshakes ok {s['handshakes_ok']}, failed {s['handshakes_failed']}; ran {s['running_seconds']} s")
for c in s["clusters"]:
    print(f"  {c['name']}: {c['intermediate_rotations']} intermediate rotations, {c['leaves_issued']} leaves issued")
EOF
echo "samples: $samples"
exit "$status"
