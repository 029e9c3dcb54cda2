"""API tokens: management tokens for operators, join tokens for new agents.

A token is a random secret (``hm_`` + 43 characters of base64url, 256 bits)
that the client sends as ``Authorization: Bearer <secret>`` (or Consul's
``X-Consul-Token``). The store never sees a secret: a token lives under
``tokens/<sha256 of the secret>`` as JSON, with a public ``accessor`` id (for
listing and revoking, as Consul's AccessorID), its kind, a description, an
optional expiry and, for join tokens, the node names it may join as.

- ``management``: everything in the management API (config, KV, tokens, CA).
- ``join``: only ``POST /v1/ca/sign``, for node names matching ``node_pattern``
  (a shell-style pattern: ``*`` any run of characters, ``?`` one, ``[ab]`` a
  set; ``*`` by default). Reusable until it expires or is revoked, so an
  autoscaling group can share one.

The first server start creates a management token (:meth:`TokenStore.bootstrap`),
writes it 0600 to ``<data_dir>/management.token`` and hands it to the caller
once to print; a marker in the store keeps later starts, and other servers
on the same etcd, from making another.

Lookups go by the secret's hash (the store's lookup time can reveal something
about a hash, never about a secret); the hash found is then compared in
constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from hostmesh._errors import AuthError, CaStateError, NotFoundError, ValidationError

from ._ca_keys import write_private_file
from ._store import Store

__all__ = [
    "BOOTSTRAP_KEY",
    "MANAGEMENT_TOKEN_FILE",
    "MAX_DESCRIPTION",
    "MAX_SECRET",
    "MIN_SECRET",
    "TOKENS_PREFIX",
    "Token",
    "TokenKind",
    "TokenStore",
    "hash_secret",
]

TokenKind = Literal["management", "join"]
KINDS: tuple[TokenKind, ...] = ("management", "join")

TOKENS_PREFIX = "tokens/"
#: Written once, create-only, by the server that made the first management token.
BOOTSTRAP_KEY = "meta/tokens-bootstrapped"
MANAGEMENT_TOKEN_FILE = "management.token"
#: Operator-chosen secrets (e.g. ``openssl rand -hex 32`` from a vault) need at
#: least 128 bits written as hex; shorter ones could be guessed offline from a
#: leaked store.
MIN_SECRET = 32
#: Longer secrets are refused before hashing (a header is at most 32 KiB anyway).
MAX_SECRET = 256
MAX_DESCRIPTION = 256
MAX_NODE_PATTERN = 128
_SECRET_RE = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 b64token characters
_PATTERN_RE = re.compile(r"[A-Za-z0-9*?\[\]!-]+")  # node-name characters and glob syntax
_ACCESSOR_BYTES = 8


def hash_secret(secret: str) -> str:
    """The SHA-256 of a token secret, hex: what the store keeps."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Token:
    """A token as stored, without its secret."""

    accessor: str  # public id: list and revoke by it
    kind: TokenKind
    secret_hash: str  # hex SHA-256 of the secret
    created_at: datetime
    description: str = ""
    expires_at: datetime | None = None  # None: never
    node_pattern: str = ""  # join tokens: node names it may join as ("*": any)

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def may_join_as(self, node: str) -> bool:
        """Whether this join token may get a certificate for ``node``."""
        return self.kind == "join" and fnmatch.fnmatchcase(node, self.node_pattern or "*")

    def to_json(self) -> dict[str, Any]:
        """The public view (no hash): what the API lists."""
        return {
            "accessor": self.accessor,
            "kind": self.kind,
            "description": self.description,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "node_pattern": self.node_pattern if self.kind == "join" else None,
        }

    def to_bytes(self) -> bytes:
        doc = self.to_json() | {"secret_hash": self.secret_hash}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Token:
        doc = json.loads(data)
        expires = doc.get("expires_at")
        kind = doc["kind"]
        if kind not in KINDS:
            raise ValueError(f"unknown token kind {kind!r}")
        return cls(
            accessor=str(doc["accessor"]),
            kind=kind,
            secret_hash=str(doc["secret_hash"]),
            created_at=datetime.fromisoformat(doc["created_at"]),
            description=str(doc.get("description") or ""),
            expires_at=datetime.fromisoformat(expires) if expires else None,
            node_pattern=str(doc.get("node_pattern") or ""),
        )


def _check_secret(secret: str) -> None:
    if not MIN_SECRET <= len(secret) <= MAX_SECRET or not _SECRET_RE.fullmatch(secret):
        raise ValidationError(
            f"a token secret must be {MIN_SECRET}..{MAX_SECRET} characters of letters,"
            " digits and -._~+/= (e.g. openssl rand -hex 32)"
        )


def _check_pattern(pattern: str) -> None:
    if len(pattern) > MAX_NODE_PATTERN or not _PATTERN_RE.fullmatch(pattern):
        raise ValidationError(
            f"invalid node pattern {pattern[:MAX_NODE_PATTERN]!r}: use node-name characters"
            " and * ? [...] (at most 128 characters)"
        )


class TokenStore:
    """Tokens in the server's store. Holds no state of its own besides the store.

    Args:
        store: the server's store (the caller owns it).
        now: wall-clock time (aware UTC); tests inject one.
    """

    def __init__(self, store: Store, *, now: Callable[[], datetime] = _now) -> None:
        self.store = store
        self.now = now

    async def create(
        self,
        kind: str,
        *,
        description: str = "",
        ttl: float | None = None,
        node_pattern: str = "",
        secret: str | None = None,
    ) -> tuple[str, Token]:
        """Make a token; returns ``(secret, token)``. The secret is shown only here.

        Args:
            ttl: seconds until it expires; None or 0: never.
            node_pattern: join tokens only; "" = any node.
            secret: an operator-chosen secret (a vaulted one); default random.

        Raises:
            ValidationError: bad kind, TTL, pattern, description or secret, or a
                secret already in use.
        """
        if kind not in KINDS:
            raise ValidationError(f"token kind must be management or join, not {kind!r}")
        if len(description) > MAX_DESCRIPTION or any(ord(c) < 32 for c in description):
            raise ValidationError(f"description: at most {MAX_DESCRIPTION} printable characters")
        if kind == "management" and node_pattern:
            raise ValidationError("node_pattern is for join tokens only")
        if node_pattern:
            _check_pattern(node_pattern)
        if ttl is not None and not (0 <= ttl <= 10 * 365 * 86400):
            raise ValidationError("ttl must be between 0 (never expires) and 10 years")
        if secret is None:
            secret = "hm_" + secrets.token_urlsafe(32)
        else:
            _check_secret(secret)
        now = self.now()
        token = Token(
            accessor=secrets.token_hex(_ACCESSOR_BYTES),
            kind=kind,
            secret_hash=hash_secret(secret),
            created_at=now,
            description=description,
            expires_at=now + timedelta(seconds=ttl) if ttl else None,
            node_pattern=(node_pattern or "*") if kind == "join" else "",
        )
        rev = await self.store.put(TOKENS_PREFIX + token.secret_hash, token.to_bytes(), cas=0)
        if rev is None:
            raise ValidationError("that secret is already a token; choose another")
        return secret, token

    async def list(self) -> list[Token]:
        """Every token, oldest first."""
        tokens = []
        for entry in await self.store.list(TOKENS_PREFIX):
            try:
                tokens.append(Token.from_bytes(entry.value))
            except (ValueError, KeyError, TypeError):
                continue  # not ours to interpret; never authenticates either
        return sorted(tokens, key=lambda t: (t.created_at, t.accessor))

    async def revoke(self, accessor: str) -> Token:
        """Delete the token with this accessor id; it stops working at once.

        Raises:
            NotFoundError: no such token.
        """
        for entry in await self.store.list(TOKENS_PREFIX):
            try:
                token = Token.from_bytes(entry.value)
            except (ValueError, KeyError, TypeError):
                continue
            if hmac.compare_digest(token.accessor, accessor):
                await self.store.delete(entry.key)
                return token
        raise NotFoundError(f"no token with accessor {accessor!r}")

    async def authenticate(self, secret: str | None) -> Token:
        """The token whose secret this is, if it is valid now.

        Raises:
            AuthError: ``missing``, ``invalid`` (unknown, revoked, malformed) or
                ``expired``.
        """
        if secret is None:
            raise AuthError("missing", "a token is required: Authorization: Bearer <token>")
        if not secret or len(secret) > MAX_SECRET or not _SECRET_RE.fullmatch(secret):
            raise AuthError("invalid", "the token is not valid")
        digest = hash_secret(secret)
        entry = await self.store.get(TOKENS_PREFIX + digest)
        if entry is None:
            raise AuthError("invalid", "the token is not valid (unknown or revoked)")
        try:
            token = Token.from_bytes(entry.value)
        except (ValueError, KeyError, TypeError):
            raise AuthError("invalid", "the token is not valid") from None
        if not hmac.compare_digest(token.secret_hash, digest):
            raise AuthError("invalid", "the token is not valid")
        if token.expired(self.now()):
            assert token.expires_at is not None
            raise AuthError("expired", f"the token expired at {token.expires_at.isoformat()}")
        return token

    async def bootstrap(self, data_dir: str | Path) -> str | None:
        """At server start: make the first management token unless one was made before.

        Returns the new secret (print it once; it is also in
        ``<data_dir>/management.token``, mode 0600), or None when the store was
        already bootstrapped (by this server or another on the same etcd).

        Raises:
            CaStateError: the token file cannot be written.
            StoreError: the store failed.
        """
        if await self.store.get(BOOTSTRAP_KEY) is not None:
            return None
        path = Path(data_dir) / MANAGEMENT_TOKEN_FILE
        secret, token = await self.create("management", description="bootstrap (first start)")
        try:
            write_private_file(path, secret.encode() + b"\n")
        except CaStateError as exc:  # nobody would ever see this token: take it back
            await self.store.delete(TOKENS_PREFIX + token.secret_hash)
            raise CaStateError(
                f"{path}: cannot write the management token: {exc.__cause__ or exc}"
            ) from exc
        claimed = await self.store.put(BOOTSTRAP_KEY, token.accessor.encode(), cas=0)
        if claimed is None:  # another server won the race: keep its token, drop ours
            await self.store.delete(TOKENS_PREFIX + token.secret_hash)
            path.unlink(missing_ok=True)
            return None
        return secret
