"""The agent's local HTTP API: a Consul-compatible subset, /ready and /metrics.

Paths, JSON field names, status codes, ``X-Consul-Index`` and blocking
queries (``?index=&wait=``) follow Consul's agent, health and catalog APIs so
that Consul clients work unchanged. Errors are one line of text with Consul's
status codes: 400 for a bad body or parameter, 404 for an unknown id, 405 for
a wrong method.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from hostmesh import __version__
from hostmesh._config import MINUTES, parse_duration
from hostmesh._errors import NotFoundError, ValidationError
from hostmesh._httpserver import Request, Response, clamp_wait
from hostmesh.catalog import Health, healthy_instances, service_instances, service_names
from hostmesh.catalog._messages import KeyringOp

from ._consul import (
    catalog_service_json,
    check_json,
    node_json,
    service_from_consul,
    service_json,
)
from ._daemon import Agent, jittered_wait
from ._state import SOURCE_API

if TYPE_CHECKING:
    from ._certs import NodeCertificate

__all__ = ["AgentApi"]

#: Consul's default blocking-query wait.
DEFAULT_WAIT = 5 * MINUTES
#: The synthetic node-level check Consul reports for gossip liveness.
SERF_CHECK_ID = "serfHealth"

Route = Callable[[Request, str], Awaitable[Response]]

#: Serf's member status numbers, as Consul reports them (suspect shows as alive).
_SERF_STATUS = {"ALIVE": 1, "SUSPECT": 1, "LEFT": 3, "DEAD": 4}


class AgentApi:
    """Request handlers over an :class:`Agent`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._requests = agent.metrics.counter(
            "hostmesh_api_requests_total",
            "Agent API requests by route and status",
            ("route", "code"),
        )
        # (method, compiled path, handler name for metrics, handler)
        self._routes: list[tuple[str, re.Pattern[str], str, Route]] = []
        add = self._add
        add("PUT", r"/v1/agent/service/register", self.register)
        add("PUT", r"/v1/agent/service/deregister/(?P<a>[^/]+)", self.deregister)
        add("GET", r"/v1/agent/services", self.agent_services)
        add("GET", r"/v1/agent/service/(?!register$)(?P<a>[^/]+)", self.agent_service)
        add("GET", r"/v1/agent/checks", self.agent_checks)
        add("PUT", r"/v1/agent/check/(?P<a>pass|warn|fail)/(?P<b>[^/]+)", self.check_ttl)
        add("PUT", r"/v1/agent/check/update/(?P<b>[^/]+)", self.check_update)
        add("GET", r"/v1/agent/self", self.agent_self)
        add("GET", r"/v1/agent/certificate", self.certificate)
        add("PUT", r"/v1/agent/certificate/renew", self.certificate_renew)
        add("GET", r"/v1/agent/members", self.agent_members)
        for method in ("GET", "POST", "PUT", "DELETE"):
            add(method, r"/v1/operator/keyring", self.keyring)
        add("GET", r"/v1/health/service/(?P<a>[^/]+)", self.health_service)
        add("GET", r"/v1/catalog/services", self.catalog_services)
        add("GET", r"/v1/catalog/service/(?P<a>[^/]+)", self.catalog_service)
        add("GET", r"/v1/catalog/nodes", self.catalog_nodes)
        add("GET", r"/ready", self.ready)
        add("GET", r"/metrics", self.prom_metrics)

    def _add(self, method: str, pattern: str, handler: Callable[..., Awaitable[Response]]) -> None:
        self._routes.append((method, re.compile(pattern), pattern.split("(")[0], handler))

    async def handle(self, req: Request) -> Response:
        allowed = []
        for method, pattern, name, handler in self._routes:
            match = pattern.fullmatch(req.path)
            if match is None:
                continue
            if req.method != method and not (method == "GET" and req.method == "HEAD"):
                allowed.append(method)
                continue
            try:
                response = await handler(req, *match.groups())
            except ValidationError as exc:
                response = Response.text(str(exc), 400)
            except NotFoundError as exc:
                response = Response.text(str(exc), 404)
            self._requests.labels(name, str(response.status)).inc()
            return response
        if allowed:
            self._requests.labels("other", "405").inc()
            return Response.text(
                f"method {req.method} not allowed", 405, [("allow", ", ".join(allowed))]
            )
        self._requests.labels("other", "404").inc()
        return Response.text(f"no such endpoint: {req.path}", 404)

    # --- helpers ----------------------------------------------------------------

    async def _blocking(self, req: Request, produce: Callable[[], Any]) -> Response:
        """Answer ``produce()`` with X-Consul-Index, after blocking if ``?index=`` asks."""
        index_arg = req.arg("index")
        if index_arg:
            try:
                min_index = int(index_arg)
                if min_index < 0:
                    raise ValueError
            except ValueError:
                raise ValidationError(f"Invalid index {index_arg!r}") from None
            wait_arg = req.arg("wait")
            try:
                wait = parse_duration(wait_arg) if wait_arg else DEFAULT_WAIT
            except ValueError as exc:
                raise ValidationError(f"Invalid wait time: {exc}") from None
            wait = clamp_wait(wait, self.agent.config.api.max_blocking_wait)
            if min_index > 0:
                await self.agent.wait_for_index(min_index, jittered_wait(wait, random.random()))
        index = self.agent.catalog.index
        return Response.json(
            produce(),
            headers=[
                ("X-Consul-Index", str(index)),
                ("X-Consul-KnownLeader", "true"),
                ("X-Consul-LastContact", "0"),
            ],
        )

    def _tags(self, req: Request) -> list[str]:
        return [t for t in req.query.get("tag", []) if t]

    # --- agent ------------------------------------------------------------------

    async def register(self, req: Request) -> Response:
        try:
            body = req.json()
        except ValueError as exc:
            raise ValidationError(f"Request decode failed: {exc}") from None
        defn = service_from_consul(body)
        self.agent.register(defn, SOURCE_API)
        return Response(200)

    async def deregister(self, req: Request, instance_id: str) -> Response:
        self.agent.deregister(instance_id)
        return Response(200)

    async def agent_services(self, req: Request) -> Response:
        rec = self.agent.state.record
        return Response.json({s.id: service_json(s, rec.node) for s in rec.services})

    async def agent_service(self, req: Request, instance_id: str) -> Response:
        rec = self.agent.state.record
        svc = rec.service(instance_id)
        if svc is None:
            raise NotFoundError(f'unknown service ID "{instance_id}"')
        return Response.json(service_json(svc, rec.node))

    async def agent_checks(self, req: Request) -> Response:
        rec = self.agent.state.record
        return Response.json(
            {c.id: check_json(c, rec.node, rec.service(c.service_id)) for c in rec.checks}
        )

    def _ttl(self, check_id: str, status: Health, output: str) -> Response:
        self.agent.state.check(check_id)  # 404 for an unknown id
        self.agent.runner(check_id).ttl_update(status, output)
        return Response(200)

    async def check_ttl(self, req: Request, verb: str, check_id: str) -> Response:
        status = {"pass": Health.PASSING, "warn": Health.WARNING, "fail": Health.CRITICAL}[verb]
        return self._ttl(check_id, status, req.arg("note") or "")

    async def check_update(self, req: Request, check_id: str) -> Response:
        try:
            body = req.json() if req.body else {}
        except ValueError as exc:
            raise ValidationError(f"Request decode failed: {exc}") from None
        if not isinstance(body, dict):
            raise ValidationError("Request decode failed: expected a JSON object")
        fields = {k.lower(): v for k, v in body.items()}
        status_text = fields.get("status")
        output = fields.get("output", "")
        try:
            status = Health(status_text)
        except ValueError:
            raise ValidationError(f"Invalid check status: {status_text!r}") from None
        if not isinstance(output, str):
            raise ValidationError("Output: expected a string")
        return self._ttl(check_id, status, output)

    async def agent_self(self, req: Request) -> Response:
        cfg = self.agent.config
        node = self.agent.state.record.node
        api = self.agent.addresses.api if self.agent.addresses else ("", 0)
        return Response.json(
            {
                "Config": {
                    "Datacenter": cfg.datacenter,
                    "NodeName": node.name,
                    "NodeID": node.id,
                    "Server": False,
                    "Revision": "",
                    "Version": __version__,
                    "Product": "hostmesh",
                },
                "Member": {
                    "Name": node.name,
                    "Addr": node.address,
                    "Port": 0,
                    "Status": 1,
                    "Tags": {"role": "node", "dc": cfg.datacenter, "az": node.az},
                },
                "Meta": dict(node.meta),
                "Locality": {"Region": node.region, "Zone": node.az},
                "Hostmesh": {
                    "Generation": self.agent.state.record.generation,
                    "Version": self.agent.state.record.version,
                    "API": f"{api[0]}:{api[1]}",
                },
            }
        )

    async def certificate(self, req: Request) -> Response:
        """This node's certificate (hostmesh's; Consul has no node certificates)."""
        cert = self.agent.node_credentials()
        if cert is None:
            return Response.text("this agent has no node certificate", 404)
        return Response.json(_certificate_json(cert))

    async def certificate_renew(self, req: Request) -> Response:
        """Renew the node certificate now; answers the new one."""
        from hostmesh._errors import AuthError, CertificateError

        try:
            cert = await self.agent.renew_certificate()
        except AuthError as exc:
            return Response.text(f"renewal refused: {exc}", 403)
        except CertificateError as exc:
            return Response.text(str(exc), 409)
        return Response.json(_certificate_json(cert))

    async def agent_members(self, req: Request) -> Response:
        """Consul's member list (Serf status numbers) plus hostmesh's State and Incarnation."""
        gossip = self.agent.gossip
        members = gossip.swim.members.values() if gossip else []
        out = []
        for m in sorted(members, key=lambda m: m.name):
            host, _, port = m.addr.rpartition(":")
            out.append(
                {
                    "Name": m.name,
                    "Addr": host.strip("[]"),
                    "Port": int(port),
                    "Tags": {"role": "node", "az": m.meta.get("az", ""),
                             "region": m.meta.get("region", "")},
                    "Status": _SERF_STATUS[m.status.name],
                    "State": m.status.name.lower(),
                    "Incarnation": m.incarnation,
                }
            )  # fmt: skip
        return Response.json(out)

    async def keyring(self, req: Request) -> Response:
        """Consul's keyring endpoint: GET lists, POST installs, PUT uses, DELETE removes.

        The operation is rolled across every member through gossip; the answer
        counts the members holding each key, as Consul's does.
        """
        gossip = self.agent.gossip
        if gossip is None:
            raise ValidationError("gossip is not running")
        op = {"GET": KeyringOp.LIST, "POST": KeyringOp.INSTALL, "PUT": KeyringOp.USE,
              "DELETE": KeyringOp.REMOVE}[req.method]  # fmt: skip
        key = ""
        if op is not KeyringOp.LIST:
            if not gossip.keyring.enabled:
                raise ValidationError(
                    "encryption is off: set gossip.keyring on every agent first "
                    "(keys would otherwise travel in clear text)"
                )
            try:
                body = req.json()
            except ValueError as exc:
                raise ValidationError(f"Request decode failed: {exc}") from None
            given = body.get("Key") if isinstance(body, dict) else None
            if not isinstance(given, str) or not given:
                raise ValidationError('expected a body {"Key": "<base64 AES-256 key>"}')
            key = given
        answers, expected = await gossip.keyring_operation(op, key)
        keys: dict[str, int] = {}
        primaries: dict[str, int] = {}
        for answer in answers:
            for i, k in enumerate(answer.keys):
                keys[k] = keys.get(k, 0) + 1
                if i == 0:
                    primaries[k] = primaries.get(k, 0) + 1
        errors = {a.node: a.error for a in answers if not a.ok}
        missing = expected - len(answers)
        if op is not KeyringOp.LIST and (errors or missing):
            detail = "; ".join(f"{n}: {e}" for n, e in sorted(errors.items()))
            return Response.text(
                f"{len(errors)} member(s) failed, {missing} did not answer"
                + (f": {detail}" if detail else ""), 500)  # fmt: skip
        return Response.json(
            [
                {
                    "WAN": False,
                    "Datacenter": self.agent.config.datacenter,
                    "Segment": "",
                    "Keys": keys,
                    "PrimaryKeys": primaries,
                    "NumNodes": expected,
                    "NumResp": len(answers),
                    "NumErr": len(errors),
                    "Messages": errors,
                }
            ]
        )

    # --- health and catalog -----------------------------------------------------

    async def health_service(self, req: Request, name: str) -> Response:
        passing = req.has("passing") and (req.arg("passing") or "").lower() not in ("0", "false")
        tags = self._tags(req)

        def produce() -> list[dict[str, Any]]:
            catalog = self.agent.catalog
            if passing:
                views = healthy_instances(catalog, name, tags=tags, passing_only=True)
            else:
                views = service_instances(catalog, name, tags=tags)
            out = []
            for v in views:
                serf: dict[str, Any] = {
                    "Node": v.node.name,
                    "CheckID": SERF_CHECK_ID,
                    "Name": "Serf Health Status",
                    "Status": "passing" if v.node_live else "critical",
                    "Notes": "",
                    "Output": "Agent alive and reachable" if v.node_live else "Agent not live",
                    "ServiceID": "",
                    "ServiceName": "",
                    "ServiceTags": [],
                    "Type": "",
                }
                out.append(
                    {
                        "Node": node_json(v.node, v.node.id),
                        "Service": service_json(v.instance, v.node),
                        "Checks": [serf] + [check_json(c, v.node, v.instance) for c in v.checks],
                    }
                )
            return out

        return await self._blocking(req, produce)

    async def catalog_services(self, req: Request) -> Response:
        return await self._blocking(req, lambda: service_names(self.agent.catalog))

    async def catalog_service(self, req: Request, name: str) -> Response:
        tags = self._tags(req)
        return await self._blocking(
            req,
            lambda: [
                catalog_service_json(v, v.node.id)
                for v in service_instances(self.agent.catalog, name, tags=tags)
            ],
        )

    async def catalog_nodes(self, req: Request) -> Response:
        return await self._blocking(
            req, lambda: [node_json(n, n.id) for n in self.agent.catalog.nodes()]
        )

    # --- operations -------------------------------------------------------------

    async def ready(self, req: Request) -> Response:
        if self.agent.ready:
            return Response.text("ready")
        return Response.text("starting", 503)

    async def prom_metrics(self, req: Request) -> Response:
        return Response(
            200,
            self.agent.metrics.render().encode(),
            content_type="text/plain; version=0.0.4; charset=utf-8",
        )


def _certificate_json(cert: NodeCertificate) -> dict[str, Any]:
    leaf = cert.cert
    return {
        "Identity": str(cert.identity.spiffe_id),
        "Serial": f"{leaf.serial_number:x}",
        "NotBefore": leaf.not_valid_before_utc.isoformat(),
        "NotAfter": leaf.not_valid_after_utc.isoformat(),
        "RenewAt": cert.renew_at.isoformat(),
    }
