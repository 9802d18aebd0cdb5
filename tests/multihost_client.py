#!/usr/bin/env python3
"""The clients of tests/multihost.rs, run inside the client network namespace
(`ip netns exec NS python3 multihost_client.py HOST PORT SRC...`).

Every request is one connection from one of the source addresses SRC (bound before
connecting) to HOST:PORT, read until EOF; the first line of the answer is the reply.
No request is ever retried. Commands, one a line on stdin:

* `ready SECONDS`: requests from the first source until one succeeds; prints `ready`,
  or `timeout <last error>` after SECONDS. (Before the measured part: its failures
  count for nothing.)
* `start`: rounds, one after another, until `stop`: each round makes one request from
  every source (8 at a time) and prints `ok <src> <reply>` or `fail <src> <error>` for each,
  then `round <n>` (n from 1).
* `stop`: ends the rounds after the current one; prints `stopped`.

End of stdin: exits.
"""
import socket
import struct
import sys
import threading
import time

target = (sys.argv[1], int(sys.argv[2]))
sources = sys.argv[3:]
out = threading.Lock()


def say(line):
    with out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def request(src):
    """(True, reply line) or (False, error)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        s.bind((src, 0))
        s.connect(target)
        buf = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        if not buf:
            return False, "eof_without_reply"
        line, nl, _ = buf.decode(errors="replace").partition("\n")
        if not nl:
            return False, "truncated_reply"
        return True, line
    except OSError as e:
        return False, f"{type(e).__name__}:{e.errno}"
    finally:
        # Reset on close, as the Rust harness does: no TIME_WAIT pile-up per source.
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()


stop = threading.Event()
PARALLEL = 8


def some(part):
    for src in part:
        ok, what = request(src)
        say(f"{'ok' if ok else 'fail'} {src} {what}")


def rounds():
    # PARALLEL clients at a time, each going through its share of the sources: several
    # connections are in flight whenever a master reloads or HAProxy restarts.
    parts = [sources[i::PARALLEL] for i in range(PARALLEL)]
    n = 0
    while not stop.is_set():
        threads = [threading.Thread(target=some, args=(part,)) for part in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        n += 1
        say(f"round {n}")
    say("stopped")


runner = None
for command in sys.stdin:
    words = command.split()
    if not words:
        continue
    if words[0] == "ready":
        deadline = time.monotonic() + float(words[1])
        while True:
            ok, what = request(sources[0])
            if ok:
                say("ready")
                break
            if time.monotonic() >= deadline:
                say(f"timeout {what}")
                break
            threading.Event().wait(0.02)  # paces the polling only
    elif words[0] == "start" and runner is None:
        stop.clear()
        runner = threading.Thread(target=rounds)
        runner.start()
    elif words[0] == "stop" and runner is not None:
        stop.set()
        runner.join()
        runner = None
stop.set()
if runner is not None:
    runner.join()
