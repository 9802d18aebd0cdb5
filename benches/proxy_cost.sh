#!/usr/bin/env bash
# The cost of reading a PROXY v2 header in the master, `conn` load (one request per
# connection): one master with two listeners, one plain and one with
# `--proxy-protocol ADDR=v2`, the same 2 `examples/http` workers behind both;
# alternating 5 s loadgen runs against each (3 pairs), the second with `--proxy-v2`.
# Prints requests/s and the master's CPU (utime+stime from /proc) per connection.
#   benches/proxy_cost.sh [rr|sticky]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin recluster --example http >/dev/null 2>&1
LG=$(cargo bench --bench loadgen --no-run 2>&1 | grep -oE "target/release/deps/loadgen-[0-9a-f]+" | head -1)
B=target/release/recluster
PLAIN=127.0.0.1:18601
PROXIED=127.0.0.1:18602
export RECLUSTER_CONTROL_DIR=${TMPDIR:-/tmp}/recluster-proxy-cost-$$
LOG=${TMPDIR:-/tmp}/recluster-proxy-cost-$$.log
$B -w 2 -b "${1:-rr}" -l $PLAIN -l $PROXIED --proxy-protocol $PROXIED=v2 -- target/release/examples/http >"$LOG" 2>&1 &
M=$!
trap 'kill -TERM $M 2>/dev/null || true' EXIT
for _ in $(seq 200); do grep -q cluster_ready "$LOG" && break; sleep 0.1; done
ticks=$(getconf CLK_TCK)
for pair in 1 2 3; do
  for which in plain proxied; do
    if [ $which = plain ]; then A=$PLAIN; X=""; else A=$PROXIED; X=--proxy-v2; fi
    T0=$(awk '{print $14+$15}' /proc/$M/stat)
    OUT=$($LG --addr $A --load conn --clients 64 --duration 5 --sources 64 --warmup 0 $X 2>&1 | grep "req/s")
    T1=$(awk '{print $14+$15}' /proc/$M/stat)
    N=$(echo "$OUT" | grep -oE "conns=[0-9]+" | cut -d= -f2)
    RPS=$(echo "$OUT" | grep -oE "[0-9]+ req/s")
    US=$(python3 -c "print(round(($T1-$T0)*1e6/$ticks/$N,2))")
    echo "pair $pair $which: $RPS conns=$N master_cpu_us_per_conn=$US"
  done
done
