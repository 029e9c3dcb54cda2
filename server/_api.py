"""The server's management API: tokens, config, KV, external services, the CA and joins.

Every path under ``/v1/`` except ``/v1/status/leader`` comes here from
:meth:`hostmesh.server.Server.handle`. Authentication:

- ``Authorization: Bearer <token>`` or Consul's ``X-Consul-Token: <token>``.
  Management tokens may use every endpoint below except ``/v1/ca/renew``; join
  tokens only ``POST /v1/ca/sign``, for node names their pattern allows.
- ``POST /v1/ca/renew`` is authenticated by the TLS client certificate: the
  request's ``peer_identity``, which the TLS listener sets after verifying the
  chain against the CA's roots and the revocation list (server/_listener.py).
- ``GET /v1/ca/roots`` and ``GET /v1/ca/revocations`` are public, as a CA
  bundle and a CRL are: a joining agent checks the roots against its pin.

Endpoints (auth M = management token, J = join token, C = client certificate, - = none)::

    GET     /v1/tokens                                M  -> [token]
    POST    /v1/tokens                                M  {kind, description, ttl, node_pattern,
                                                          secret?} -> token + secret (shown once)
    DELETE  /v1/tokens/<accessor>                     M  -> token
    GET     /v1/config/traffic                        M  -> {service: {policy, modify_index}}
    GET     /v1/config/traffic/<service>              M  -> {service, policy, *_index}
    PUT     /v1/config/traffic/<service>[?cas=N]      M  [traffic.<service>] as JSON
    DELETE  /v1/config/traffic/<service>[?cas=N]      M
    GET     /v1/config/intentions                     M  -> [intention]; the default policy
                                                          ([intentions] default) in the header
                                                          X-Hostmesh-Intentions-Default
    GET|PUT|DELETE /v1/config/intentions/<src>/<dst>  M  {action, http: {path_prefix, methods},
                                                          description}
    GET     /v1/catalog/external                      M  -> [service]
    GET|PUT|DELETE /v1/catalog/external/<id>          M  a services.d service + az, region
                                                          (http/tcp checks; server/_external.py)
    *       /v1/kv/<key>                              M  Consul's KV API
    GET     /v1/ca/roots                              -  -> {trust_domain, roots, roots_pem, ...}
    GET     /v1/ca/revocations                        -  -> the revocation list (with revision)
    POST    /v1/ca/sign                               J  {node, csr} -> {chain, roots, ...}
    POST    /v1/ca/renew                              C  {csr} -> {chain, roots, ...}
    POST    /v1/ca/rotate                             M  -> {root, pin, overlap_ends}
    POST    /v1/node/<node>/revoke                    M  -> {node, revoked, revision}
    PUT|POST /v1/agent/force-leave/<node>             M  -> {node, left: true} (Consul's path;
                                                          server/_health.py)

Writes take ``?cas=<modify_index>`` (0: create only). A mismatch is ``409
Conflict`` with the current ``modify_index`` in the body (the CLI can say who
won); Consul's KV API keeps Consul's answer, ``200 false``. Reads carry
``X-Consul-Index`` (the store revision). Errors are one line of text with a
status: 400 bad input, 401 no/unknown/expired token or client certificate,
403 a token that may not do this, 404, 405, 409, 413, 429 (CSR rate limit,
with ``Retry-After``), 503 store unavailable. Every refusal of hostile input
is counted on ``/metrics`` and writes nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization

from hostmesh._config import (
    FieldError,
    ServiceDefinition,
    _check_name,
    from_mapping,
    parse_duration,
)
from hostmesh._errors import (
    AuthError,
    CaStateError,
    CertificateError,
    ConfigError,
    CsrRejectedError,
    NotFoundError,
    RateLimitedError,
    StoreError,
    StoreUnavailable,
    StoreValueError,
    ValidationError,
)
from hostmesh._httpserver import Request, Response
from hostmesh._log import get_logger
from hostmesh._metrics import Registry
from hostmesh._pki import NodeIdentity, spki_pin, validate_node_name
from hostmesh._routes import TrafficPolicy
from hostmesh.agent._intentions import (  # the model; sans-IO, shared with agents
    INTENTIONS_PREFIX,
    Intention,
)

from ._ca import CsrRateLimiter, IssuedCertificate
from ._ca_store import CaKeeper
from ._external import (
    EXTERNAL_PREFIX,
    REFUSED_CHECK_KINDS,
    check_targets,
    external_node_name,
)
from ._store import MAX_VALUE, Store
from ._tokens import Token, TokenStore

__all__ = [
    "EXTERNAL_PREFIX",
    "INTENTIONS_DEFAULT_HEADER",
    "INTENTIONS_PREFIX",
    "TRAFFIC_PREFIX",
    "Intention",
    "ManagementApi",
]

log = get_logger("hostmesh.server.api")

TRAFFIC_PREFIX = "config/traffic/"
#: The header of GET /v1/config/intentions that carries [intentions] default (allow|deny).
INTENTIONS_DEFAULT_HEADER = "X-Hostmesh-Intentions-Default"

Handler = Callable[[Request], Awaitable[Response]]
#: An API handler: the request and the parts its path pattern captured.
Route = Callable[[Request, tuple[str, ...]], Awaitable[Response]]


def _now() -> datetime:
    return datetime.now(UTC)


class _Refused(Exception):
    """A request refused with ``status`` and a one-line ``message``; ``counter`` names why."""

    def __init__(
        self,
        status: int,
        message: str,
        counter: str = "",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.counter = counter
        self.headers = headers or []


def _body(req: Request) -> dict[str, Any]:
    try:
        body = req.json()
    except ValueError as exc:
        raise _Refused(400, str(exc), "bad-json") from None
    if not isinstance(body, dict):
        raise _Refused(400, "the body must be a JSON object", "bad-json")
    return body


def _cas(req: Request) -> int | None:
    arg = req.arg("cas")
    if arg is None:
        return None
    if not (arg.isascii() and arg.isdigit()) or len(arg) > 19:
        raise _Refused(400, f"invalid cas {arg!r}: expected a modify index >= 0", "bad-cas")
    return int(arg)


def _issued_json(ca_mesh: str, issued: IssuedCertificate, roots_pem: bytes) -> dict[str, Any]:
    return {
        "node": issued.node,
        "trust_domain": ca_mesh,
        "serial": format(issued.serial, "x"),
        "chain": issued.chain_pem().decode(),
        "roots": roots_pem.decode(),
        "not_after": issued.not_after.isoformat(),
        "renew_at": issued.renew_at.isoformat(),
    }


class ManagementApi:
    """The handlers. The server owns the store, tokens and CA; this only uses them.

    Args:
        kv: Consul's KV API handler (already written, in the server), run after
            the management-token check.
        clock: monotonic seconds for the CSR rate limiter.
        intentions_default: ``[intentions] default``, sent with the intentions list.
    """

    def __init__(
        self,
        *,
        store: Store,
        tokens: TokenStore,
        keeper: CaKeeper,
        kv: Handler,
        metrics: Registry,
        csr_rate: float,
        now: Callable[[], datetime] = _now,
        clock: Callable[[], float] = trio.current_time,
        force_leave: Callable[[str], Awaitable[object]] | None = None,
        intentions_default: str = "allow",
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.keeper = keeper
        self.kv = kv
        self.now = now
        self.clock = clock
        self.limiter = CsrRateLimiter(csr_rate)
        self._force_leave = force_leave
        self.intentions_default = intentions_default  # [intentions] default
        self.requests = metrics.counter(
            "hostmesh_server_api_requests_total",
            "Management API requests by endpoint and status code.",
            ("endpoint", "code"),
        )
        self.auth_failures = metrics.counter(
            "hostmesh_server_auth_failures_total",
            "Requests refused for their credentials: missing, invalid, expired, forbidden,"
            " certificate (no or a refused client certificate).",
            ("reason",),
        )
        self.bad_requests = metrics.counter(
            "hostmesh_server_bad_requests_total",
            "Requests refused for their content (bad JSON, invalid config, bad CSR, ...).",
            ("endpoint", "reason"),
        )
        self.certificates = metrics.counter(
            "hostmesh_server_certificates_total",
            "Node certificate requests by endpoint (sign = join, renew) and result.",
            ("endpoint", "result"),
        )
        self.cas_conflicts = metrics.counter(
            "hostmesh_server_cas_conflicts_total",
            "Writes refused because ?cas= did not match (another operator wrote first).",
            ("endpoint",),
        )
        M, J, P, N = "management", "join", "peer", "none"
        self._routes: list[tuple[re.Pattern[str], str, dict[str, tuple[str, Route]]]] = []
        add = self._add
        add(r"/v1/tokens", "tokens", {"GET": (M, self.token_list), "POST": (M, self.token_create)})
        add(r"/v1/tokens/([0-9a-f]{1,64})", "tokens", {"DELETE": (M, self.token_revoke)})
        add(r"/v1/config/traffic", "traffic", {"GET": (M, self.traffic_list)})
        add(
            r"/v1/config/traffic/([^/]+)",
            "traffic",
            {"GET": (M, self.traffic_get), "PUT": (M, self.traffic_put),
             "DELETE": (M, self.traffic_delete)},
        )  # fmt: skip
        add(r"/v1/config/intentions", "intentions", {"GET": (M, self.intention_list)})
        add(
            r"/v1/config/intentions/([^/]+)/([^/]+)",
            "intentions",
            {"GET": (M, self.intention_get), "PUT": (M, self.intention_put),
             "DELETE": (M, self.intention_delete)},
        )  # fmt: skip
        add(r"/v1/catalog/external", "external", {"GET": (M, self.external_list)})
        add(
            r"/v1/catalog/external/([^/]+)",
            "external",
            {"GET": (M, self.external_get), "PUT": (M, self.external_put),
             "DELETE": (M, self.external_delete)},
        )  # fmt: skip
        add(r"/v1/kv/.*", "kv", {m: (M, self._kv) for m in ("GET", "PUT", "DELETE")})
        add(r"/v1/ca/roots", "ca_roots", {"GET": (N, self.ca_roots)})
        add(r"/v1/ca/revocations", "ca_revocations", {"GET": (N, self.ca_revocations)})
        add(r"/v1/ca/sign", "ca_sign", {"POST": (J, self.ca_sign)})
        add(r"/v1/ca/renew", "ca_renew", {"POST": (P, self.ca_renew)})
        add(r"/v1/ca/rotate", "ca_rotate", {"POST": (M, self.ca_rotate)})
        add(r"/v1/node/([^/]+)/revoke", "node_revoke", {"POST": (M, self.node_revoke)})
        add(r"/v1/agent/force-leave/([^/]+)", "force_leave",
            {"PUT": (M, self.force_leave), "POST": (M, self.force_leave)})  # fmt: skip

    def _add(self, pattern: str, name: str, methods: dict[str, tuple[str, Route]]) -> None:
        self._routes.append((re.compile(pattern), name, methods))

    # --- dispatch -----------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        """Answer a ``/v1/`` request (404 for paths that are not the API's)."""
        for pattern, name, methods in self._routes:
            match = pattern.fullmatch(req.path)
            if match is None:
                continue
            if req.method not in methods:
                allow = ", ".join(methods)
                response = Response.text(
                    f"method {req.method} not allowed on {req.path}", 405, [("allow", allow)]
                )
            else:
                auth, handler = methods[req.method]
                response = await self._run(
                    req, name, auth, handler, tuple(g or "" for g in match.groups())
                )
            self.requests.labels(name, str(response.status)).inc()
            return response
        return Response.text(f"no such endpoint: {req.path}", 404)

    async def _kv(self, req: Request, args: tuple[str, ...]) -> Response:
        return await self.kv(req)

    async def _run(
        self, req: Request, name: str, auth: str, handler: Route, args: tuple[str, ...]
    ) -> Response:
        try:
            if auth == "management":
                token = await self._authenticate(req)
                if token.kind != "management":
                    raise AuthError("forbidden", f"a {token.kind} token may not use {req.path}")
            return await handler(req, args)
        except AuthError as exc:
            self.auth_failures.labels(exc.reason).inc()
            log.warning("request refused", path=req.path, peer=req.peer, reason=exc.reason)
            status = 403 if exc.reason == "forbidden" else 401
            headers = [("www-authenticate", "Bearer")] if status == 401 else []
            return Response.text(str(exc), status, headers)
        except _Refused as exc:
            if exc.counter:
                self.bad_requests.labels(name, exc.counter).inc()
            return Response.text(exc.message, exc.status, exc.headers)
        except (ValidationError, ConfigError) as exc:
            self.bad_requests.labels(name, "invalid").inc()
            return Response.text(str(exc), 400)
        except NotFoundError as exc:
            return Response.text(str(exc), 404)
        except StoreValueError as exc:
            self.bad_requests.labels(name, "store-limit").inc()
            return Response.text(str(exc), 400)
        except StoreUnavailable as exc:
            log.warning("store unavailable", error=str(exc))
            return Response.text(f"store unavailable: {exc}", 503)
        except (StoreError, CaStateError) as exc:
            log.error("server state error", path=req.path, error=str(exc))
            return Response.text(f"server error: {exc}", 500)

    async def _authenticate(self, req: Request) -> Token:
        return await self.tokens.authenticate(bearer_token(req))

    # --- helpers ------------------------------------------------------------------

    async def _index(self) -> list[tuple[str, str]]:
        return [("X-Consul-Index", str(await self.store.current_revision()))]

    async def _write(
        self, req: Request, endpoint: str, key: str, value: bytes, extra: dict[str, Any]
    ) -> Response:
        if len(value) > MAX_VALUE:
            raise _Refused(
                413, f"the value is {len(value)} bytes; at most {MAX_VALUE}", "too-large"
            )
        cas = _cas(req)
        rev = await self.store.put(key, value, cas=cas)
        if rev is None:
            return await self._conflict(endpoint, key, cas)
        return Response.json({**extra, "modify_index": rev})

    async def _delete(self, req: Request, endpoint: str, key: str, what: str) -> Response:
        cas = _cas(req)
        if await self.store.delete(key, cas=cas):
            return Response.json({"deleted": True})
        if cas is not None and await self.store.get(key) is not None:
            return await self._conflict(endpoint, key, cas)
        raise NotFoundError(f"no {what}")

    async def _conflict(self, endpoint: str, key: str, cas: int | None) -> Response:
        self.cas_conflicts.labels(endpoint).inc()
        entry = await self.store.get(key)
        current = entry.mod_revision if entry else 0
        where = f"modify index {current}" if entry else "it does not exist"
        return Response.json(
            {
                "error": f"cas {cas} does not match: {where} (someone else changed it;"
                " read it again and retry)",
                "modify_index": current,
            },
            409,
        )

    async def _read(self, key: str, what: str, field_name: str) -> Response:
        entry = await self.store.get(key)
        index = await self._index()
        if entry is None:
            return Response.text(f"no {what}", 404, index)
        return Response.json(
            {
                field_name: json.loads(entry.value),
                "create_index": entry.create_revision,
                "modify_index": entry.mod_revision,
            },
            headers=index,
        )

    # --- tokens -------------------------------------------------------------------

    async def token_list(self, req: Request, args: tuple[str, ...]) -> Response:
        tokens = await self.tokens.list()
        return Response.json([t.to_json() for t in tokens], headers=await self._index())

    async def token_create(self, req: Request, args: tuple[str, ...]) -> Response:
        body = _body(req)
        unknown = set(body) - {"kind", "description", "ttl", "node_pattern", "secret"}
        if unknown:
            raise _Refused(400, f"unknown field(s): {', '.join(sorted(unknown))}", "invalid")
        for name in ("kind", "description", "node_pattern", "secret"):
            if name in body and not isinstance(body[name], str):
                raise _Refused(400, f"{name} must be a string", "invalid")
        ttl = None
        if body.get("ttl") not in (None, "", 0):
            try:
                ttl = parse_duration(body["ttl"])
            except ValueError as exc:
                raise _Refused(400, f"ttl: {exc}", "invalid") from None
        secret, token = await self.tokens.create(
            body.get("kind", "join"),
            description=body.get("description", ""),
            ttl=ttl,
            node_pattern=body.get("node_pattern", ""),
            secret=body.get("secret"),
        )
        log.info("token created", accessor=token.accessor, kind=token.kind)
        return Response.json({**token.to_json(), "secret": secret})

    async def token_revoke(self, req: Request, args: tuple[str, ...]) -> Response:
        token = await self.tokens.revoke(args[0])
        log.info("token revoked", accessor=token.accessor, kind=token.kind)
        return Response.json(token.to_json())

    # --- traffic (routes and splits) ----------------------------------------------

    async def traffic_list(self, req: Request, args: tuple[str, ...]) -> Response:
        out = {
            e.key.removeprefix(TRAFFIC_PREFIX): {
                "policy": json.loads(e.value),
                "modify_index": e.mod_revision,
            }
            for e in await self.store.list(TRAFFIC_PREFIX)
        }
        return Response.json(out, headers=await self._index())

    def _service(self, args: tuple[str, ...]) -> str:
        name = args[0]
        try:
            _check_name(name, "service")
        except FieldError as exc:
            raise _Refused(400, exc.reason, "invalid") from None
        return name

    async def traffic_get(self, req: Request, args: tuple[str, ...]) -> Response:
        service = self._service(args)
        response = await self._read(TRAFFIC_PREFIX + service, f"traffic policy for {service!r}",
                                    "policy")  # fmt: skip
        if response.status == 200:
            doc = json.loads(response.body)
            response = Response.json({"service": service, **doc}, headers=response.headers)
        return response

    async def traffic_put(self, req: Request, args: tuple[str, ...]) -> Response:
        service = self._service(args)
        # The agent's own parser for [traffic.<service>]: one set of rules, one set of messages.
        policy = from_mapping(TrafficPolicy, _body(req), source=f"traffic.{service}")
        value = json.dumps(policy.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return await self._write(req, "traffic", TRAFFIC_PREFIX + service, value,
                                 {"service": service})  # fmt: skip

    async def traffic_delete(self, req: Request, args: tuple[str, ...]) -> Response:
        service = self._service(args)
        return await self._delete(req, "traffic", TRAFFIC_PREFIX + service,
                                  f"traffic policy for {service!r}")  # fmt: skip

    # --- intentions ---------------------------------------------------------------

    def _pair(self, args: tuple[str, ...]) -> tuple[str, str]:
        source, destination = args
        try:
            Intention(source=source, destination=destination, action="allow")
        except FieldError as exc:
            raise _Refused(400, str(exc), "invalid") from None
        return source, destination

    async def intention_list(self, req: Request, args: tuple[str, ...]) -> Response:
        items = [json.loads(e.value) for e in await self.store.list(INTENTIONS_PREFIX)]
        headers = [*await self._index(), (INTENTIONS_DEFAULT_HEADER, self.intentions_default)]
        return Response.json(items, headers=headers)

    async def intention_get(self, req: Request, args: tuple[str, ...]) -> Response:
        source, destination = self._pair(args)
        return await self._read(f"{INTENTIONS_PREFIX}{destination}/{source}",
                                f"intention {source} -> {destination}", "intention")  # fmt: skip

    async def intention_put(self, req: Request, args: tuple[str, ...]) -> Response:
        source, destination = self._pair(args)
        body = _body(req)
        for name, given in (("source", source), ("destination", destination)):
            if name in body and body[name] != given:
                raise _Refused(400, f"{name} in the body differs from the path", "invalid")
        body = {**body, "source": source, "destination": destination}
        intention = from_mapping(Intention, body, source=f"intention {source} -> {destination}")
        value = json.dumps(intention.to_json(), sort_keys=True).encode()
        return await self._write(req, "intentions", f"{INTENTIONS_PREFIX}{destination}/{source}",
                                 value, {"source": source, "destination": destination})  # fmt: skip

    async def intention_delete(self, req: Request, args: tuple[str, ...]) -> Response:
        source, destination = self._pair(args)
        return await self._delete(req, "intentions", f"{INTENTIONS_PREFIX}{destination}/{source}",
                                  f"intention {source} -> {destination}")  # fmt: skip

    # --- external services --------------------------------------------------------

    def _external_id(self, args: tuple[str, ...]) -> str:
        ident = args[0]
        try:
            _check_name(ident, "id")
        except FieldError as exc:
            raise _Refused(400, exc.reason, "invalid") from None
        return ident

    async def external_list(self, req: Request, args: tuple[str, ...]) -> Response:
        items = [json.loads(e.value) for e in await self.store.list(EXTERNAL_PREFIX)]
        return Response.json(items, headers=await self._index())

    async def external_get(self, req: Request, args: tuple[str, ...]) -> Response:
        ident = self._external_id(args)
        return await self._read(EXTERNAL_PREFIX + ident, f"external service {ident!r}", "service")

    async def external_put(self, req: Request, args: tuple[str, ...]) -> Response:
        ident = self._external_id(args)
        body = _body(req)
        if body.get("id", ident) != ident:
            raise _Refused(400, "id in the body differs from the path", "invalid")
        placement = {k: body.pop(k) for k in ("az", "region") if k in body}
        for k, v in placement.items():
            if not isinstance(v, str) or len(v) > 64:
                raise _Refused(400, f"{k} must be a string of at most 64 characters", "invalid")
        body["id"] = ident
        definition = from_mapping(ServiceDefinition, body, source=f"external service {ident}")
        if not definition.address:
            raise _Refused(400, "an external service needs an address (it has no agent)", "invalid")
        try:
            external_node_name(ident)  # its node in the catalog (server/_external.py)
        except ValidationError as exc:
            raise _Refused(400, f"id: {exc} (the service's node is external-<id>)",
                           "invalid") from None  # fmt: skip
        for i, check in enumerate(definition.checks):
            if check.kind in REFUSED_CHECK_KINDS:
                raise _Refused(400, f"checks[{i}]: {REFUSED_CHECK_KINDS[check.kind]}", "invalid")
        check_targets(definition)  # a ValidationError: 400
        value = json.dumps({**body, **placement}, sort_keys=True).encode()
        return await self._write(req, "external", EXTERNAL_PREFIX + ident, value, {"id": ident})

    async def external_delete(self, req: Request, args: tuple[str, ...]) -> Response:
        ident = self._external_id(args)
        return await self._delete(req, "external", EXTERNAL_PREFIX + ident,
                                  f"external service {ident!r}")  # fmt: skip

    # --- the CA -------------------------------------------------------------------

    async def ca_roots(self, req: Request, args: tuple[str, ...]) -> Response:
        await self.keeper.refresh(if_changed=True)  # another server may have rotated
        ca = self.keeper.ca
        roots = [
            {
                "pin": spki_pin(r.cert),
                "subject": r.cert.subject.rfc4514_string(),
                "not_before": r.cert.not_valid_before_utc.isoformat(),
                "not_after": r.cert.not_valid_after_utc.isoformat(),
                "active": r is ca.active,
                "pem": r.cert.public_bytes(serialization.Encoding.PEM).decode(),
            }
            for r in ca.root_entries
        ]
        overlap = ca.overlap_ends()
        body = {
            "trust_domain": ca.mesh,
            "active_pin": spki_pin(ca.active.cert),
            "roots": roots,
            "roots_pem": ca.bundle_pem().decode(),
            "overlap_ends": overlap.isoformat() if overlap else None,
        }
        return Response.json(body, headers=await self._index())

    async def ca_revocations(self, req: Request, args: tuple[str, ...]) -> Response:
        await self.keeper.refresh(if_changed=True)
        return Response(
            200,
            self.keeper.ca.revocations.to_bytes(),
            await self._index(),
            "application/json",
        )

    def _csr(self, body: dict[str, Any]) -> bytes:
        csr = body.get("csr")
        if not isinstance(csr, str) or not csr:
            raise _Refused(400, "csr (a PEM certificate signing request) is required", "invalid")
        return csr.encode("utf-8", "replace")

    def _rate_limit(self, endpoint: str) -> None:
        try:
            self.limiter.acquire(self.clock())
        except RateLimitedError as exc:
            self.certificates.labels(endpoint, "rate-limited").inc()
            retry = str(max(1, math.ceil(exc.retry_after)))
            raise _Refused(429, str(exc), headers=[("retry-after", retry)]) from None

    async def _issue(self, endpoint: str, csr: bytes, node: str) -> Response:
        now = self.now()
        try:
            issued = await self.keeper.update(lambda ca: ca.issue(csr, node, now=now))
        except CsrRejectedError as exc:
            self.certificates.labels(endpoint, "rejected").inc()
            raise _Refused(400, f"CSR refused: {exc}", "bad-csr") from None
        except CertificateError as exc:
            if isinstance(exc, CaStateError):
                raise
            self.certificates.labels(endpoint, "failed").inc()
            return Response.text(f"cannot issue: {exc}", 503)
        self.certificates.labels(endpoint, "issued").inc()
        log.info("node certificate issued", node=node, serial=format(issued.serial, "x"),
                 via=endpoint, not_after=issued.not_after.isoformat())  # fmt: skip
        ca = self.keeper.ca
        return Response.json(_issued_json(ca.mesh, issued, ca.bundle_pem()))

    async def ca_sign(self, req: Request, args: tuple[str, ...]) -> Response:
        """A join: a join token and a CSR for the node the token may be."""
        token = await self._authenticate(req)
        if token.kind != "join":
            raise AuthError(
                "forbidden", "joining needs a join token (hostmesh token create --kind join)"
            )
        body = _body(req)
        node = body.get("node")
        if not isinstance(node, str):
            raise _Refused(400, "node (the node name to join as) is required", "invalid")
        try:
            validate_node_name(node)
        except ValidationError as exc:
            raise _Refused(400, str(exc), "invalid") from None
        if not token.may_join_as(node):
            self.certificates.labels("sign", "forbidden").inc()
            raise AuthError(
                "forbidden",
                f"this join token may join as nodes matching {token.node_pattern!r}, not {node!r}",
            )
        csr = self._csr(body)
        self._rate_limit("sign")
        return await self._issue("sign", csr, node)

    async def ca_renew(self, req: Request, args: tuple[str, ...]) -> Response:
        """A renewal: the node's current certificate (mutual TLS) names the node."""
        identity = req.peer_identity
        if not isinstance(identity, NodeIdentity):
            self.certificates.labels("renew", "no-certificate").inc()
            raise AuthError(
                "certificate",
                "renewal needs a valid node certificate as TLS client certificate"
                " (an expired or revoked node joins again with a join token)",
            )
        if identity.mesh != self.keeper.ca.mesh:
            self.certificates.labels("renew", "identity").inc()
            raise AuthError("certificate", f"{identity} is not of mesh {self.keeper.ca.mesh!r}")
        csr = self._csr(_body(req))
        self._rate_limit("renew")
        return await self._issue("renew", csr, identity.node)

    async def ca_rotate(self, req: Request, args: tuple[str, ...]) -> Response:
        now = self.now()
        try:
            root = await self.keeper.update(lambda ca: ca.rotate(now=now))
        except CertificateError as exc:
            if isinstance(exc, CaStateError):
                raise
            return Response.text(str(exc), 409)
        ca = self.keeper.ca
        overlap = ca.overlap_ends()
        log.info("CA root rotated", pin=spki_pin(root))
        return Response.json(
            {
                "root": root.public_bytes(serialization.Encoding.PEM).decode(),
                "pin": spki_pin(root),
                "roots": len(ca.roots),
                "overlap_ends": overlap.isoformat() if overlap else None,
            }
        )

    async def node_revoke(self, req: Request, args: tuple[str, ...]) -> Response:
        node = args[0]
        try:
            validate_node_name(node)
        except ValidationError as exc:
            raise _Refused(400, str(exc), "invalid") from None
        now = self.now()
        revoked = await self.keeper.update(lambda ca: ca.revoke_node(node, now=now))
        log.info("node revoked", node=node, certificates=len(revoked))
        return Response.json(
            {
                "node": node,
                "revoked": [format(r.serial, "x") for r in revoked],
                "revision": self.keeper.ca.revocations.revision,
            }
        )

    async def force_leave(self, req: Request, args: tuple[str, ...]) -> Response:
        node = args[0]
        try:
            validate_node_name(node)
        except ValidationError as exc:
            raise _Refused(400, str(exc), "invalid") from None
        if self._force_leave is None:
            return Response.text("force-leave is not available on this server", 404)
        await self._force_leave(node)  # NotFoundError: 404
        return Response.json({"node": node, "left": True})


def bearer_token(req: Request) -> str | None:
    """The token of ``Authorization: Bearer <t>`` or ``X-Consul-Token: <t>``; None if neither."""
    auth = req.headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return ""  # present but unusable: "invalid", not "missing"
        return value.strip()
    consul = req.headers.get("x-consul-token")
    return consul.strip() if consul is not None else None
