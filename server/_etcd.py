"""The etcd store: etcd v3 through its JSON gateway, over httpx.

etcd serves a JSON mapping of its gRPC API on the client port (etcd 3.4:
``/v3/...``). What this module relies on:

- Requests are POSTs of JSON; keys and values are base64; 64-bit integers are
  decimal strings; fields at their zero value are left out of answers (a put
  event has no ``type``, a failed txn no ``succeeded``, a keepalive for a dead
  lease no ``TTL``).
- Errors are a non-200 status with ``{"error", "message", "code"}``, the code
  being gRPC's (3 invalid argument, 5 not found, 8 too large, 11 out of
  range, 14 unavailable).
- ``/v3/watch`` and ``/v3/lease/keepalive`` are streams: newline-delimited
  ``{"result": ...}`` objects. A watch answers ``created`` first; a watch from
  a compacted revision is then cancelled with ``compact_revision``, the
  oldest revision it could start from.

Failover: calls stick to one endpoint and move to the next when it cannot be
reached or says it is unavailable, with backoff, for up to
``failover_timeout``. A request that was sent and lost its answer is
repeated only when repeating cannot change the outcome (reads, keepalives,
grants, compaction); a write in that state raises
:class:`~hostmesh.StoreUnavailable` saying its outcome is unknown, as etcd's
own client does. A broken watch stream is reopened on another member from the
next revision, so it misses nothing.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar, cast
from urllib.parse import urlsplit

import httpx
import trio

from hostmesh._errors import (
    Compacted,
    LeaseNotFound,
    StoreError,
    StoreProtocolError,
    StoreUnavailable,
    StoreValueError,
)

from ._store import (
    Entry,
    Event,
    check_cas,
    check_key,
    check_lease,
    check_prefix,
    check_revision,
    check_ttl,
    check_value,
)

__all__ = ["EtcdStore"]

#: Longest line of a watch stream; one revision's events (a prefix delete of
#: 100,000 keys is ~20 MB of JSON) must fit, a peer that never sends "\n" must not.
MAX_WATCH_LINE = 32 * 1024 * 1024
#: First and largest pause between rounds over every endpoint.
INITIAL_BACKOFF = 0.05
MAX_BACKOFF = 1.0
#: Characters of a peer's error text kept in our messages.
MAX_ERROR_TEXT = 200

_INVALID_ARGUMENT, _DEADLINE_EXCEEDED, _NOT_FOUND = 3, 4, 5
_RESOURCE_EXHAUSTED, _OUT_OF_RANGE, _UNAVAILABLE = 8, 11, 14
#: etcd errors after which a write has certainly not been applied (safe to send elsewhere).
_NOT_APPLIED = ("etcdserver: no leader", "etcdserver: too many requests", "etcdserver: not capable")
_MAX_INT64 = 2**63 - 1

_T = TypeVar("_T")


class _Retry(Exception):
    """This endpoint failed in a way that another one (or a later try) may not."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _range_end(prefix: bytes) -> bytes:
    """etcd's end of the range of keys starting with ``prefix`` (b"\\0": every key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _text(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "..."


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --- reading the gateway's JSON, every field checked ------------------------------


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name, 0)
    if isinstance(value, str) and value.isascii() and value.lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INT64:
        raise StoreProtocolError(f"etcd sent an invalid {name}: {_text(value)}")
    return value


def _bytes(obj: dict[str, Any], name: str) -> bytes:
    value = obj.get(name, "")
    try:
        if not isinstance(value, str):
            raise ValueError
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise StoreProtocolError(f"etcd sent an invalid base64 {name}: {_text(value)}") from None


def _dict(obj: object, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise StoreProtocolError(f"etcd sent {what} that is not an object: {_text(obj)}")
    return obj


def _header_revision(data: dict[str, Any]) -> int:
    revision = _int(_dict(data.get("header"), "a header"), "revision")
    if revision < 1:
        raise StoreProtocolError("etcd sent a header without a revision")
    return revision


def _entry(kv: object) -> Entry:
    kv = _dict(kv, "a key-value")
    try:
        key = _bytes(kv, "key").decode("utf-8")
    except UnicodeDecodeError:
        raise StoreProtocolError("etcd holds a key that is not UTF-8 under this prefix") from None
    return Entry(
        key, _bytes(kv, "value"), _int(kv, "create_revision"), _int(kv, "mod_revision"),
        _int(kv, "lease"),
    )  # fmt: skip


def _kvs(data: dict[str, Any]) -> list[Entry]:
    kvs = data.get("kvs", [])
    if not isinstance(kvs, list):
        raise StoreProtocolError(f"etcd sent kvs that are not a list: {_text(kvs)}")
    return [_entry(kv) for kv in kvs]


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise StoreProtocolError(f"{what} is not JSON: {_text(raw[:MAX_ERROR_TEXT])}") from None


class EtcdStore:
    """The :class:`~hostmesh.server.Store` on an etcd v3 cluster.

    Args:
        endpoints: client URLs of the cluster's members (``http://host:port``).
        transport: the HTTP transport (an ``httpx.MockTransport`` in unit tests);
            default: httpx's, without proxies from the environment.
        connect_timeout: s per TCP connect.
        request_timeout: s for one request to one member.
        failover_timeout: s a call keeps trying the members before
            :class:`~hostmesh.StoreUnavailable`.

    The caller owns the store and closes it with :meth:`aclose`, which closes
    the HTTP client (and so any watch still open). Each open watch holds one
    HTTP connection of the client's pool (httpx's default: 100 connections).

    etcd keeps every revision until it is compacted: run etcd with
    ``--auto-compaction-retention`` (or call :meth:`compact`) so its history,
    like SQLite's, stays bounded.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout: float = 1.0,
        request_timeout: float = 5.0,
        failover_timeout: float = 10.0,
    ) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise StoreValueError("etcd needs a list of one or more endpoint URLs")
        self._endpoints: list[str] = []
        for endpoint in endpoints:
            try:
                url = urlsplit(endpoint)
                ok = url.scheme in ("http", "https") and bool(url.hostname) and bool(url.port)
            except ValueError:
                ok = False
            if not ok or url.path not in ("", "/") or url.query:
                raise StoreValueError(
                    f"invalid etcd endpoint {endpoint!r}: use http(s)://host:port"
                )
            self._endpoints.append(endpoint.rstrip("/"))
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._failover_timeout = failover_timeout
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
            trust_env=False,  # never send the store's traffic through an http_proxy
        )
        self._current = 0

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now (the next one after a failure)."""
        return self._endpoints[self._current]

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- requests and failover ----------------------------------------------------

    async def _failover(self, attempt: Callable[[str], Awaitable[_T]], what: str) -> _T:
        """Run ``attempt(endpoint)`` on the current endpoint, then the others, until one
        succeeds or raises something other than :class:`_Retry`, for up to failover_timeout."""
        deadline = trio.current_time() + self._failover_timeout
        backoff = INITIAL_BACKOFF
        failures: dict[str, str] = {}
        while True:
            for _ in range(len(self._endpoints)):
                endpoint = self._endpoints[self._current]
                try:
                    return await attempt(endpoint)
                except _Retry as exc:
                    failures[endpoint] = str(exc)
                    self._current = (self._current + 1) % len(self._endpoints)
            if trio.current_time() + backoff >= deadline:
                tried = "; ".join(f"{ep}: {why}" for ep, why in failures.items())
                raise StoreUnavailable(
                    f"etcd {what}: no endpoint answered within {self._failover_timeout:g} s"
                    f" ({tried})"
                )
            await trio.sleep(backoff)
            backoff = min(2 * backoff, MAX_BACKOFF)

    async def _call(
        self, path: str, body: dict[str, Any], *, safe: bool, lease: int = 0, stream: bool = False
    ) -> dict[str, Any]:
        """POST ``body`` to ``path``; the answer's JSON object.

        Args:
            safe: repeating the request cannot change its outcome.
            lease: the lease the request names, for :class:`LeaseNotFound`.
            stream: the answer is a stream of ``{"result": ...}``; take the first.
        """
        content = json.dumps(body).encode()

        async def attempt(endpoint: str) -> dict[str, Any]:
            try:
                response = await self._http.post(
                    endpoint + path, content=content, headers={"content-type": "application/json"}
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                raise _Retry(_describe(exc)) from exc  # never reached the member
            except httpx.TransportError as exc:
                if safe:
                    raise _Retry(_describe(exc)) from exc
                raise StoreUnavailable(
                    f"etcd {endpoint}{path}: {_describe(exc)}; the write may or may not"
                    " have been applied"
                ) from exc
            where = f"etcd {endpoint}{path}"
            if response.status_code == 200:
                raw = response.content
                if stream:
                    raw = raw.strip().split(b"\n", 1)[0]
                data = _dict(_json(raw, f"the answer of {where}"), f"an answer to {path}")
                if stream:
                    if "error" in data:
                        error = _dict(data["error"], "an error")
                        code = error.get("grpc_code", error.get("code"))
                        self._refused(where, code, error.get("message"), lease, safe)
                    data = _dict(data.get("result"), f"a result of {path}")
                _header_revision(data)  # every answer carries one; a missing one is not etcd
                return data
            if response.status_code in (502, 503, 504) and not response.content.startswith(b"{"):
                self._refused(where, _UNAVAILABLE, f"HTTP {response.status_code}", lease, safe)
            error = _dict(_json(response.content, f"the error of {where}"), "an error")
            self._refused(
                where, error.get("code"), error.get("message", error.get("error")), lease, safe
            )

        return await self._failover(attempt, path)

    def _refused(
        self, where: str, code: object, message: object, lease: int, safe: bool
    ) -> NoReturn:
        """Raise what etcd's refusal means for the caller."""
        text = _text(message)
        if code in (_UNAVAILABLE, _DEADLINE_EXCEEDED):
            if safe or text in _NOT_APPLIED:
                raise _Retry(text)
            raise StoreUnavailable(f"{where}: {text}; the write may or may not have been applied")
        if code == _NOT_FOUND and "lease not found" in text:
            raise LeaseNotFound(lease)
        if code in (_INVALID_ARGUMENT, _RESOURCE_EXHAUSTED, _OUT_OF_RANGE):
            raise StoreValueError(f"{where} refused the request: {text}")
        if not isinstance(code, int) or isinstance(code, bool):
            raise StoreProtocolError(f"{where} answered an error without a code: {text}")
        raise StoreError(f"{where}: {text} (gRPC code {code})")

    # --- the Store interface ------------------------------------------------------

    async def current_revision(self) -> int:
        data = await self._call("/v3/kv/range", {"key": _b64(b"\0"), "count_only": True}, safe=True)
        return _header_revision(data)

    async def get(self, key: str) -> Entry | None:
        data = await self._call("/v3/kv/range", {"key": _b64(check_key(key))}, safe=True)
        entries = _kvs(data)
        return entries[0] if entries else None

    async def list(self, prefix: str) -> builtins.list[Entry]:
        raw = check_prefix(prefix)
        body = {"key": _b64(raw or b"\0"), "range_end": _b64(_range_end(raw))}
        return _kvs(await self._call("/v3/kv/range", body, safe=True))

    async def put(
        self, key: str, value: bytes, *, cas: int | None = None, lease: int = 0
    ) -> int | None:
        request: dict[str, Any] = {"key": _b64(check_key(key)), "value": _b64(check_value(value))}
        check_cas(cas)
        check_lease(lease)
        if lease:
            request["lease"] = str(lease)
        if cas is None:
            return _header_revision(
                await self._call("/v3/kv/put", request, safe=False, lease=lease)
            )
        data = await self._call(
            "/v3/kv/txn", self._txn(request["key"], cas, {"request_put": request}),
            safe=False, lease=lease,
        )  # fmt: skip
        return _header_revision(data) if data.get("succeeded") is True else None

    @staticmethod
    def _txn(key: str, cas: int, operation: dict[str, Any]) -> dict[str, Any]:
        # A missing key compares as mod_revision 0, so cas=0 means "create only".
        compare = {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(cas)}
        return {"compare": [compare], "success": [operation]}

    async def delete(self, key: str, *, prefix: bool = False, cas: int | None = None) -> int:
        if prefix:
            raw = check_prefix(key)
            if cas is not None:
                raise StoreValueError("cas cannot be combined with a prefix delete")
            body = {"key": _b64(raw or b"\0"), "range_end": _b64(_range_end(raw))}
            return _int(await self._call("/v3/kv/deleterange", body, safe=False), "deleted")
        request = {"key": _b64(check_key(key))}
        check_cas(cas)
        if cas is None:
            return _int(await self._call("/v3/kv/deleterange", request, safe=False), "deleted")
        if cas == 0:
            return 0  # "must not exist": there is nothing to delete
        data = await self._call(
            "/v3/kv/txn",
            self._txn(request["key"], cas, {"request_delete_range": request}),
            safe=False,
        )
        if data.get("succeeded") is not True:
            return 0
        responses = data.get("responses")
        if not isinstance(responses, list) or len(responses) != 1:
            raise StoreProtocolError("etcd sent a txn answer without its response")
        deleted = _dict(_dict(responses[0], "a response").get("response_delete_range"), "a del")
        return _int(deleted, "deleted")

    @contextlib.asynccontextmanager
    async def watch(self, prefix: str, from_revision: int = 0) -> AsyncIterator[_EtcdWatch]:
        raw = check_prefix(prefix)
        check_revision(from_revision, "from_revision")
        watch = _EtcdWatch(self, raw, from_revision)
        try:
            await watch.connect()
            yield watch
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self._request_timeout):
                await watch.close()

    async def compact(self, revision: int) -> None:
        check_revision(revision)
        if revision <= 1:
            return  # nothing comes before revision 1
        try:
            await self._call(
                "/v3/kv/compaction", {"revision": str(revision), "physical": True}, safe=True
            )
        except StoreValueError as exc:
            if "required revision has been compacted" not in str(exc):
                raise

    async def lease_grant(self, ttl: int) -> int:
        check_ttl(ttl)
        # Safe to repeat: a lease granted by a lost answer expires by itself.
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl)}, safe=True)
        if data.get("error"):
            raise StoreError(f"etcd refused a lease: {_text(data['error'])}")
        lease = _int(data, "ID")
        if lease < 1:
            raise StoreProtocolError("etcd granted a lease without an ID")
        return lease

    async def lease_keepalive(self, lease: int) -> int:
        check_lease(lease)
        data = await self._call(
            "/v3/lease/keepalive", {"ID": str(lease)}, safe=True, lease=lease, stream=True
        )
        ttl = _int(data, "TTL")
        if ttl < 1:
            raise LeaseNotFound(lease)
        return ttl

    async def lease_revoke(self, lease: int) -> None:
        check_lease(lease)
        await self._call("/v3/lease/revoke", {"ID": str(lease)}, safe=False, lease=lease)


class _Broken(Exception):
    """The watch stream ended or failed; reopen it from the next revision."""


class _EtcdWatch:
    """One watch: a streaming POST to ``/v3/watch``, reopened elsewhere when it breaks."""

    def __init__(self, store: EtcdStore, prefix: bytes, from_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._next = from_revision  # 0 until etcd tells the revision the watch started at
        self._response: httpx.Response | None = None
        self._chunks: AsyncGenerator[bytes, None] | None = None
        self._pending = bytearray()
        self._buffer: deque[Event] = deque()
        self._backoff = 0.0  # s before the next reconnect; 0 after progress

    async def connect(self) -> None:
        """Open the stream on some member and wait until etcd confirms the watch."""
        await self._store._failover(self._open, "watch")

    async def _open(self, endpoint: str) -> None:
        store = self._store
        create: dict[str, Any] = {
            "key": _b64(self._prefix or b"\0"),
            "range_end": _b64(_range_end(self._prefix)),
        }
        if self._next:
            create["start_revision"] = str(self._next)
        request = store._http.build_request(
            "POST",
            endpoint + "/v3/watch",
            content=json.dumps({"create_request": create}).encode(),
            headers={"content-type": "application/json"},
            # No read timeout: a watch on a quiet prefix is silent for hours.
            timeout=httpx.Timeout(
                store._request_timeout, connect=store._connect_timeout, read=None
            ),
        )
        where = f"etcd {endpoint}/v3/watch"
        if store._http.is_closed:
            raise StoreError("the etcd store is closed")
        try:
            with trio.fail_after(store._request_timeout):
                try:
                    response = await store._http.send(request, stream=True)
                except httpx.TransportError as exc:
                    raise _Retry(_describe(exc)) from exc
                if response.status_code != 200:
                    raw = await response.aread()
                    await response.aclose()
                    error = _dict(_json(raw, f"the error of {where}"), "an error")
                    store._refused(where, error.get("code"), error.get("message"), 0, safe=True)
                self._response = response
                self._chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
                self._pending.clear()
                try:
                    first = await self._read()
                except _Broken as exc:
                    raise _Retry(str(exc)) from exc
        except trio.TooSlowError:
            await self.close()
            raise _Retry(f"no answer within {store._request_timeout:g} s") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.close()
            raise
        if first.get("created") is not True:
            await self.close()
            raise StoreProtocolError(f"{where} did not confirm the watch: {_text(first)}")
        if not self._next:
            self._next = _header_revision(first) + 1
        self._take(first)

    async def close(self) -> None:
        response, chunks = self._response, self._chunks
        self._response = self._chunks = None
        if response is not None:
            await response.aclose()
        if chunks is not None:
            # httpx reads through a chain of async generators; aclose() on the outer one
            # leaves the inner ones suspended (Trio warns when they are collected). One
            # more step on the closed stream ends every one of them.
            with contextlib.suppress(Exception):
                await chunks.__anext__()
            await chunks.aclose()

    async def _read(self) -> dict[str, Any]:
        """The next message's ``result``."""
        while True:
            end = self._pending.find(b"\n")
            if end >= 0:
                line = bytes(self._pending[:end])
                del self._pending[: end + 1]
                if line.strip():
                    break
                continue
            if len(self._pending) > MAX_WATCH_LINE:
                raise StoreProtocolError(f"etcd sent a watch message over {MAX_WATCH_LINE} bytes")
            if self._chunks is None:
                raise _Broken("the watch stream is closed")
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                raise _Broken("etcd ended the watch stream") from None
            except (httpx.TransportError, httpx.StreamError) as exc:
                raise _Broken(_describe(exc)) from exc
            self._pending += chunk
        message = _dict(_json(line, "a watch message from etcd"), "a watch message")
        if "error" in message:
            error = _dict(message["error"], "a watch error")
            code = error.get("grpc_code", error.get("code"))
            if code == _UNAVAILABLE:
                raise _Broken(_text(error.get("message")))
            raise StoreError(f"etcd ended the watch: {_text(error.get('message'))}")
        return _dict(message.get("result"), "a watch result")

    def _take(self, result: dict[str, Any]) -> None:
        """Queue the events of one watch response; raise what a cancel means."""
        compacted = _int(result, "compact_revision")
        if compacted:
            raise Compacted(self._next, compacted)
        if result.get("canceled"):
            reason = _text(result.get("cancel_reason", "no reason given"))
            raise StoreError(f"etcd cancelled the watch: {reason}")
        events = result.get("events", [])
        if not isinstance(events, list):
            raise StoreProtocolError("etcd sent watch events that are not a list")
        for raw in events:
            event = _dict(raw, "a watch event")
            kind = event.get("type", "PUT")
            entry = _entry(event.get("kv"))
            if kind not in ("PUT", "DELETE"):
                raise StoreProtocolError(f"etcd sent a watch event of type {_text(kind)}")
            if entry.mod_revision < 1:
                raise StoreProtocolError("etcd sent a watch event without a revision")
            if entry.mod_revision < self._next:
                continue  # already seen before a reconnect
            self._backoff = 0.0  # progress: a later break reconnects at once
            if kind == "PUT":
                self._buffer.append(Event("put", entry, entry.mod_revision))
            else:
                gone = Entry(entry.key, b"", 0, entry.mod_revision, 0)
                self._buffer.append(Event("delete", gone, entry.mod_revision))
        if self._buffer:
            self._next = max(self._next, self._buffer[-1].revision + 1)

    def __aiter__(self) -> _EtcdWatch:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            try:
                result = await self._read()
            except _Broken:
                await self.close()
                # A member that keeps ending the stream without progress is retried
                # with backoff, not in a tight loop.
                if self._backoff:
                    await trio.sleep(self._backoff)
                self._backoff = min(max(2 * self._backoff, INITIAL_BACKOFF), MAX_BACKOFF)
                await self.connect()  # from self._next, on whichever member answers
                continue
            self._take(result)
        return self._buffer.popleft()
