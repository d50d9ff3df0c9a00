#!/usr/bin/env python3
"""cut-proxy.py: a TCP proxy on 127.0.0.1 whose connections can be cut.

usage: cut-proxy.py UPSTREAM_PORT
Listens on an ephemeral loopback port and prints "listening 127.0.0.1:PORT"
(flushed) on stdout; every accepted connection is relayed to
127.0.0.1:UPSTREAM_PORT (a connection whose upstream is refused is closed).
SIGUSR1 cuts every relayed connection (both sides, RST-free shutdown then
close), counted in "cut N connections" lines on stdout; SIGTERM stops it.
A test tool, not a server: loopback only, no limits beyond the OS's.
"""
import selectors
import signal
import socket
import sys

up = int(sys.argv[1])
lsn = socket.socket()
lsn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsn.bind(("127.0.0.1", 0))
lsn.listen(64)
lsn.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(lsn, selectors.EVENT_READ, None)
peer = {}  # socket -> its other end
cut_pending = False


def on_usr1(_s, _f):
    global cut_pending
    cut_pending = True


def close(s):
    o = peer.pop(s, None)
    for x in (s, o):
        if x is None:
            continue
        peer.pop(x, None)
        try:
            sel.unregister(x)
        except (KeyError, ValueError):
            pass
        try:
            x.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        x.close()


signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("listening 127.0.0.1:%d" % lsn.getsockname()[1], flush=True)
while True:
    if cut_pending:
        cut_pending = False
        n = len(peer) // 2
        for s in list(peer):
            if s in peer:
                close(s)
        print("cut %d connections" % n, flush=True)
    try:
        events = sel.select(0.1)
    except InterruptedError:
        continue
    for key, _ in events:
        s = key.fileobj
        if s is lsn:
            try:
                c, _a = lsn.accept()
            except OSError:
                continue
            try:
                u = socket.create_connection(("127.0.0.1", up), 2)
            except OSError:
                c.close()
                continue
            for x in (c, u):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                x.setblocking(False)
            peer[c], peer[u] = u, c
            sel.register(c, selectors.EVENT_READ, None)
            sel.register(u, selectors.EVENT_READ, None)
            continue
        if s not in peer:
            continue
        try:
            data = s.recv(1 << 20)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            close(s)
            continue
        o = peer[s]
        try:
            o.settimeout(10)  # a stopped peer: give up on it, not forever
            o.sendall(data)
            o.setblocking(False)
        except OSError:
            close(s)
