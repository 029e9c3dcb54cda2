"""The CA's lifecycle on a server: made at first start, kept, changed under compare-and-swap.

Where the secret state (:meth:`CertificateAuthority.to_bytes`, root keys
included) lives depends on the store:

- SQLite (one server): ``<data_dir>/ca.json``, mode 0600, written atomically
  (:func:`~hostmesh.server._ca_keys.write_private_file`); a file others may
  read is refused.
- etcd (several servers): the store key :data:`CA_STATE_KEY`, sealed with
  AES-256-GCM (:func:`~hostmesh.server._ca_keys.seal`) under the key in
  ``[ca] sealing_key_file``; the key never reaches etcd. Without it the server
  refuses to start.

Every change (a node certificate, a rotation, a revocation) goes through
:meth:`CaKeeper.update`: the change is applied to a fresh copy of the last
saved state and saved with compare-and-swap on the store revision, so two
servers on one etcd never lose each other's changes (the loser reloads and
applies its change again). After a save the public parts are published in the
store for the agent sync to watch: :data:`ROOTS_KEY` (the trust bundle, PEM)
and :data:`REVOCATIONS_KEY` (:meth:`RevocationList.to_bytes`, whose
``revision`` grows with every revocation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import trio

from hostmesh._config import ServerConfig
from hostmesh._errors import CaStateError, ConfigError, StoreError
from hostmesh._log import get_logger
from hostmesh._tls import make_node_key_and_csr

from ._ca import CaConfig, CertificateAuthority
from ._ca_keys import decode_sealing_key, read_private_file, seal, unseal, write_private_file
from ._store import Store

__all__ = [
    "CA_FILE",
    "CA_STATE_KEY",
    "REVOCATIONS_KEY",
    "ROOTS_KEY",
    "CaKeeper",
    "ServerCertificate",
    "issue_server_certificate",
    "load_or_create_ca",
    "open_ca",
]

log = get_logger("hostmesh.server.ca")

CA_FILE = "ca.json"
CA_STATE_KEY = "ca/state"
ROOTS_KEY = "ca/roots"
REVOCATIONS_KEY = "ca/revocations"
#: The seal's associated data: a blob cannot be moved to another key and opened there.
SEAL_LABEL = b"hostmesh-ca-state:" + CA_STATE_KEY.encode()
#: Compare-and-swap rounds before giving up; each loss means another server saved
#: a change in between, so more than a few in a row means something is wrong.
MAX_CAS_ATTEMPTS = 8

T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC)


def ca_settings(config: ServerConfig) -> CaConfig:
    """The CA tunables from ``[ca]``."""
    return CaConfig(leaf_ttl=config.ca.leaf_ttl)


def _sealing_key(config: ServerConfig) -> bytes:
    name = config.ca.sealing_key_file
    if not name:
        raise ConfigError(
            "server config",
            "ca.sealing_key_file",
            "the etcd store needs a CA sealing key: a file with 32 random bytes"
            " (openssl rand -base64 32 > FILE; chmod 600 FILE), the same on every server",
        )
    raw = read_private_file(name)  # CaStateError for a missing or group/other-readable file
    try:
        return decode_sealing_key(raw.decode("ascii", "replace"))
    except ValueError as exc:
        raise ConfigError(name, "ca.sealing_key_file", str(exc)) from None


class CaKeeper:
    """The server's CA and where its state is kept. One per server process.

    Use :attr:`ca` to read (roots, verify); change only through :meth:`update`.
    """

    def __init__(
        self,
        store: Store,
        config: ServerConfig,
        data_dir: Path,
        *,
        state: bytes,
        revision: int,
        now: Callable[[], datetime] = _now,
    ) -> None:
        self.store = store
        self.config = config
        self.data_dir = data_dir
        self.now = now
        self._settings = ca_settings(config)
        self._etcd = config.store.backend == "etcd"
        self._key = _sealing_key(config) if self._etcd else b""
        self._state = state
        self._revision = revision  # etcd: mod_revision of CA_STATE_KEY
        self._ca = self._load(state)
        self._lock = trio.Lock()
        self._published: tuple[bytes, bytes] = (b"", b"")

    @property
    def ca(self) -> CertificateAuthority:
        """The current CA (replaced, not mutated, by :meth:`update` and :meth:`refresh`)."""
        return self._ca

    @property
    def path(self) -> Path:
        return self.data_dir / CA_FILE

    def _load(self, state: bytes) -> CertificateAuthority:
        ca = CertificateAuthority.from_bytes(state, config=self._settings)
        if ca.mesh != self.config.ca.mesh:
            raise CaStateError(
                f"the CA state is for mesh {ca.mesh!r} but [ca] mesh is {self.config.ca.mesh!r};"
                " a new trust domain would invalidate every certificate: set mesh back"
            )
        return ca

    async def refresh(self, *, if_changed: bool = False) -> None:
        """Reload the state saved by another server (etcd); the file (SQLite) is ours alone.

        Readers of :attr:`ca` on etcd call this when the store's ``ca/`` keys
        change (a watch), or before a read that must see other servers' changes.
        """
        if not self._etcd:
            return
        entry = await self.store.get(CA_STATE_KEY)
        if entry is None:
            raise CaStateError(f"the CA state ({CA_STATE_KEY}) was deleted from the store")
        if if_changed and entry.mod_revision == self._revision:
            return
        state = unseal(entry.value, self._key, label=SEAL_LABEL)
        self._ca, self._state, self._revision = self._load(state), state, entry.mod_revision

    async def update(self, change: Callable[[CertificateAuthority], T]) -> T:
        """Apply ``change`` to the CA and save the result; returns what ``change`` returned.

        If ``change`` raises, nothing is saved and the CA is as before.

        Raises:
            CaStateError: the file could not be written.
            StoreError: the store failed, or the state kept changing under us.
        """
        async with self._lock:
            await self.refresh(if_changed=True)  # start from the latest (another server's) state
            for _ in range(MAX_CAS_ATTEMPTS):
                ca = CertificateAuthority.from_bytes(self._state, config=self._settings)
                result = change(ca)
                state = ca.to_bytes()
                if await self._save(state):
                    self._ca, self._state = ca, state
                    await self.publish()
                    return result
                await self.refresh()  # another server saved first: apply ours to theirs
        raise StoreError(f"the CA state changed {MAX_CAS_ATTEMPTS} times while saving; try again")

    async def _save(self, state: bytes) -> bool:
        if not self._etcd:
            await trio.to_thread.run_sync(write_private_file, self.path, state)
            return True
        rev = await self.store.put(
            CA_STATE_KEY, seal(state, self._key, label=SEAL_LABEL), cas=self._revision
        )
        if rev is None:
            return False
        self._revision = rev
        return True

    async def publish(self) -> None:
        """Write the trust bundle and the revocation list to the store if they changed."""
        roots, revocations = self._ca.bundle_pem(), self._ca.revocations.to_bytes()
        if roots != self._published[0]:
            entry = await self.store.get(ROOTS_KEY)
            if entry is None or entry.value != roots:
                await self.store.put(ROOTS_KEY, roots)
        if revocations != self._published[1]:
            entry = await self.store.get(REVOCATIONS_KEY)
            if entry is None or entry.value != revocations:
                await self.store.put(REVOCATIONS_KEY, revocations)
        self._published = (roots, revocations)


async def open_ca(
    store: Store,
    config: ServerConfig,
    data_dir: str | Path,
    *,
    now: Callable[[], datetime] = _now,
) -> CaKeeper:
    """Load the CA, or make it (a new root) on the first start; publish its public parts.

    Raises:
        ConfigError: etcd without a usable ``[ca] sealing_key_file``.
        CaStateError: unreadable, unsafe (mode), tampered or wrongly sealed state,
            or state of another mesh.
        StoreError: the store failed.
    """
    data_dir = Path(data_dir)
    settings = ca_settings(config)
    revision = 0
    if config.store.backend == "etcd":
        key = _sealing_key(config)
        entry = await store.get(CA_STATE_KEY)
        if entry is None:
            state = CertificateAuthority.create(config.ca.mesh, now=now(), config=settings)
            data = state.to_bytes()
            rev = await store.put(CA_STATE_KEY, seal(data, key, label=SEAL_LABEL), cas=0)
            if rev is None:  # another server made it first: use theirs
                entry = await store.get(CA_STATE_KEY)
                if entry is None:
                    raise CaStateError(f"the CA state ({CA_STATE_KEY}) vanished while starting")
            else:
                log.info("CA created", mesh=config.ca.mesh, where=f"store key {CA_STATE_KEY}")
                revision = rev
        if entry is not None:
            data = unseal(entry.value, key, label=SEAL_LABEL)
            revision = entry.mod_revision
    else:
        path = data_dir / CA_FILE
        if path.exists() or path.is_symlink():
            data = await trio.to_thread.run_sync(read_private_file, path)
        else:
            data = CertificateAuthority.create(
                config.ca.mesh, now=now(), config=settings
            ).to_bytes()
            await trio.to_thread.run_sync(write_private_file, path, data)
            log.info("CA created", mesh=config.ca.mesh, where=str(path))
    keeper = CaKeeper(store, config, data_dir, state=data, revision=revision, now=now)
    await keeper.publish()
    return keeper


async def load_or_create_ca(
    store: Store, config: ServerConfig, data_dir: str | Path
) -> CertificateAuthority:
    """The server's CA, made on the first start (see :func:`open_ca`, which the server uses
    to keep changes)."""
    return (await open_ca(store, config, data_dir)).ca


@dataclass(frozen=True)
class ServerCertificate:
    """A server's TLS certificate with its key and the roots, PEM, for an SSLContext."""

    chain_pem: bytes  # leaf, then the cross-signed root during a rotation
    key_pem: bytes  # EC P-256, unencrypted: keep it in memory
    roots_pem: bytes  # the trust bundle (to verify client certificates)
    not_after: datetime
    renew_at: datetime  # make a new one from here on (2/3 of its life)


def issue_server_certificate(
    ca: CertificateAuthority,
    name: str,
    addresses: Sequence[str],
    *,
    now: datetime | None = None,
) -> ServerCertificate:
    """A fresh key and certificate for server ``name`` reachable at ``addresses`` (IPs or DNS).

    The URI SAN is ``spiffe://<mesh>/server/<name>``; agents check it after the
    handshake. Nothing is persisted: a server makes a new one at each start and
    again at ``renew_at``.

    Raises:
        CsrRejectedError: invalid name or address.
    """
    key = make_node_key_and_csr(name)
    issued = ca.issue_server(key.csr_pem, name, addresses, now=now or _now())
    return ServerCertificate(
        chain_pem=issued.chain_pem(),
        key_pem=key.key_pem,
        roots_pem=ca.bundle_pem(),
        not_after=issued.not_after,
        renew_at=issued.renew_at,
    )
