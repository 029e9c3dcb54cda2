"""DNS resolver for ``<service>.svc.mesh`` names: a sans-IO core and a Trio server."""

from __future__ import annotations

from ._recursors import parse_resolv_conf, recursor_addresses
from ._resolver import DnsCore, DnsStats, Forward
from ._server import Recursor, serve_dns
from ._wire import Drop, FormatError, QType, Query, Rcode, parse_query

__all__ = [
    "DnsCore",
    "DnsStats",
    "Drop",
    "FormatError",
    "Forward",
    "QType",
    "Query",
    "Rcode",
    "Recursor",
    "parse_query",
    "parse_resolv_conf",
    "recursor_addresses",
    "serve_dns",
]
