"""Consul's JSON shapes for the agent, health and catalog APIs.

Registrations are parsed the way Consul parses them: field names match
case-insensitively and with or without underscores (``DeregisterCriticalServiceAfter``,
``deregister_critical_service_after``), durations are Go strings (``"10s"``) or
seconds, and fields Consul has but hostmesh does not implement are ignored when
they carry their zero value. ``User`` is a hostmesh extension (the Unix user
of the workload, for identity).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hostmesh._config import CheckDefinition, FieldError, ServiceDefinition, from_mapping
from hostmesh._errors import ConfigError, ValidationError
from hostmesh.catalog import CheckState, InstanceView, Node, ServiceInstance

__all__ = [
    "catalog_service_json",
    "check_json",
    "node_json",
    "service_from_consul",
    "service_json",
    "service_to_consul",
]

# Consul field (normalised: lower case, no underscores) -> our field.
_SERVICE_FIELDS = {
    "id": "id",
    "name": "name",
    "address": "address",
    "port": "port",
    "tags": "tags",
    "meta": "meta",
    "user": "user",
}
_CHECK_FIELDS = {
    "id": "id",
    "checkid": "id",
    "name": "name",
    "notes": "notes",
    "status": "status",
    "http": "http",
    "method": "method",
    "header": "header",
    "tlsskipverify": "tls_skip_verify",
    "tcp": "tcp",
    "args": "args",
    "scriptargs": "args",
    "ttl": "ttl",
    "interval": "interval",
    "timeout": "timeout",
    "successbeforepassing": "success_before_passing",
    "failuresbeforecritical": "failures_before_critical",
    "deregistercriticalserviceafter": "deregister_critical_service_after",
}
# Consul features hostmesh does not implement: accepted only with a zero value.
_IGNORED_SERVICE = {
    "kind", "proxy", "connect", "enabletagoverride", "taggedaddresses", "namespace",
    "partition", "locality", "socketpath", "token",
}  # fmt: skip
_IGNORED_CHECK = {
    "serviceid", "type", "definition", "output", "body", "disableredirects", "outputmaxsize",
    "tlsservername", "h2ping", "h2pingusetls", "grpc", "grpcusetls", "dockercontainerid",
    "shell", "aliasnode", "aliasservice", "failuresbeforewarning", "namespace", "partition",
    "intervalduration", "timeoutduration",
}  # fmt: skip

#: Registrations may nest at most this many checks (Consul has no limit; a bound keeps memory sane).
MAX_CHECKS_PER_SERVICE = 32


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _is_zero(value: Any) -> bool:
    return value in (None, "", 0, False, [], {})


def _translate(
    data: Any, fields: Mapping[str, str], ignored: set[str], where: str
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValidationError(f"{where or 'body'}: expected a JSON object")
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = _norm(str(key))
        target = fields.get(norm)
        if target is None:
            if norm in ignored and not _is_zero(value):
                raise ValidationError(f"{where}{key}: not supported by hostmesh")
            continue  # unknown fields are ignored, as Consul does
        if value is None:
            continue
        if target in out:
            raise ValidationError(f"{where}{key}: given twice")
        out[target] = value
    return out


def _check_from_consul(data: Any, where: str) -> dict[str, Any]:
    out = _translate(data, _CHECK_FIELDS, _IGNORED_CHECK, where)
    header = out.get("header")
    if isinstance(header, dict):
        # Consul's Header is map[string][]string; we keep one joined value.
        joined = {}
        for name, values in header.items():
            if isinstance(values, list):
                if not all(isinstance(v, str) for v in values):
                    raise ValidationError(f"{where}Header.{name}: expected strings")
                joined[name] = ", ".join(values)
            else:
                joined[name] = values
        out["header"] = joined
    return out


def service_from_consul(data: Any) -> ServiceDefinition:
    """Parse a ``PUT /v1/agent/service/register`` body.

    Raises:
        ValidationError: one line naming the field and the reason.
    """
    out = _translate(data, _SERVICE_FIELDS, _IGNORED_SERVICE, "")
    weights = next((v for k, v in data.items() if _norm(str(k)) == "weights"), None)
    if weights is not None:
        if not isinstance(weights, dict):
            raise ValidationError("Weights: expected an object")
        for key, value in weights.items():
            target = {"passing": "weight", "warning": "weight_warning"}.get(_norm(str(key)))
            if target is not None:
                out[target] = value
    checks: list[Any] = []
    for key, value in data.items():
        norm = _norm(str(key))
        if norm == "check" and value is not None:
            checks.append(_check_from_consul(value, "Check."))
        elif norm == "checks" and value is not None:
            if not isinstance(value, list):
                raise ValidationError("Checks: expected a list")
            checks.extend(_check_from_consul(c, f"Checks[{i}].") for i, c in enumerate(value))
    if len(checks) > MAX_CHECKS_PER_SERVICE:
        raise ValidationError(f"Checks: at most {MAX_CHECKS_PER_SERVICE} checks per service")
    if checks:
        out["checks"] = checks
    try:
        return from_mapping(ServiceDefinition, out, source="body")
    except ConfigError as exc:
        raise ValidationError(f"{exc.key}: {exc.reason}") from None
    except FieldError as exc:  # pragma: no cover - from_mapping translates these
        raise ValidationError(str(exc)) from None


def _duration(seconds: float) -> str:
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def _check_to_consul(check: CheckDefinition, check_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {"CheckID": check_id, "Status": check.status}
    if check.name:
        out["Name"] = check.name
    if check.notes:
        out["Notes"] = check.notes
    if check.http:
        out.update(HTTP=check.http, Method=check.method, TLSSkipVerify=check.tls_skip_verify)
        if check.header:
            out["Header"] = {k: [v] for k, v in check.header.items()}
    if check.tcp:
        out["TCP"] = check.tcp
    if check.args:
        out["Args"] = list(check.args)
    if check.ttl:
        out["TTL"] = _duration(check.ttl)
    else:
        out["Interval"] = _duration(check.interval)
    if check.timeout:
        out["Timeout"] = _duration(check.timeout)
    if check.success_before_passing:
        out["SuccessBeforePassing"] = check.success_before_passing
    if check.failures_before_critical:
        out["FailuresBeforeCritical"] = check.failures_before_critical
    if check.deregister_critical_service_after:
        out["DeregisterCriticalServiceAfter"] = _duration(check.deregister_critical_service_after)
    return out


def service_to_consul(defn: ServiceDefinition) -> dict[str, Any]:
    """The registration body for ``defn`` (inverse of :func:`service_from_consul`)."""
    out: dict[str, Any] = {
        "ID": defn.id,
        "Name": defn.name,
        "Tags": list(defn.tags),
        "Address": defn.address,
        "Port": defn.port,
        "Meta": dict(defn.meta),
        "Weights": {"Passing": defn.weight, "Warning": defn.weight_warning},
    }
    if defn.user:
        out["User"] = defn.user
    if defn.checks:
        out["Checks"] = [_check_to_consul(c, defn.check_id(i)) for i, c in enumerate(defn.checks)]
    return out


def node_json(node: Node, node_id: str = "", index: int = 0) -> dict[str, Any]:
    """A node as ``/v1/health/service`` and ``/v1/catalog/nodes`` show it."""
    return {
        "ID": node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": {"lan": node.address, "lan_ipv4": node.address, "wan": node.address},
        "Meta": dict(node.meta),
        "Locality": {"Region": node.region, "Zone": node.az},
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def service_json(svc: ServiceInstance, node: Node, index: int = 0) -> dict[str, Any]:
    """An instance as ``/v1/agent/services`` and ``/v1/health/service`` show it."""
    return {
        "ID": svc.id,
        "Service": svc.name,
        "Tags": list(svc.tags),
        "Address": svc.address,
        "Meta": dict(svc.meta),
        "Port": svc.port,
        "Weights": {"Passing": svc.weight, "Warning": svc.weight_warning},
        "EnableTagOverride": False,
        "Datacenter": node.datacenter,
        "Locality": {"Region": node.region, "Zone": node.az},
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def check_json(
    check: CheckState, node: Node, svc: ServiceInstance | None, index: int = 0
) -> dict[str, Any]:
    """A check as ``/v1/agent/checks`` and ``/v1/health/service`` show it."""
    return {
        "Node": node.name,
        "CheckID": check.id,
        "Name": check.name,
        "Status": check.status.value,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": svc.name if svc else "",
        "ServiceTags": list(svc.tags) if svc else [],
        "Type": check.kind,
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def catalog_service_json(view: InstanceView, node_id: str = "", index: int = 0) -> dict[str, Any]:
    """One entry of ``/v1/catalog/service/<name>``."""
    node, svc = view.node, view.instance
    return {
        "ID": node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": {"lan": node.address, "wan": node.address},
        "NodeMeta": dict(node.meta),
        "ServiceKind": "",
        "ServiceID": svc.id,
        "ServiceName": svc.name,
        "ServiceTags": list(svc.tags),
        "ServiceAddress": svc.address,
        "ServiceWeights": {"Passing": svc.weight, "Warning": svc.weight_warning},
        "ServiceMeta": dict(svc.meta),
        "ServicePort": svc.port,
        "ServiceEnableTagOverride": False,
        "ServiceLocality": {"Region": node.region, "Zone": node.az},
        "CreateIndex": index,
        "ModifyIndex": index,
    }
