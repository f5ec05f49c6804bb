#!/usr/bin/env bash
# Writes a seed corpus for the fuzz targets: CSRs made by OpenSSL and a cacerts bundle made by
# `meshca demo` (its throwaway keys stay out of git: corpus/ is ignored).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$here/corpus/csr" "$here/corpus/pem"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
for c in P-256 P-384; do
  openssl req -new -newkey ec -pkeyopt "ec_paramgen_curve:$c" -nodes -keyout /dev/null -subj /CN=x \
    -out "$here/corpus/csr/$c.pem" 2>/dev/null
done
openssl req -new -newkey rsa:2048 -nodes -keyout /dev/null -subj /CN=x -outform DER -out "$here/corpus/csr/rsa.der" 2>/dev/null
(cd "$here/.." && cargo run -q -p meshca -- demo --dir "$tmp/demo" >/dev/null)
d="$tmp/demo/cluster-1/cacerts"
cp "$d"/*.pem "$here/corpus/pem/"
{ cat "$d/ca-cert.pem"; printf '\0'; cat "$d/ca-key.pem"; printf '\0'; cat "$d/cert-chain.pem"; printf '\0'; cat "$d/root-cert.pem"; } \
  > "$here/corpus/pem/bundle.bin"
echo "seeded $here/corpus"
