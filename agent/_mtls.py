"""The host-to-host hop: TLS 1.3 with node certificates on the proxy's raw sockets.

A request for an instance on another node goes to that node's agent on
:4141 over mutual TLS (the node certificates the servers' CA issued). This
module has the pieces both ends share:

- :class:`TlsStream`: the proxy's :class:`~._pool.Stream` over a non-blocking
  ``ssl.SSLSocket``, so every proxy loop (heads, bodies, tunnels) runs
  unchanged over TLS. OpenSSL may hold decrypted bytes the kernel no longer
  shows as readable (``pending()``), so no wait happens while it does.
  Half-close is TLS 1.3's: ``close_notify`` ends our direction only, and the
  peer's ``close_notify`` is our EOF.
- :func:`tls_connect` / :func:`tls_accept`: the handshake within a
  connection's deadline, then the peer's identity checked (URI SAN, mesh,
  revocation list). Every refusal is a :class:`HopRefused` with one reason
  word for counters: ``not-tls``, ``untrusted``, ``expired``, ``revoked``,
  ``identity``, ``missing``, ``handshake-failed``, ``timeout``.
- :class:`MeshTls`: this node's contexts, rebuilt when the certificate is
  renewed or the servers push new roots; connections keep the context they
  were made with (rotation drops nothing).
- The mesh headers: the outbound agent names the destination service and
  instance and the caller's identity; the inbound agent checks and strips them.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from hostmesh._errors import CertificateError, PeerCertificateError
from hostmesh._pki import NodeIdentity, RevocationList
from hostmesh._tls import check_peer, client_context, peer_certificate, server_context

from ._deadline import Deadline, DeadlineExceeded
from ._loop import quiet
from ._pool import RECV_SIZE, Stream, connect

if TYPE_CHECKING:
    from ._certs import NodeCertificate
    from ._sync import TrustBundle

__all__ = [
    "MESH_DESTINATION",
    "MESH_INSTANCE",
    "MESH_SOURCE",
    "HopRefused",
    "MeshTls",
    "TlsStream",
    "tls_accept",
    "tls_connect",
]

#: The mesh headers (lower case, as parsed). A local client's are dropped by the
#: outbound proxy, so only an agent with a node certificate can set them.
MESH_SOURCE = b"hostmesh-source"  # the caller's identity: a service, or host:<node>
MESH_DESTINATION = b"hostmesh-destination"  # the service asked for
MESH_INSTANCE = b"hostmesh-instance"  # the instance ID the outbound agent picked

#: OpenSSL reasons for a client that does not speak TLS 1.3 (plaintext, TLS 1.2, noise).
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL",
                      "UNEXPECTED_MESSAGE", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                      "NO_PROTOCOLS_AVAILABLE", "UNKNOWN_PROTOCOL"})  # fmt: skip
# OpenSSL X509_V_ERR_* codes meaning "outside its validity period".
_OUTSIDE_VALIDITY = (9, 10)


class HopRefused(Exception):
    """A TLS peer was refused, or the handshake failed; ``reason`` is one word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TlsStream(Stream):
    """A :class:`Stream` over a non-blocking ``SSLSocket`` after a checked handshake.

    ``peer`` is the peer's verified node identity, ``serial`` its certificate's
    serial number (to re-check against a newer revocation list).
    """

    __slots__ = ("_unwrapped", "peer", "serial")

    sock: ssl.SSLSocket

    def __init__(
        self,
        sock: ssl.SSLSocket,
        peer: NodeIdentity,
        serial: int,
        key: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(sock, key)
        self.peer = peer
        self.serial = serial
        self._unwrapped = False  # both close_notify seen: the socket is plain now

    def _read(self) -> bytes | None:
        """One read; None when OpenSSL needs the socket first (``_wait`` then)."""
        if self._unwrapped:
            return b""
        try:
            return self.sock.recv(RECV_SIZE)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:  # the peer's close_notify
            return b""

    async def _next(self, dl: Deadline | None) -> bytes:
        """The next decrypted bytes, waiting as OpenSSL needs; b"" at EOF (``eof`` set)."""
        while True:
            try:
                data = self._read()
            except ssl.SSLWantWriteError:  # a key update needs to write first
                await self._wait(dl, writable=True)
                continue
            if data is None:
                await self._wait(dl)
                continue
            if not data:
                self.eof = True
            return data

    async def fill(self, dl: Deadline | None = None, *, wait_first: bool = False) -> bool:
        if wait_first and not self.sock.pending():
            await self._wait(dl)
        data = await self._next(dl)
        self.buf += data
        return bool(data)

    def fill_nowait(self) -> bool:
        try:
            data = self._read()
        except OSError:
            return False
        if not data:
            if data is not None:
                self.eof = True
            return False
        self.buf += data
        return True

    async def recv(self, dl: Deadline | None = None) -> bytes:
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        return await self._next(dl)

    async def send(self, data: bytes | bytearray | memoryview, dl: Deadline | None = None) -> None:
        # SSL_write without partial writes: a write that wants the socket is retried
        # with the same bytes (Python allows the moving buffer), never a shorter slice.
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except ssl.SSLWantWriteError:
                await self._wait(dl, writable=True)
                continue
            except ssl.SSLWantReadError:
                await self._wait(dl)
                continue
            view = view[sent:]

    def looks_alive(self, *, peek: bool = True) -> bool:
        """Idle and nothing on the wire: any byte on an idle TLS connection is a
        close_notify or an alert, so the connection is not reused (``peek``: as
        :meth:`Stream.looks_alive`)."""
        if self.buf or self.eof or self._unwrapped or self.sock.pending():
            return False
        if not peek and quiet(self.sock):
            return True
        try:
            socket.socket.recv(self.sock, 1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def shutdown_write(self) -> None:
        """Send close_notify: the peer reads EOF, we may still read its bytes."""
        try:
            self.sock.unwrap()
        except ssl.SSLWantReadError:
            return  # close_notify sent; the peer's comes later (our EOF)
        except (ssl.SSLWantWriteError, OSError, ValueError):
            pass  # could not send it: a plain FIN reads as EOF too (ragged EOFs allowed)
        else:
            self._unwrapped = True  # both sides closed: never touch the plain socket again
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_WR)


def _handshake_failure(exc: ssl.SSLError | OSError) -> HopRefused:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = "expired" if exc.verify_code in _OUTSIDE_VALIDITY else "untrusted"
        return HopRefused(reason, f"peer certificate refused: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        why = exc.reason or ""
        if why in _NOT_TLS:
            return HopRefused("not-tls", f"not a TLS 1.3 client ({why.lower()})")
        if why == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return HopRefused("missing", "peer presented no certificate")
        if why in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                   "TLSV13_ALERT_CERTIFICATE_REQUIRED"):  # fmt: skip
            return HopRefused("untrusted", f"peer refused our certificate ({why.lower()})")
        if why == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
            return HopRefused("expired", "peer says our certificate expired")
        if why == "SSLV3_ALERT_CERTIFICATE_REVOKED":
            return HopRefused("revoked", "peer says our certificate is revoked")
        return HopRefused("handshake-failed", f"TLS handshake failed: {why or exc}")
    return HopRefused("handshake-failed", f"TLS handshake failed: {exc.strerror or exc}")


async def _handshake(
    raw: socket.socket,
    ctx: ssl.SSLContext,
    dl: Deadline,
    *,
    server_side: bool,
    mesh: str,
    expected_node: str | None,
    revocations: RevocationList | None,
    key: tuple[str, int] | None = None,
) -> TlsStream:
    """Wrap ``raw`` (non-blocking, connected), shake hands within ``dl``, check the peer.

    The caller closes ``raw`` on failure (the wrapped socket shares its descriptor).
    """
    raw.setblocking(False)  # accepted sockets start blocking
    tls = ctx.wrap_socket(raw, server_side=server_side, do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await dl.wait(tls)
            except ssl.SSLWantWriteError:
                await dl.wait(tls, writable=True)
            except (ssl.SSLError, OSError) as exc:
                raise _handshake_failure(exc) from None
            if tls.fileno() < 0:
                raise HopRefused("handshake-failed", "connection closed in the handshake")
        try:
            peer = check_peer(tls, mesh=mesh, expected_node=expected_node, revocations=revocations)
        except PeerCertificateError as exc:
            raise HopRefused(exc.reason, str(exc)) from None
        return TlsStream(tls, peer, peer_certificate(tls).serial_number, key)
    except DeadlineExceeded:
        tls.close()
        raise HopRefused("timeout", "TLS handshake not finished in time") from None
    except BaseException:
        tls.close()
        raise


async def tls_accept(
    raw: socket.socket,
    ctx: ssl.SSLContext,
    dl: Deadline,
    *,
    mesh: str,
    revocations: RevocationList | None,
) -> TlsStream:
    """The inbound side: a verified client node (any node of ``mesh``).

    Raises:
        HopRefused: the handshake failed or the client's certificate is refused.
    """
    return await _handshake(raw, ctx, dl, server_side=True, mesh=mesh, expected_node=None,
                            revocations=revocations)  # fmt: skip


async def tls_connect(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    dl: Deadline,
    *,
    mesh: str,
    node: str,
    revocations: RevocationList | None,
) -> TlsStream:
    """The outbound side: a connection to ``node``'s agent, whose certificate must name it.

    Raises:
        ConnectError: the TCP connect failed.
        HopRefused: the handshake failed or the peer is not ``node``.
        DeadlineExceeded: ``dl`` passed while connecting.
    """
    plain = await connect(host, port, dl)
    try:
        return await _handshake(plain.sock, ctx, dl, server_side=False, mesh=mesh,
                                expected_node=node, revocations=revocations,
                                key=(host, port))  # fmt: skip
    except BaseException:
        plain.close()
        raise


class MeshTls:
    """This node's TLS contexts for the hop, rebuilt when the certificate or the roots change.

    Args:
        credentials: the current node certificate (None before the first join).
        trust: the roots and revocations the servers push; their roots win over
            the ones that came with the certificate, so a root the servers drop
            stops being trusted.
    """

    def __init__(
        self, credentials: Callable[[], NodeCertificate | None], trust: TrustBundle
    ) -> None:
        self._credentials = credentials
        self.trust = trust
        self._built: tuple[NodeCertificate, int, ssl.SSLContext, ssl.SSLContext, str] | None = None

    def _contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext, str]:
        cert = self._credentials()
        if cert is None:
            raise CertificateError("this agent has no node certificate yet")
        built = self._built
        if built is not None and built[0] is cert and built[1] == self.trust.version:
            return built[2], built[3], built[4]
        roots = self.trust.roots_pem or cert.roots_pem
        srv = server_context(cert.chain_pem, cert.key_pem, roots)
        cli = client_context(cert.chain_pem, cert.key_pem, roots)
        mesh = cert.identity.mesh
        self._built = (cert, self.trust.version, srv, cli, mesh)
        return srv, cli, mesh

    def server(self) -> tuple[ssl.SSLContext, str]:
        """(context, mesh) for the inbound listener. Raises CertificateError before a join."""
        srv, _, mesh = self._contexts()
        return srv, mesh

    def client(self) -> tuple[ssl.SSLContext, str]:
        """(context, mesh) for dialling another agent. Raises CertificateError before a join."""
        _, cli, mesh = self._contexts()
        return cli, mesh

    @property
    def revocations(self) -> RevocationList | None:
        return self.trust.revocations

    def revoked(self, stream: TlsStream) -> bool:
        """Is the peer's certificate on the current revocation list (it may be newer than
        the handshake)?"""
        revs = self.trust.revocations
        return revs is not None and stream.serial in revs
