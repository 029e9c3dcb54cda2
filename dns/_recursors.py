"""Which recursors to forward names outside the mesh domain to (sans-IO)."""

from __future__ import annotations

import ipaddress

from hostmesh._config import parse_hostport

__all__ = ["MAX_RECURSORS", "parse_resolv_conf", "recursor_addresses"]

#: glibc reads at most 3 resolv.conf nameservers (MAXNS); configured lists may be longer, to this.
MAX_RECURSORS = 8


def parse_resolv_conf(text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf, in order (invalid lines skipped)."""
    out = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            address = fields[1].split("%", 1)[0]  # drop an IPv6 zone id
            try:
                ipaddress.ip_address(address)
            except ValueError:
                continue
            out.append(address)
    return out


def recursor_addresses(
    configured: tuple[str, ...], resolv_conf_text: str | None, ourselves: tuple[str, int]
) -> list[tuple[str, int]]:
    """``(host, port)`` recursors: the configured ones, else resolv.conf's minus ourselves."""
    if configured:
        candidates = [
            parse_hostport(c if c.count(":") == 1 or c.startswith("[") else f"[{c}]:53")
            if ":" in c
            else (c, 53)
            for c in configured
        ]
    elif resolv_conf_text is not None:
        candidates = [(a, 53) for a in parse_resolv_conf(resolv_conf_text)]
    else:
        candidates = []
    out = []
    for host, port in candidates:
        if (host, port) == ourselves or (host, port) in out:
            continue
        out.append((host, port))
    return out[:MAX_RECURSORS]
