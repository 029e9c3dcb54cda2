"""The gossip keyring: AES-256-GCM over every frame (memberlist's security.go and keyring.go).

A sealed frame is ``[ENCRYPTION_VERSION][12-byte random nonce][ciphertext +
16-byte GCM tag]`` with the cluster label (UTF-8) as associated data, so a
packet from a cluster with another label never opens.

The first key is the primary: it seals. Every installed key opens. A key is
rotated without a split in three cluster-wide steps: ``install`` the new key
everywhere (it opens, the old one still seals), ``use`` it everywhere (it
seals; members not there yet still open it), ``remove`` the old one. A member
that misses the first step cannot read the others after the second: that is
memberlist's "node offline during key rotation" trouble (REFERENCE.md).

Random 96-bit nonces, as memberlist: NIST SP 800-38D section 8.3 bounds one
key to 2**32 seals; a 1,000-node cluster at 10 packets per node per second
reaches that in about 5 days, so rotate keys (the bound is conservative: the
chance of a nonce collision at that point is still 2**-33).

With no keys the keyring is disabled: ``seal`` and ``open`` pass frames
through unchanged and the label is not checked. Sans-IO apart from
``os.urandom`` for nonces.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hostmesh._errors import HostmeshError

from ._codec import DecodeError

__all__ = [
    "ENCRYPTION_VERSION",
    "KEY_SIZE",
    "MAX_LABEL",
    "NONCE_SIZE",
    "SEAL_OVERHEAD",
    "TAG_SIZE",
    "DecryptError",
    "Keyring",
    "KeyringError",
]

#: First byte of a sealed frame; another value is refused. memberlist's
#: version 1 is AES-GCM without padding, as here.
ENCRYPTION_VERSION = 1
#: AES-256: memberlist also takes 16- and 24-byte keys; hostmesh only the strongest.
KEY_SIZE = 32
#: GCM's standard nonce (NIST SP 800-38D 8.2), random per seal.
NONCE_SIZE = 12
#: The full 128-bit GCM tag (SP 800-38D 5.2.1.2).
TAG_SIZE = 16
#: Bytes ``seal`` adds to a frame when enabled.
SEAL_OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE
#: Longest label in UTF-8 bytes (memberlist's label header carries a one-byte length).
MAX_LABEL = 255


class KeyringError(HostmeshError):
    """A key operation is not allowed: bad key size or encoding, removing the
    primary, using a key that is not installed, rotating a disabled keyring."""


class DecryptError(DecodeError):
    """A packet does not open with any installed key: malformed, tampered,
    sealed with a key or label we do not have, or plaintext while encryption is on.

    The caller drops and counts it.
    """


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray):
        raise KeyringError(f"a key is bytes, got {type(key).__name__}")
    if len(key) != KEY_SIZE:
        raise KeyringError(f"an AES-256 key is {KEY_SIZE} bytes, got {len(key)}")
    return bytes(key)


def _fingerprint(key: bytes) -> str:
    """Enough of a key's base64 to tell keys apart in a message, never the key."""
    return base64.b64encode(key).decode("ascii")[:6] + "..."


class Keyring:
    """The installed gossip keys, primary first, and the cluster label.

    Not thread-safe; the gossip task owns it. Keys are validated on the way in
    and never logged.
    """

    __slots__ = ("_aead", "_keys", "_label", "_label_bytes")

    def __init__(self, keys: Iterable[bytes] = (), *, label: str = "") -> None:
        """``keys[0]`` is the primary; duplicates are installed once.

        Raises:
            KeyringError: a key is not 32 bytes, or the label is longer than
                ``MAX_LABEL`` bytes of UTF-8.
        """
        try:
            label_bytes = label.encode("utf-8")
        except UnicodeEncodeError:
            raise KeyringError("the label is not encodable as UTF-8") from None
        if len(label_bytes) > MAX_LABEL:
            raise KeyringError(f"the label is {len(label_bytes)} bytes, more than {MAX_LABEL}")
        self._label = label
        self._label_bytes = label_bytes
        self._keys: list[bytes] = []
        self._aead: dict[bytes, AESGCM] = {}
        for key in keys:
            checked = _check_key(key)
            if checked not in self._aead:
                self._keys.append(checked)
                self._aead[checked] = AESGCM(checked)

    @classmethod
    def from_base64(cls, keys: Sequence[str], *, label: str = "") -> Keyring:
        """A keyring from base64 keys (the config's and the keyring file's form).

        Raises:
            KeyringError: a key is not base64 or not 32 bytes once decoded.
        """
        raw = []
        for i, text in enumerate(keys):
            if not isinstance(text, str):
                raise KeyringError(f"key {i}: expected a base64 string, got {type(text).__name__}")
            try:
                key = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise KeyringError(f"key {i}: not valid base64") from None
            if len(key) != KEY_SIZE:
                raise KeyringError(f"key {i}: an AES-256 key is {KEY_SIZE} bytes, got {len(key)}")
            raw.append(key)
        return cls(raw, label=label)

    def to_base64(self) -> list[str]:
        """The keys, primary first, in base64 (what the keyring file stores)."""
        return [base64.b64encode(key).decode("ascii") for key in self._keys]

    # --- state -------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when frames are encrypted (at least one key)."""
        return bool(self._keys)

    @property
    def keys(self) -> tuple[bytes, ...]:
        """The installed keys, primary first."""
        return tuple(self._keys)

    @property
    def primary(self) -> bytes | None:
        """The key that seals; None when disabled."""
        return self._keys[0] if self._keys else None

    @property
    def label(self) -> str:
        return self._label

    # --- rotation ------------------------------------------------------------------

    def install(self, key: bytes) -> None:
        """Add ``key`` for opening; a no-op when installed already.

        Raises:
            KeyringError: not 32 bytes, or the keyring is disabled (turning
                encryption on is a config change made on every member at once,
                not a rotation).
        """
        key = _check_key(key)
        if not self._keys:
            raise KeyringError(
                "encryption is disabled: configure gossip.keyring to enable it; "
                "install only rotates keys"
            )
        if key not in self._aead:
            self._keys.append(key)
            self._aead[key] = AESGCM(key)

    def use(self, key: bytes) -> None:
        """Make the installed ``key`` the primary (it seals from now on).

        Raises:
            KeyringError: not 32 bytes, or not installed.
        """
        key = _check_key(key)
        if key not in self._aead:
            raise KeyringError(f"key {_fingerprint(key)} is not installed: install it first")
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove(self, key: bytes) -> None:
        """Uninstall ``key``; a no-op when not installed (memberlist's RemoveKey),
        so a rotation step can be repeated.

        Raises:
            KeyringError: not 32 bytes, or the primary key (use another first).
        """
        key = _check_key(key)
        if self._keys and key == self._keys[0]:
            raise KeyringError(
                f"key {_fingerprint(key)} is the primary: use another key before removing it"
            )
        if key in self._aead:
            self._keys.remove(key)
            del self._aead[key]

    # --- sealing -------------------------------------------------------------------

    def encrypt(self, plaintext: bytes) -> bytes:
        """``[ENCRYPTION_VERSION][nonce][ciphertext + tag]`` under the primary key.

        Raises:
            KeyringError: the keyring is disabled.
        """
        if not self._keys:
            raise KeyringError("cannot encrypt: the keyring has no keys")
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._aead[self._keys[0]].encrypt(nonce, plaintext, self._label_bytes)
        return bytes((ENCRYPTION_VERSION,)) + nonce + sealed

    def decrypt(self, data: bytes) -> bytes:
        """The plaintext of ``data``, trying every installed key (primary first).

        Raises:
            DecryptError: too short, another encryption version, or no key
                (and label) authenticates it.
        """
        if len(data) < SEAL_OVERHEAD:
            raise DecryptError(f"an encrypted packet of {len(data)} bytes is too short")
        if data[0] != ENCRYPTION_VERSION:
            raise DecryptError(f"encryption version {data[0]}, expected {ENCRYPTION_VERSION}")
        nonce = bytes(data[1 : 1 + NONCE_SIZE])
        sealed = bytes(data[1 + NONCE_SIZE :])
        for key in self._keys:
            try:
                return self._aead[key].decrypt(nonce, sealed, self._label_bytes)
            except InvalidTag:
                continue
        raise DecryptError("no installed key opens the packet (wrong key or label, or tampered)")

    def seal(self, frame: bytes) -> bytes:
        """What goes on the network: ``frame`` encrypted, or unchanged when disabled."""
        return self.encrypt(frame) if self._keys else bytes(frame)

    def open(self, data: bytes) -> bytes:
        """The frame in a packet from the network; ``data`` itself when disabled.

        Raises:
            DecryptError: encryption is on and ``data`` does not open (plaintext included).
        """
        return self.decrypt(data) if self._keys else bytes(data)

    def __repr__(self) -> str:
        return f"Keyring({len(self._keys)} keys, label={self._label!r})"
