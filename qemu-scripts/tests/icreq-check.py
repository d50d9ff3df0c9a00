#!/usr/bin/env python3
"""icreq-check.py HOST PORT [PORT...]: minimal NVMe/TCP probe.

For each port: open a TCP connection, send an ICReq PDU (NVMe/TCP 1.0,
section 3.6.2.2) and check that an ICResp comes back.  Exit 0 if all ports
answered correctly.  Retries the connection for a while: the guest's target may
need a moment after signal_ready, and QEMU's hostfwd accepts before the guest
does.
"""
import socket
import struct
import sys
import time

ICREQ_LEN = 128


def icreq() -> bytes:
    # common header: pdu-type 0x00 ICReq, flags 0, hlen 128, pdo 0, plen 128
    hdr = struct.pack("<BBBBI", 0x00, 0x00, ICREQ_LEN, 0, ICREQ_LEN)
    # PFV 0, HPDA 0, DGST 0 (no digests), MAXR2T 0 (0's based: 1)
    body = struct.pack("<HBBI", 0, 0, 0, 0)
    pdu = hdr + body
    return pdu + bytes(ICREQ_LEN - len(pdu))


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def probe(host: str, port: int) -> None:
    s = socket.create_connection((host, port), timeout=10)
    try:
        s.sendall(icreq())
        resp = recv_exact(s, 8)
        ptype, flags, hlen, pdo, plen = struct.unpack("<BBBBI", resp)
        if ptype != 0x01:
            raise ValueError(f"expected ICResp (pdu type 0x01), got 0x{ptype:02x}")
        if hlen != 128 or plen != 128:
            raise ValueError(f"ICResp hlen={hlen} plen={plen}, expected 128/128")
        rest = recv_exact(s, plen - 8)
        pfv, cpda, dgst, maxh2cdata = struct.unpack("<HBBI", rest[:8])
        if pfv != 0:
            raise ValueError(f"ICResp PFV={pfv}, expected 0")
        print(f"icreq-check: {host}:{port}: ICResp ok (cpda={cpda} dgst={dgst} "
              f"maxh2cdata={maxh2cdata})")
    finally:
        s.close()


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    host = sys.argv[1]
    ok = True
    for port in (int(p) for p in sys.argv[2:]):
        deadline = time.monotonic() + 30
        while True:
            try:
                probe(host, port)
                break
            except (OSError, ConnectionError, ValueError) as e:
                if isinstance(e, ValueError) or time.monotonic() > deadline:
                    print(f"icreq-check: {host}:{port}: FAIL: {e}", file=sys.stderr)
                    ok = False
                    break
                time.sleep(0.5)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
