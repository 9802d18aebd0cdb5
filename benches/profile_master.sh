#!/usr/bin/env bash
# Where the master's CPU goes per handed-over connection (issue 13, item 4).
# usage (as root, after cargo build --release --examples; cargo bench --bench loadgen --no-run):
#   benches/profile_master.sh [SECONDS] [ACCEPT_THREADS]
# Runs `recluster --balance rr --workers 2` pinned to CPU 0 with its workers
# (examples/http) and the load generator (conn load, 64 clients, 64 sources) on
# CPU 1, samples the master with `perf record -g` for SECONDS (default 5), and prints
# the master's CPU per connection, its busiest symbols (kernel and user), and its
# syscalls (counts and time in each, by perf trace -s) over one second. Needs perf and taskset.
set -eu
S=${1:-5}; K=${2:-1}
cd "$(dirname "$0")/.."
LG=$(ls -t target/release/deps/loadgen-* | grep -v '\.d$' | head -1)
OUT=${TMPDIR:-/tmp}/recluster-profile.$$
mkdir -p "$OUT"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
taskset -c 0 target/release/recluster --workers 2 --accept-threads "$K" --listen 127.0.0.1:$PORT \
  -- taskset -c 1 target/release/examples/http > "$OUT/master.log" 2>&1 &
MASTER=$!
trap 'kill $MASTER 2>/dev/null; wait $MASTER 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do grep -q cluster_ready "$OUT/master.log" && break; sleep 0.05; done
grep -q cluster_ready "$OUT/master.log" || { echo "the master did not get ready:"; cat "$OUT/master.log"; exit 1; }
taskset -c 1 "$LG" --addr 127.0.0.1:$PORT --load conn --clients 64 --sources 64 --threads 1 \
  --warmup 1 --duration $((S + 1)) > "$OUT/loadgen.log" 2>&1 &
LOAD=$!
sleep 1
ticks() { awk '{print $14 + $15}' /proc/$MASTER/stat; }
T0=$(ticks); A0=$(date +%s.%N)
perf trace -s -p $MASTER -o "$OUT/syscalls.txt" -- sleep 1 2>/dev/null || echo "(perf trace failed)" > "$OUT/syscalls.txt"
perf record -q -F 2999 -g -p $MASTER -o "$OUT/perf.data" -- sleep $((S - 1)) 2>/dev/null
T1=$(ticks); A1=$(date +%s.%N)
wait $LOAD
kill -TERM $MASTER; wait $MASTER 2>/dev/null || true
trap - EXIT
HZ=$(getconf CLK_TCK)
RATE=$(grep -o '[0-9.]* req/s' "$OUT/loadgen.log" | head -1 | cut -d' ' -f1)
echo "loadgen: $(grep -m1 'req/s' "$OUT/loadgen.log")"
awk -v t0=$T0 -v t1=$T1 -v a0=$A0 -v a1=$A1 -v hz=$HZ -v rate=$RATE 'BEGIN {
  cpu = (t1 - t0) / hz; wall = a1 - a0;
  printf "master CPU: %.0f %% of one core at %.0f conns/s = %.1f µs per connection\n", 100 * cpu / wall, rate, 1e6 * cpu / wall / rate }'
echo "syscalls in 1 s, traced (perf trace adds its own cost to each; compare the counts with the rate above):"
grep -E '^ +(syscall|-|accept4|sendmsg|close|epoll_wait|ioctl|pread64|futex|write|read) ' "$OUT/syscalls.txt" || cat "$OUT/syscalls.txt"
echo "busiest symbols of the master (self time):"
perf report -i "$OUT/perf.data" --no-children --sort sym --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -25
echo "where the master's samples go (inclusive: each syscall with all it calls; task_work_run is the"
echo "deferred part of close, the final fput of the master's copy; schedule is sleeping and waking):"
perf report -i "$OUT/perf.data" --children --sort sym --stdio 2>/dev/null \
  | grep -E '^ +[0-9.]+% +[0-9.]+% +\[k\] (__x64_sys_(accept4|close|epoll_wait|ioctl|pread64)|__sys_sendmsg|task_work_run|schedule|exit_to_user_mode_loop)$' \
  | awk '{print "  " $1 " " $NF}'
rm -rf "$OUT"
