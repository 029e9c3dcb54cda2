"""The leader's decisions about death reports and node records (sans-IO).

Plain functions of the stored values and ``now`` (wall time, the clock a
report's ``confirmed_at`` is on); server/_health.py does the probing and the
store writes.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass

from hostmesh.catalog import NodeRecord
from hostmesh.catalog._model import GOSSIP_PORT_META

__all__ = [
    "GOSSIP_PORT_META",
    "Action",
    "DeathReport",
    "parse_report",
    "probe_target",
    "report_action",
]


class Action(enum.Enum):
    """What the leader does with one death report."""

    DROP = "drop"  # malformed, or about a record that is gone or newer: delete the report
    PROBE = "probe"  # unconfirmed: probe the node
    WAIT = "wait"  # confirmed dead, reap_after not reached yet
    REAP = "reap"  # confirmed dead for reap_after: delete the node
    REMOVE = "remove"  # the node left gracefully: delete it now


@dataclass(frozen=True)
class DeathReport:
    """A ``catalog/dead/<node>`` value."""

    generation: int
    version: int
    confirmed: bool = False
    confirmed_at: float = 0.0  # wall time (s since the epoch) of the confirmation

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation, self.version)


def parse_report(value: bytes) -> DeathReport | None:
    """The report in a stored value, or None when it does not parse."""
    try:
        doc = json.loads(value)
        generation, version = doc["generation"], doc["version"]
        confirmed = doc.get("confirmed", False)
        confirmed_at = doc.get("confirmed_at", 0.0)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (generation, version)):
        return None
    if not isinstance(confirmed, bool) or not isinstance(confirmed_at, int | float):
        return None
    if isinstance(confirmed_at, bool) or not math.isfinite(confirmed_at):
        return None
    return DeathReport(generation, version, confirmed, float(confirmed_at))


def report_action(
    report: DeathReport | None, record: NodeRecord | None, now: float, reap_after: float
) -> Action:
    """The leader's decision for one death report, given the node's stored record.

    Args:
        now: wall time (s since the epoch), the clock ``confirmed_at`` is on.
    """
    if report is None or record is None or record.key > report.key:
        return Action.DROP
    if record.left:
        return Action.REMOVE
    if not report.confirmed:
        return Action.PROBE
    if now - report.confirmed_at >= reap_after:
        return Action.REAP
    return Action.WAIT


def probe_target(record: NodeRecord, default_port: int) -> tuple[str, int] | None:
    """(host, port) of the node's gossip listener, or None when the record has no address.

    The port is the node meta ``gossip_port`` when it holds a valid port, else the
    mesh-wide ``default_port``.
    """
    host = record.node.address
    if not host:
        return None
    raw = record.node.meta.get(GOSSIP_PORT_META, "")
    port = int(raw) if raw.isascii() and raw.isdigit() and 0 < int(raw) < 65536 else default_port
    return host, port
