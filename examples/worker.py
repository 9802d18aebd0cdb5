#!/usr/bin/env python3
"""A recluster worker in plain Python: proof that the worker channel is language-neutral.

    recluster --listen 127.0.0.1:8080 -- python3 examples/worker.py
    recluster --listen 127.0.0.1:8080 --balance shared -- python3 examples/worker.py

Greets each client with its WORKER_ID and the client's IP, like examples/echo.rs.
See docs/PROTOCOL.md for the protocol.
"""
import os, signal, socket, sys

wid, pid = os.environ.get("WORKER_ID", "0"), os.getpid()
gen = os.environ.get("RECLUSTER_GENERATION", "0")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop: exit; unread connections are reclaimed


def serve(conn, peer_ip):
    with conn:
        conn.sendall(f"id={wid} pid={pid} gen={gen} peer={peer_ip} python=1\n".encode())


if "RECLUSTER_FD" in os.environ:  # rr / sticky: connections arrive over the channel
    chan = socket.socket(fileno=int(os.environ["RECLUSTER_FD"]))
    chan.send(b"listening\n")
    while True:
        msg, fds, flags, _ = socket.recv_fds(chan, 8192, 64, socket.MSG_CMSG_CLOEXEC)
        if not msg and not fds:
            break  # EOF: the master is gone
        fds = iter(fds)
        for line in msg.decode().splitlines():
            parts = line.split(" ")
            if parts[0] == "conn" and len(parts) == 4:
                fd = next(fds, None)
                if fd is not None:
                    serve(socket.socket(fileno=fd), parts[2].rsplit(":", 1)[0].strip("[]"))
            elif parts[0] == "stop":
                sys.exit(0)
        for fd in fds:  # descriptors without a record
            os.close(fd)
else:  # shared: accept on the inherited socket (systemd socket activation)
    lsock = socket.socket(fileno=3)
    while True:
        conn, peer = lsock.accept()
        serve(conn, peer[0])
