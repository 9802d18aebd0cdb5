#!/usr/bin/env python3
"""A worker-channel worker with fault knobs, for the end-to-end tests.

Speaks docs/PROTOCOL.md like examples/worker.py and answers each connection with
`id=<WORKER_ID> pid=<pid> gen=<generation> peer=<ip>`. Knobs (environment); every
knob NAME can also be given as NAME_<slot> (e.g. CRASH_EVERY_0=10), which applies to
that slot only and wins over NAME:

* STALL_SLOT=k      the worker of slot k says `listening` and then never reads its
                    channel (until SIGTERM/SIGKILL): its queue fills up. With
                    STALL_ONCE=<path>, only the first such worker stalls (the one that
                    creates <path>); its replacements behave.
* CRASH_EVERY=n     the worker exits abruptly (os._exit(3)) on receiving its n-th
                    connection, without serving it. It first writes
                    `channel_worker crash slot=<k> pid=<pid> lost=<m>` to stderr, m being
                    the connections it holds and will never serve (that one and the rest
                    of its message).
* GARBAGE=n         send n non-protocol messages (unknown lines) to the master right
                    after starting, before `listening`.
* OVERSIZE=n        send n messages longer than the 256-byte limit (1000 bytes).
* FDS=n             send n messages that carry a descriptor (workers never send any).
                    With GARBAGE_ONCE=<path>, only the first worker (the one that
                    creates <path>) sends GARBAGE/OVERSIZE/FDS messages.
* NOTIFY_GARBAGE=n  send n datagrams to NOTIFY_SOCKET that are not a readiness
                    notification: unknown assignments, `READY=0`, `READY=1x`, 8 KiB
                    ones that begin with `READY=1` (over the master's 4 KiB limit),
                    empty ones, ones that carry a descriptor.
* NOTIFY_READY=1    then send `READY=1` to NOTIFY_SOCKET.
* FLOOD=n           after `listening`, a child of the worker (it inherits the channel)
                    sends n messages of 25 `listening` lines each (250 bytes, under the
                    256-byte limit), as fast as it can: a flood of valid messages. With
                    FLOOD_ONCE=<path>, only the first worker floods.
* NEVER_LISTEN_FROM_GEN=g  a worker of generation >= g never says `listening`
                    (it waits for the stop signal): a generation that never becomes ready.
* HOST_LABEL=name   add ` host=<name>` to every answer (tests/multihost.rs: which host
                    of several answered).
* DRAIN=1           once listening, the stop signal (SIGTERM) no longer ends the worker
                    at once: it is blocked, and the worker exits at `stop` or EOF on its
                    channel after serving every connection it has received, as
                    docs/PROTOCOL.md asks. (Without it, a SIGTERM that lands between
                    receiving connections and answering them closes them unanswered.)
"""
import array, os, signal, socket, sys

wid = os.environ.get("WORKER_ID", "0")
gen = os.environ.get("RECLUSTER_GENERATION", "0")
pid = os.getpid()
host = os.environ.get("HOST_LABEL")
suffix = f" host={host}" if host else ""
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))


def knob(name, default="0"):
    return os.environ.get(f"{name}_{wid}", os.environ.get(name, default))


def first_to_create(mark):
    if not mark:
        return True
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


chan = socket.socket(fileno=int(os.environ["RECLUSTER_FD"]))

garbage, oversize, with_fds = int(knob("GARBAGE")), int(knob("OVERSIZE")), int(knob("FDS"))
if (garbage or oversize or with_fds) and first_to_create(knob("GARBAGE_ONCE", "")):
    for _ in range(garbage):
        chan.send(b"this is not the protocol\n")
    for _ in range(oversize):
        chan.send(b"listening " + b"x" * 989 + b"\n")
    for _ in range(with_fds):
        socket.send_fds(chan, [b"ready\n"], [0])

notify_garbage = int(knob("NOTIFY_GARBAGE"))
if notify_garbage or knob("NOTIFY_READY") == "1":
    note = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.environ["NOTIFY_SOCKET"]
    junk = [
        b"STATUS=booting\nNOT_A_FIELD",
        b"READY=0",
        b"READY=1x",
        b"READY=1" + b"x" * 8192,
        b"READY=1\n" + b"x" * 8192,
        b"",
        b"\x00\xff\xfe READY=1",
    ]
    for i in range(notify_garbage):
        if i % 8 == 7:
            # (socket.send_fds ignores its address argument before Python 3.12.)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0]))]
            note.sendmsg([b"FDSTORE=1"], rights, 0, path)
        else:
            note.sendto(junk[i % 7], path)
    if knob("NOTIFY_READY") == "1":
        note.sendto(b"READY=1", path)

never_from = int(knob("NEVER_LISTEN_FROM_GEN"))
if never_from and int(gen) >= never_from:
    while True:
        signal.pause()

chan.send(b"listening\n")

# Decided before the flood starts: the master kills a flooder within a millisecond,
# and a worker killed before claiming the stall would leave the stall to its
# replacement.
stall = os.environ.get("STALL_SLOT") == wid and first_to_create(os.environ.get("STALL_ONCE"))

flood = int(knob("FLOOD"))
if flood and first_to_create(knob("FLOOD_ONCE", "")) and os.fork() == 0:
    try:
        lines = b"listening\n" * 25
        for _ in range(flood):
            chan.send(lines)
    finally:
        os._exit(0)

if stall:
    while True:
        signal.pause()

if knob("DRAIN") == "1":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

crash_every = int(knob("CRASH_EVERY"))
received = 0
while True:
    msg, fds, flags, _ = socket.recv_fds(chan, 8192, 64, socket.MSG_CMSG_CLOEXEC)
    if not msg and not fds:
        sys.exit(0)
    fds = list(fds)
    conns = [p for p in (l.split(" ") for l in msg.decode().splitlines())]
    stop = False
    for i, parts in enumerate(conns):
        if parts[0] == "stop":
            stop = True
            break
        if parts[0] != "conn" or len(parts) != 4 or not fds:
            continue
        fd = fds.pop(0)
        received += 1
        if crash_every and received % crash_every == 0:
            lost = 1 + len(fds)
            os.write(2, f"channel_worker crash slot={wid} pid={pid} lost={lost}\n".encode())
            os._exit(3)
        with socket.socket(fileno=fd) as conn:
            ip = parts[2].rsplit(":", 1)[0].strip("[]")
            conn.sendall(f"id={wid} pid={pid} gen={gen} peer={ip}{suffix}\n".encode())
    for fd in fds:
        os.close(fd)
    if stop:
        sys.exit(0)
