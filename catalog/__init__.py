"""The service catalog: model, versioned node records and their merge, queries.

The catalog is what agents gossip and sync with the servers. Sans-IO: nothing
here does I/O or reads a clock.
"""

from __future__ import annotations

from ._catalog import Catalog, newer
from ._model import (
    CheckState,
    Health,
    Node,
    NodeRecord,
    ServiceInstance,
    record_from_json,
    record_to_json,
)
from ._query import InstanceView, healthy_instances, service_instances, service_names

__all__ = [
    "Catalog",
    "CheckState",
    "Health",
    "InstanceView",
    "Node",
    "NodeRecord",
    "ServiceInstance",
    "healthy_instances",
    "newer",
    "record_from_json",
    "record_to_json",
    "service_instances",
    "service_names",
]
