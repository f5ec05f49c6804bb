#!/usr/bin/env bash
# Revocation benchmark (docs/benchmarks.md): how long `meshca revoke` takes to reach every cluster
# of `meshca up` with N clusters and sample traffic — (a) until every cluster's cacerts holds a
# ca-crl.pem naming the revoked serial (and until the revoked cluster holds a new intermediate),
# and (b) until no sample workload still uses a leaf under the revoked intermediate.
#
# Starts `meshca up --clusters N`, waits until every cluster has a ca-crl.pem, revokes cluster-2's
# intermediate with `meshca revoke`, and polls (every 5 ms) every cluster's ca-crl.pem for the
# serial's bytes in a CRL, cluster-2's ca-cert.pem for a new certificate, and every sample
# workload's cert-chain.pem (topology.json; rewritten right after the workload swaps its leaf) for
# an issuer other than the revoked intermediate. Prints the CLI's round trip, when the first and
# the last cluster had the CRL, when cluster-2 had its new intermediate, and when the last
# workload had left the revoked intermediate, all from the moment the CLI was started, and (b)
# against the revocation grace; then stops `up` and checks that no handshake of the sample
# workloads failed.
#
# Usage: scripts/bench-revoke.sh [--clusters N]
# Environment:
#   MESHCA_BIN         the meshca binary to use (default: build target/release/meshca)
#   BENCH_KEEP_DATA=1  keep the `meshca up` folder afterwards
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { printf '[bench-revoke] %s\n' "$*" >&2; }
clusters=3
while [ $# -gt 0 ]; do
    case "$1" in
        --clusters) clusters=$2; shift 2 ;;
        *) echo "usage: $0 [--clusters N]" >&2; exit 2 ;;
    esac
done
[ "$clusters" -ge 2 ] || { log "--clusters must be at least 2 (cluster-2 is revoked)"; exit 2; }

meshca=${MESHCA_BIN:-}
if [ -z "$meshca" ]; then
    log "building meshca (release)"
    cargo build --release -p meshca --bin meshca
    meshca=${CARGO_TARGET_DIR:-$root/target}/release/meshca
fi
[ -x "$meshca" ] || { log "missing $meshca"; exit 1; }

. scripts/lib/bench-up.sh

bench_up revoke "$meshca" --clusters "$clusters" --intermediate-ttl 1h --call-interval 500ms

python3 - "$meshca" "$dir/up" <<'EOF'
import base64, json, os, re, subprocess, sys, time

meshca, up = sys.argv[1], sys.argv[2]
topology = json.load(open(os.path.join(up, "topology.json")))
dirs = {c["name"]: c["cacerts_dir"] for c in topology["clusters"]}
chains = {w["id"]: w["cert_chain"] for c in topology["clusters"] for w in c["workloads"]}
creds = os.path.join(up, "mgmt", "operator")

def blocks(path, label):
    try:
        text = open(path).read()
    except OSError:
        return []
    pat = "-----BEGIN %s-----(.*?)-----END %s-----" % (label, label)
    return [base64.b64decode("".join(b.split())) for b in re.findall(pat, text, re.S)]

deadline = time.time() + 120
while not all(len(blocks(os.path.join(d, "ca-crl.pem"), "X509 CRL")) >= 2 for d in dirs.values()):
    if time.time() > deadline:
        sys.exit("not every cluster has a ca-crl.pem after 120 s")
    time.sleep(0.1)
time.sleep(2)  # let the sample traffic settle

c2 = os.path.join(dirs["cluster-2"], "ca-cert.pem")
old_cert = open(c2).read()
old_der = blocks(c2, "CERTIFICATE")[0]

def under_revoked(chain_file):
    chain = blocks(chain_file, "CERTIFICATE")
    return len(chain) < 2 or chain[1] == old_der

before = sorted(w for w, f in chains.items() if under_revoked(f))
if not before:
    sys.exit("no workload holds a leaf under cluster-2's intermediate before the revocation")
serial_hex = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", c2],
                            capture_output=True, text=True, check=True).stdout.strip().split("=")[1]
serial = bytes.fromhex(serial_hex)

t0 = time.monotonic()
cli = subprocess.Popen([meshca, "revoke", "--cluster", "cluster-2", "--credentials", creds],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
seen, new_int, cli_done, left = {}, None, None, {}
while len(seen) < len(dirs) or new_int is None or len(left) < len(before):
    now = time.monotonic() - t0
    if cli_done is None and cli.poll() is not None:
        cli_done = now
        if cli.returncode != 0:
            sys.exit("meshca revoke failed: " + cli.stderr.read())
    for name, d in dirs.items():
        if name not in seen and any(serial in b for b in blocks(os.path.join(d, "ca-crl.pem"), "X509 CRL")):
            seen[name] = now
    if new_int is None:
        try:
            if open(c2).read() != old_cert:
                new_int = now
        except OSError:
            pass
    for w in before:
        if w not in left and not under_revoked(chains[w]):
            left[w] = now
    if now > 60:
        sys.exit("after 60 s: CRL in %d of %d clusters, new intermediate: %s, %d of %d workloads renewed"
                 % (len(seen), len(dirs), new_int, len(left), len(before)))
    time.sleep(0.005)
if cli_done is None:
    cli.wait()
    cli_done = time.monotonic() - t0
times = sorted(seen.values())
last_left = max(left.values())
grace = 20.0  # meshca up's default --revocation-grace
print("clusters %d: revoke CLI round trip %.0f ms; (a) CRL naming the serial in the first cluster %.0f ms, "
      "in every cluster %.0f ms (median %.0f ms); cluster-2's new intermediate %.0f ms; "
      "(b) no workload on the revoked intermediate %.0f ms (%d workloads; %.1f %% of the %.0f s grace)"
      % (len(dirs), cli_done * 1000, times[0] * 1000, times[-1] * 1000, times[len(times) // 2] * 1000,
         new_int * 1000, last_left * 1000, len(before), 100 * last_left / grace, grace))
EOF

kill -INT "$up_pid"
for _ in $(seq 150); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.2; done
up_pid=
python3 - "$dir/up/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print("sample traffic: %d handshakes ok, %d failed" % (s["handshakes_ok"], s["handshakes_failed"]))
sys.exit(1 if s["handshakes_failed"] else 0)
EOF
