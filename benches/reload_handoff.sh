#!/usr/bin/env bash
# Accept-to-hand-over time of the master with and without reloads (issue 13, item 1).
# usage (after cargo build --release --examples; cargo bench --bench loadgen --no-run):
#   benches/reload_handoff.sh RELOADS
# Runs `recluster --workers 4` over examples/http, 16 clients of new connections for
# 10 s, RELOADS SIGUSR2 0.45 s apart meanwhile, and prints the load and the
# master's balancer_totals (handoff_p50_us / handoff_p99_us).
set -u
R=$1; PORT=18197
LG=$(ls -t target/release/deps/loadgen-* | grep -v '\.d$' | head -1)
target/release/recluster --workers 4 --listen 127.0.0.1:$PORT --pid-file /tmp/ho.pid -- target/release/examples/http > /tmp/ho.log 2>&1 &
until grep -q cluster_ready /tmp/ho.log; do sleep 0.1; done
$LG --addr 127.0.0.1:$PORT --load conn --clients 16 --duration 10 --warmup 0 --sources 16 > /tmp/ho-lg.log 2>&1 &
LGP=$!
for i in $(seq 1 $R); do sleep 0.45; kill -USR2 $(cat /tmp/ho.pid); done
wait $LGP
kill $(cat /tmp/ho.pid); while kill -0 $(cat /tmp/ho.pid 2>/dev/null) 2>/dev/null; do sleep 0.1; done
echo "reloads=$R finished=$(grep -c reload_finished /tmp/ho.log) $(grep -o 'conn .*req/s' /tmp/ho-lg.log | head -1) errors=$(grep -o 'errors=[0-9]*' /tmp/ho-lg.log | head -1)"
grep -o 'accepted=.*' /tmp/ho.log | tail -1
