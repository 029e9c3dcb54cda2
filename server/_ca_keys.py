"""Keeping the CA's secret state (root keys): a 0600 file, or a blob sealed with AES-256-GCM.

- Single server on SQLite: :func:`write_private_file` / :func:`read_private_file`
  keep ``CertificateAuthority.to_bytes()`` in the data dir, mode 0600, written
  atomically (temporary file, fsync, rename, fsync of the directory). A file
  that group or others may access is refused: the root key may have leaked.
- Several servers on etcd: the store keeps :func:`seal` output; the 32-byte key
  comes from the server config (:func:`decode_sealing_key`) and never reaches
  the store.

Sealed blob: ``b"HMSEAL" | version (1 byte) | nonce (12 bytes) | ciphertext+tag``;
the header and the caller's label are the associated data, so a blob cannot be
replayed under another label (e.g. another cluster's key path).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hostmesh._errors import CaStateError

__all__ = [
    "DEFAULT_LABEL",
    "MAX_STATE_BYTES",
    "SEALING_KEY_BYTES",
    "decode_sealing_key",
    "generate_sealing_key",
    "read_private_file",
    "seal",
    "unseal",
    "write_private_file",
]

SEALING_KEY_BYTES = 32  # AES-256
DEFAULT_LABEL = b"hostmesh-ca-state"
# CA state is a few kB plus ~80 bytes per live node certificate: 64 MiB is far beyond any fleet.
MAX_STATE_BYTES = 64 * 1024 * 1024

_MAGIC = b"HMSEAL"
_VERSION = 1
_NONCE_BYTES = 12  # the GCM standard nonce (NIST SP 800-38D); random per seal
_TAG_BYTES = 16
_HEADER = _MAGIC + bytes([_VERSION])


def generate_sealing_key() -> str:
    """A new sealing key as base64 text, for the server config."""
    return base64.b64encode(secrets.token_bytes(SEALING_KEY_BYTES)).decode()


def decode_sealing_key(text: str) -> bytes:
    """The 32-byte key from its config form: base64 (44 characters) or hex (64).

    Raises:
        ValueError: neither form, or not 32 bytes (the config loader names the key).
    """
    text = text.strip()
    try:
        key = bytes.fromhex(text) if len(text) == 2 * SEALING_KEY_BYTES else None
    except ValueError:
        key = None
    if key is None:
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the CA sealing key must be base64 or hex") from None
    if len(key) != SEALING_KEY_BYTES:
        raise ValueError(f"the CA sealing key must be {SEALING_KEY_BYTES} bytes, got {len(key)}")
    return key


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != SEALING_KEY_BYTES:
        raise ValueError(f"the sealing key must be {SEALING_KEY_BYTES} bytes (AES-256)")


def seal(data: bytes, key: bytes, *, label: bytes = DEFAULT_LABEL) -> bytes:
    """Encrypt and authenticate ``data`` with AES-256-GCM under ``key``."""
    _check_key(key)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return _HEADER + nonce + AESGCM(key).encrypt(nonce, data, _HEADER + label)


def unseal(blob: bytes, key: bytes, *, label: bytes = DEFAULT_LABEL) -> bytes:
    """Open a :func:`seal` blob.

    Raises:
        CaStateError: not a sealed blob, an unknown version, a wrong key or label,
            or tampered data.
    """
    _check_key(key)
    if len(blob) < len(_HEADER) + _NONCE_BYTES + _TAG_BYTES or not blob.startswith(_MAGIC):
        raise CaStateError("sealed CA state: not a sealed blob (bad header or too short)")
    if blob[len(_MAGIC)] != _VERSION:
        raise CaStateError(f"sealed CA state: unsupported version {blob[len(_MAGIC)]}")
    nonce = blob[len(_HEADER) : len(_HEADER) + _NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(_HEADER) + _NONCE_BYTES :], _HEADER + label)
    except InvalidTag:
        raise CaStateError(
            "sealed CA state cannot be opened: wrong sealing key, or the data was altered"
        ) from None


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600.

    A temporary file beside it (created 0600, never wider) is written and
    fsynced, then renamed over ``path``; the directory is fsynced so the rename
    survives a crash. Readers see the old or the new content, never a mix.

    Raises:
        CaStateError: the file could not be written (the OSError is chained).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow it; be explicit
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CaStateError(f"{target}: cannot write the CA state: {exc.strerror or exc}") from exc


def read_private_file(path: str | os.PathLike[str]) -> bytes:
    """Read a file written by :func:`write_private_file`, refusing an unsafe one.

    Raises:
        CaStateError: missing or unreadable, not a regular file, accessible to
            group or others (mode & 0o077), or larger than MAX_STATE_BYTES.
    """
    target = Path(path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise CaStateError(f"{target}: cannot read the CA state: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CaStateError(f"{target}: the CA state must be a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise CaStateError(
                f"{target}: the CA key file has mode {mode:04o}, readable by others;"
                f" refusing to use it (the root key may have leaked). Check who read it,"
                f" then run: chmod 600 {target}"
            )
        if st.st_size > MAX_STATE_BYTES:
            raise CaStateError(f"{target}: {st.st_size} bytes; at most {MAX_STATE_BYTES}")
        chunks = []
        while chunk := os.read(fd, 1024 * 1024):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise CaStateError(f"{target}: cannot read the CA state: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
