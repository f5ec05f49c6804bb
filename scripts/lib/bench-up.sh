# Sourced by the benchmarks that run `meshca up` (bench-revoke.sh, bench-rotation.sh): starts it
# in a temporary folder, waits for its topology.json, and stops it (Ctrl-C, then SIGKILL after
# 10 s) and removes the folder on exit unless BENCH_KEEP_DATA is set.
#
#   bench_up NAME MESHCA [meshca up options...]   sets $dir (the temporary folder) and $up_pid
bench_up() {
    local name=$1 meshca=$2; shift 2
    dir=$(mktemp -d "${TMPDIR:-/tmp}/meshca-bench-$name.XXXXXX")
    up_pid=
    trap bench_up_cleanup EXIT
    "$meshca" up --dir "$dir/up" "$@" >"$dir/up.out" 2>&1 &
    up_pid=$!
    for _ in $(seq 600); do
        [ -f "$dir/up/topology.json" ] && return 0
        kill -0 "$up_pid" 2>/dev/null || { cat "$dir/up.out" >&2; exit 1; }
        sleep 0.2
    done
    log "meshca up wrote no topology.json"
    exit 1
}

bench_up_cleanup() {
    if [ -n "${up_pid:-}" ] && kill -0 "$up_pid" 2>/dev/null; then
        kill -INT "$up_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$up_pid" 2>/dev/null || true
    fi
    if [ -n "${BENCH_KEEP_DATA:-}" ]; then log "kept $dir"; else rm -rf "$dir"; fi
}
