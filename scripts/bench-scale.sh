#!/usr/bin/env bash
# Scale (docs/benchmarks.md, "10,000 clusters"): N clusters registered and issued with C agents in
# flight against one `meshca server` on its default store, once with the data directory on this
# machine's disk and once on tmpfs (/dev/shm), alternating, ROUNDS times — so the cost of
# durability is a ratio from the same run. Each run is scripts/bench-register.sh; this prints
# each run's rate, the server's peak RSS and, per round, disk / tmpfs.
#
# Usage: scripts/bench-scale.sh [--clusters 10000] [--concurrency 64] [--rounds 2]
# Environment: DISK_PARENT (default /var/tmp: a disk, unlike /tmp on some machines), BENCH_NO_BUILD,
#              BENCH_STORE (sqlite or dir, passed on)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
clusters=10000 concurrency=64 rounds=2
while [ $# -gt 0 ]; do
    case "$1" in
        --clusters) clusters=$2; shift 2 ;;
        --concurrency) concurrency=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        *) echo "usage: scripts/bench-scale.sh [--clusters N] [--concurrency C] [--rounds R]" >&2; exit 2 ;;
    esac
done
disk=${DISK_PARENT:-/var/tmp}
[ "$(stat -f -c %T "$disk")" != tmpfs ] || { echo "$disk is tmpfs; set DISK_PARENT to a disk" >&2; exit 1; }
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    cargo build --release -p meshca -p meshca-bench --bin meshca --bin register-load
fi
export BENCH_NO_BUILD=1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rate() { sed -n 's/^phase 2: .* = \([0-9.]*\) clusters\/s.*/\1/p' "$1"; }
for r in $(seq "$rounds"); do
    for where in disk tmpfs; do
        parent=$disk; [ "$where" = tmpfs ] && parent=/dev/shm
        echo "== round $r, $where ($parent)"
        BENCH_DATA_PARENT=$parent bash scripts/bench-register.sh --clusters "$clusters" --concurrency "$concurrency" \
            | tee "$out/$r-$where"
    done
    d=$(rate "$out/$r-disk") t=$(rate "$out/$r-tmpfs")
    python3 -c "import sys; d, t = float(sys.argv[1]), float(sys.argv[2]); n = int(sys.argv[3]); print(f'round {sys.argv[4]}: disk {d:.0f}/s ({n / d:.1f} s for {n}), tmpfs {t:.0f}/s ({n / t:.1f} s); disk / tmpfs = {d / t:.2f}')" "$d" "$t" "$clusters" "$r"
done
