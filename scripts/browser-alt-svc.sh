#!/usr/bin/env bash
# A real browser against examples/hello.rs: the first request goes over TCP, and later ones
# move to HTTP/3 through Alt-Svc, with QUIC not forced for the origin.
#
# Usage: scripts/browser-alt-svc.sh        (needs Debian's chromium; skips itself without it)
# Exit status 0 when a request went over h3 after the page came over TCP; 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
chromium=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$chromium" ]; then
  echo "SKIP: chromium is not installed (apt-get install chromium)"
  exit 0
fi
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
../shared/interop/mkcert.sh "$work/certs" >/dev/null
cargo build --quiet --example hello
port=${PORT:-24480}
unused_port=$((port + 1))
RUST_LOG=warn target/debug/examples/hello --listen "127.0.0.1:$port" \
  --cert "$work/certs/cert.pem" --key "$work/certs/key.pem" 2>"$work/hello.log" &
server=$!
for _ in $(seq 50); do grep -q serving "$work/hello.log" && break; sleep 0.2; done
# Certificates: Chromium accepts the test CA for TCP (the NSS database below, under a
# throwaway $HOME, and the SPKI flag), but refuses QUIC with any certificate outside its
# built-in roots unless the host name is in its "allow unknown roots" list, which only
# --origin-to-force-quic-on fills (net/quic/crypto/proof_verifier_chromium.cc, by host name
# alone). So QUIC is forced on another port of localhost, an origin this test never
# contacts: that lifts the root check for the name, while the origin under test,
# localhost:$port, is not forced and must find HTTP/3 through Alt-Svc.
export HOME="$work/home"
mkdir -p "$HOME/.pki/nssdb"
if command -v certutil >/dev/null; then
  certutil -d "sql:$HOME/.pki/nssdb" -N --empty-password
  certutil -d "sql:$HOME/.pki/nssdb" -A -t "C,," -n tower-quiche-test -i "$work/certs/ca.pem"
else
  echo "note: certutil (libnss3-tools) is missing; Chromium will not trust the test CA for QUIC"
fi
# Chromium resolves localhost to ::1 too; hello listens on 127.0.0.1, so map the name there.
timeout 60 "$chromium" --headless --no-sandbox --disable-gpu --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$work/profile" --enable-quic --host-resolver-rules="MAP localhost 127.0.0.1" \
  --origin-to-force-quic-on="localhost:$unused_port" \
  --ignore-certificate-errors-spki-list="$(cat "$work/certs/spki.txt")" \
  --log-net-log="$work/netlog.json" --virtual-time-budget=15000 \
  --dump-dom "https://localhost:$port/" >"$work/dom.html" 2>"$work/chromium.log" || true
page=$(grep -o '<p id="page">[^<]*' "$work/dom.html" | sed 's/<p id="page">//' || true)
fetches=$(grep -o '<p id="fetch">[^<]*' "$work/dom.html" | sed 's/<p id="fetch">//' || true)
echo "$page"
echo "$fetches"
case "$page" in
  *HTTP/3*) echo "FAIL: the page itself came over HTTP/3, so QUIC was not discovered through Alt-Svc"; exit 1 ;;
  *HTTP/1.1*|*HTTP/2*) ;;
  *) echo "FAIL: the page did not load"; tail -5 "$work/chromium.log"; exit 1 ;;
esac
case "$fetches" in
  *h3*) echo "PASS: first over TCP, then HTTP/3 through Alt-Svc" ;;
  *) echo "FAIL: no request went over HTTP/3"; exit 1 ;;
esac
