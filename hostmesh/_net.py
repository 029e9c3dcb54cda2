"""Socket helpers shared by the listeners."""

from __future__ import annotations

import errno
import socket

__all__ = ["BIND_ATTEMPTS", "bind_udp_tcp"]

#: Ephemeral ports tried for a UDP+TCP pair before giving up (another process
#: may hold the TCP port that matches a fresh UDP port).
BIND_ATTEMPTS = 20


def bind_udp_tcp(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A non-blocking UDP socket and a listening TCP socket on the same ``host:port``.

    With ``port`` 0, a free UDP port is taken and TCP bound to the same number;
    when TCP is taken there, both are retried on a new port. The caller owns
    and closes both sockets.

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt in range(BIND_ATTEMPTS):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.setblocking(False)
            udp.bind((host, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.setblocking(False)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(128)
            return udp, tcp
        except OSError as exc:
            udp.close()
            tcp.close()
            if port != 0 or exc.errno != errno.EADDRINUSE or attempt + 1 == BIND_ATTEMPTS:
                raise
    raise AssertionError("unreachable")  # pragma: no cover
