#!/usr/bin/env python3
"""A worker-channel worker with fault knobs, for the end-to-end tests.

Speaks docs/PROTOCOL.md like examples/worker.py and answers each connection with
`id=<WORKER_ID> pid=<pid> gen=<generation> peer=<ip>`. Knobs (environment):

* STALL_SLOT=k      the worker of slot k says `listening` and then never reads its
                    channel (until SIGTERM/SIGKILL): its queue fills up. With
                    STALL_ONCE=<path>, only the first such worker stalls (the one that
                    creates <path>); its replacements behave.
* CRASH_EVERY=n     the worker exits abruptly (os._exit) on receiving its n-th connection,
                    without serving it.
* GARBAGE=n         send n non-protocol messages to the master right after `listening`.
"""
import os, signal, socket, sys

wid = os.environ.get("WORKER_ID", "0")
gen = os.environ.get("RECLUSTER_GENERATION", "0")
pid = os.getpid()
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

chan = socket.socket(fileno=int(os.environ["RECLUSTER_FD"]))
for _ in range(int(os.environ.get("GARBAGE", "0"))):
    chan.send(b"this is not the protocol\n")
chan.send(b"listening\n")

def first_to_stall():
    mark = os.environ.get("STALL_ONCE")
    if not mark:
        return True
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


if os.environ.get("STALL_SLOT") == wid and first_to_stall():
    while True:
        signal.pause()

crash_every = int(os.environ.get("CRASH_EVERY", "0"))
received = 0
while True:
    msg, fds, flags, _ = socket.recv_fds(chan, 8192, 64, socket.MSG_CMSG_CLOEXEC)
    if not msg and not fds:
        sys.exit(0)
    fds = iter(fds)
    for line in msg.decode().splitlines():
        parts = line.split(" ")
        if parts[0] == "stop":
            sys.exit(0)
        if parts[0] != "conn" or len(parts) != 4:
            continue
        fd = next(fds, None)
        if fd is None:
            continue
        received += 1
        if crash_every and received % crash_every == 0:
            os._exit(3)
        with socket.socket(fileno=fd) as conn:
            ip = parts[2].rsplit(":", 1)[0].strip("[]")
            conn.sendall(f"id={wid} pid={pid} gen={gen} peer={ip}\n".encode())
    for fd in fds:
        os.close(fd)
