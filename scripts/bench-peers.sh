#!/usr/bin/env bash
# bench-peers.sh - measure tower-quiche beside the servers a user could pick instead, in one
# run of the shared load harness (../shared/peers/run-bench.sh), and print the harness's
# table followed by tower-quiche's ratios to the best HTTP/3 peer and to HTTP/2 over TCP.
#
# Usage (from anywhere):
#   scripts/bench-peers.sh                 # REPEAT=3: medians of three interleaved runs
#   REPEAT=5 scripts/bench-peers.sh
#   WORKLOADS="hello64 hello32" REPEAT=1 scripts/bench-peers.sh   # a subset, once
# Every knob of run-bench.sh (DURATION, WORKLOADS, SERVER_CPUS, ...) passes through;
# BENCH_SERVER_ARGS adds flags to bench_server's (e.g. "--congestion-control bbr2").
# Builds examples/bench_server in release, and the peers when they are not built yet
# (about 20 minutes on 2 cores, once, in target/peers).
# Loopback only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export REPEAT=${REPEAT:-3}

# The harness builds into, and writes its results under, its own directory; the shared
# checkout is read-only, so (unless PEERS names another) it runs from a copy in our target
# directory, synced from ../shared/peers on every run (tar keeps the files' times, so the
# built peers stay fresh).
if [[ -z ${PEERS:-} ]]; then
  PEERS=$ROOT/target/peers
  mkdir -p "$PEERS"
  (cd "$ROOT/../shared/peers" && tar --exclude=./target --exclude=./results -cf - .) | (cd "$PEERS" && tar -xf -)
  chmod -R u+w "$PEERS"
fi

cargo build --release --example bench_server --manifest-path "$ROOT/Cargo.toml"
if [[ ! -x $PEERS/target/release/peer-h3quinn || ! -x $PEERS/target/release/bulk ]]; then
  (cd "$PEERS" && cargo build --release --workspace)
fi

conf=$(mktemp)
trap 'rm -f "$conf"' EXIT
grep -v '^#' "$PEERS/peers.conf" | grep . >"$conf"
echo "tower-quiche@h3=$ROOT/target/release/examples/bench_server --listen {addr} --cert {cert} --key {key} ${BENCH_SERVER_ARGS:-}" >>"$conf"

log=$(mktemp)
trap 'rm -f "$conf" "$log"' EXIT
"$PEERS/run-bench.sh" -f "$conf" | tee "$log"

# The table to read: the medians with REPEAT>1 (the aggregate prints them after "Median of",
# followed by a table of ranges that must not be read), else the one run's summary.
python3 - "$log" <<'EOF'
import re, sys

NUM = re.compile(r"-?\d[\d,]*\.?\d*")
table, header = {}, None
lines = open(sys.argv[1]).read().splitlines()
medians = [i for i, line in enumerate(lines) if line.startswith("Median of")]
if medians:
    start = medians[-1]
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("Range")), len(lines))
    lines = lines[start:end]
for line in lines:
    if not line.startswith("| ") or line.startswith("|---"):
        continue
    cells = [c.strip() for c in line.strip("|").split("|")]
    if cells[0] in ("peer", "server"):
        header, table = cells, {}
        continue
    if header:
        table[cells[0]] = cells


def first(cell):
    # The idle column reads "before -> with (KiB per conn x N)": the KiB per connection.
    m = re.search(r"\(([\d.]+) x", cell or "") or NUM.search(cell or "")
    if not m:
        return None
    return float((m.group(1) if m.re.groups else m.group()).replace(",", ""))


SKIP = {"proto", "srv CPU", "smoke", "VM steal"}


ours = table.get("tower-quiche")
if not ours or not header:
    sys.exit("no tower-quiche row in the harness's table")
h3_peers = [name for name in table if name not in ("tower-quiche", "h2-tcp")]
lower_is_better = re.compile(r"µs|us/|ms|p50|p99|CPU|KiB|RSS", re.I)
print("\n## tower-quiche / best HTTP/3 peer, and / HTTP/2 over TCP (ratios > 1: tower-quiche better)\n")
print("| column | tower-quiche | best h3 peer | ratio | h2-tcp | ratio |")
print("|---|---|---|---|---|---|")
for i, col in enumerate(header[1:], start=1):
    if col in SKIP:
        continue
    mine = first(ours[i]) if i < len(ours) else None
    if mine is None:
        continue
    low = bool(lower_is_better.search(col))
    peers = [(first(table[p][i]), p) for p in h3_peers if i < len(table[p]) and first(table[p][i])]
    best = (min if low else max)(peers) if peers else None
    h2 = table.get("h2-tcp")
    h2v = first(h2[i]) if h2 and i < len(h2) else None

    def ratio(other):
        if not other or not mine:
            return "-"
        return f"{(other / mine) if low else (mine / other):.2f}"

    best_cell = f"{best[0]:g} ({best[1]})" if best else "-"
    print(f"| {col} | {mine:g} | {best_cell} | {ratio(best[0] if best else None)} | "
          f"{h2v if h2v is not None else '-'} | {ratio(h2v)} |")
EOF
