#!/usr/bin/env python3
"""The least a DNS answer can cost in CPython on this machine: a bare UDP answer loop.

    python bench/floor_dns.py PORT ADDRESS

No Trio, no catalog, no rules: epoll, then ``recvfrom``/``sendto`` until the
socket is drained, answering every question with one A record for
``ADDRESS`` (built once per question with dnslib, then the cached bytes with
the query's ID patched in). ``bench/dns.py`` runs it beside hostmesh and
dnsmasq: how close hostmesh is to it says what is left to gain in Python,
and how it compares with dnsmasq says what CPython can reach at all.
Loopback only; runs until killed.
"""

from __future__ import annotations

import select
import socket
import sys

from dnslib import QTYPE, RR, A, DNSRecord


def main() -> int:
    port, address = int(sys.argv[1]), sys.argv[2]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    answers: dict[bytes, bytes] = {}  # query without its ID -> reply without its ID

    def build(key: bytes) -> bytes:
        query = DNSRecord.parse(b"\0\0" + key)
        reply = query.reply()
        reply.add_answer(RR(str(query.q.qname), QTYPE.A, rdata=A(address), ttl=0))
        answers[key] = out = bytes(reply.pack())[2:]
        return out

    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN)
    recvfrom, sendto, get = sock.recvfrom, sock.sendto, answers.get
    while True:
        ep.poll()
        for _ in range(256):
            try:
                data, addr = recvfrom(4096)
            except BlockingIOError:
                break
            key = data[2:]
            out = get(key)
            if out is None:
                try:
                    out = build(key)
                except Exception:  # not a query we can answer: dropped
                    continue
            sendto(data[:2] + out, addr)


if __name__ == "__main__":
    sys.exit(main())
