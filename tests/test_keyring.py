"""The gossip keyring: AES-256-GCM sealing, key rotation, and its errors."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh import HostmeshError
from hostmesh.catalog._codec import DecodeError, encode, frame, unframe
from hostmesh.catalog._keyring import (
    ENCRYPTION_VERSION,
    KEY_SIZE,
    NONCE_SIZE,
    SEAL_OVERHEAD,
    TAG_SIZE,
    DecryptError,
    Keyring,
    KeyringError,
)
from hostmesh.catalog._messages import Ping

K1, K2, K3 = (bytes([i]) * KEY_SIZE for i in (1, 2, 3))
FRAME = frame(encode(Ping(1, "n2", "n1", "10.0.0.1:7946")))


def test_error_classes() -> None:
    assert issubclass(KeyringError, HostmeshError)
    assert issubclass(DecryptError, DecodeError)  # the receive path drops and counts both


# --- sealing --------------------------------------------------------------------------


@settings(max_examples=50, derandomize=True)
@given(st.binary(max_size=2000), st.text(max_size=20))
def test_seal_open_round_trip(payload: bytes, label: str) -> None:
    ring = Keyring([K1, K2], label=label)
    sealed = ring.seal(payload)
    assert len(sealed) == len(payload) + SEAL_OVERHEAD
    assert ring.open(sealed) == payload
    assert payload not in sealed or len(payload) < 4


def test_sealed_layout_is_version_nonce_ciphertext_tag_with_the_label_as_aad() -> None:
    """Another AES-GCM implementation opens it with the layout of memberlist's security.go."""
    sealed = Keyring([K1], label="prod").seal(FRAME)
    assert sealed[0] == ENCRYPTION_VERSION
    nonce, body = sealed[1 : 1 + NONCE_SIZE], sealed[1 + NONCE_SIZE :]
    assert len(body) == len(FRAME) + TAG_SIZE
    assert AESGCM(K1).decrypt(nonce, body, b"prod") == FRAME


def test_each_seal_uses_a_fresh_nonce() -> None:
    ring = Keyring([K1])
    nonces = {ring.seal(FRAME)[1 : 1 + NONCE_SIZE] for _ in range(100)}
    assert len(nonces) == 100


def test_every_installed_key_opens_and_the_primary_seals() -> None:
    ring = Keyring([K1, K2, K3])
    for key in (K1, K2, K3):
        assert ring.open(Keyring([key]).seal(FRAME)) == FRAME
    assert Keyring([K1]).open(ring.seal(FRAME)) == FRAME
    with pytest.raises(DecryptError):
        Keyring([K2, K3]).open(ring.seal(FRAME))


def test_a_packet_from_another_cluster_label_does_not_open() -> None:
    sealed = Keyring([K1], label="prod").seal(FRAME)
    for label in ("", "staging", "Prod", "prod "):
        with pytest.raises(DecryptError, match="wrong key or label"):
            Keyring([K1], label=label).open(sealed)


def test_a_packet_under_an_unknown_key_does_not_open() -> None:
    with pytest.raises(DecryptError, match="no installed key"):
        Keyring([K1, K2]).open(Keyring([K3]).seal(FRAME))


def test_any_tampered_byte_is_detected() -> None:
    ring = Keyring([K1])
    sealed = ring.seal(FRAME)
    for index in range(len(sealed)):
        bad = bytearray(sealed)
        bad[index] ^= 0x01
        with pytest.raises(DecryptError):
            ring.open(bytes(bad))
    with pytest.raises(DecryptError):
        ring.open(sealed[:-1])
    with pytest.raises(DecryptError):
        ring.open(sealed + b"\0")


def test_plaintext_is_refused_when_encryption_is_on() -> None:
    ring = Keyring([K1])
    with pytest.raises(DecryptError):
        ring.open(FRAME)
    with pytest.raises(DecryptError, match="too short"):
        ring.open(b"")
    with pytest.raises(DecryptError, match="too short"):
        ring.open(bytes([ENCRYPTION_VERSION]) + bytes(SEAL_OVERHEAD - 2))
    with pytest.raises(DecryptError, match="encryption version 7"):
        ring.open(bytes([7]) + ring.seal(FRAME)[1:])


def test_a_disabled_keyring_passes_frames_through() -> None:
    ring = Keyring()
    assert not ring.enabled
    assert ring.primary is None
    assert ring.keys == ()
    assert ring.seal(FRAME) == FRAME
    assert ring.open(FRAME) == FRAME
    assert unframe(ring.open(ring.seal(FRAME))) == FRAME[5:]
    with pytest.raises(KeyringError):
        ring.encrypt(FRAME)
    with pytest.raises(DecryptError):
        ring.decrypt(Keyring([K1]).seal(FRAME))


def test_an_encrypted_packet_to_a_disabled_member_fails_at_unframe() -> None:
    """The disabled member sees noise: the frame check refuses it, it does not crash."""
    with pytest.raises(DecodeError):
        unframe(Keyring().open(Keyring([K1]).seal(FRAME)))


# --- rotation -------------------------------------------------------------------------


def test_install_use_remove_rotation_keeps_members_at_different_steps_talking() -> None:
    """memberlist's rotation: install the new key everywhere, use it, remove the old one.

    At every moment members are at most one step apart, and each pair can talk.
    """
    a, b, c = Keyring([K1]), Keyring([K1]), Keyring([K1])

    def all_talk() -> None:
        for sender in (a, b, c):
            for receiver in (a, b, c):
                assert receiver.open(sender.seal(FRAME)) == FRAME

    a.install(K2)  # a opens K2 but still seals with K1
    all_talk()
    b.install(K2)
    c.install(K2)
    all_talk()
    a.use(K2)  # a seals with K2; b and c have it installed
    assert a.primary == K2
    all_talk()
    b.use(K2)
    c.use(K2)
    a.remove(K1)  # a no longer opens K1, but nobody seals with it
    all_talk()
    b.remove(K1)
    c.remove(K1)
    all_talk()
    assert a.keys == b.keys == c.keys == (K2,)


def test_a_member_that_missed_the_install_step_splits_off() -> None:
    """REFERENCE.md's known trouble: a node offline during rotation cannot read the new key."""
    switched, missed = Keyring([K2, K1]), Keyring([K1])
    with pytest.raises(DecryptError):
        missed.open(switched.seal(FRAME))
    assert switched.open(missed.seal(FRAME)) == FRAME


def test_keys_are_primary_first_and_install_is_idempotent() -> None:
    ring = Keyring([K1, K2, K1])
    assert ring.keys == (K1, K2)
    ring.install(K2)
    ring.install(K3)
    assert ring.keys == (K1, K2, K3)
    ring.use(K3)
    assert ring.keys == (K3, K1, K2)
    assert ring.primary == K3
    ring.remove(K1)
    ring.remove(K1)  # already gone: a repeated rotation step is harmless
    assert ring.keys == (K3, K2)


def test_removing_the_primary_is_refused() -> None:
    ring = Keyring([K1, K2])
    with pytest.raises(KeyringError, match="is the primary: use another key"):
        ring.remove(K1)
    assert ring.keys == (K1, K2)


def test_using_a_key_that_is_not_installed_is_refused() -> None:
    ring = Keyring([K1])
    with pytest.raises(KeyringError, match="not installed: install it first"):
        ring.use(K2)
    assert ring.primary == K1


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_keys_must_be_32_bytes(size: int) -> None:
    key = os.urandom(size)
    message = f"an AES-256 key is 32 bytes, got {size}"
    with pytest.raises(KeyringError, match=message):
        Keyring([key])
    ring = Keyring([K1])
    for operation in (ring.install, ring.use, ring.remove):
        with pytest.raises(KeyringError, match=message):
            operation(key)
    assert ring.keys == (K1,)


def test_installing_into_a_disabled_keyring_is_refused() -> None:
    """Turning encryption on is a config change on every member, not a rotation step."""
    ring = Keyring()
    with pytest.raises(KeyringError, match="encryption is disabled"):
        ring.install(K1)
    assert not ring.enabled


def test_a_label_longer_than_255_bytes_is_refused() -> None:
    Keyring([K1], label="x" * 255)
    with pytest.raises(KeyringError, match="label"):
        Keyring([K1], label="é" * 128)


# --- base64 ---------------------------------------------------------------------------


def test_base64_round_trip() -> None:
    text = [base64.b64encode(k).decode() for k in (K2, K1)]
    ring = Keyring.from_base64(text, label="prod")
    assert ring.keys == (K2, K1)
    assert ring.label == "prod"
    assert ring.to_base64() == text
    assert Keyring.from_base64(ring.to_base64()).keys == ring.keys


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not base64!", "key 0: not valid base64"),
        (base64.b64encode(bytes(16)).decode(), "key 0: an AES-256 key is 32 bytes, got 16"),
        (base64.b64encode(bytes(32)).decode()[:-1], "key 0: not valid base64"),
        (42, "key 0: expected a base64 string, got int"),
    ],
)
def test_bad_base64_keys_are_refused_with_a_clear_message(text: object, reason: str) -> None:
    with pytest.raises(KeyringError, match=reason):
        Keyring.from_base64([text])  # type: ignore[list-item]


def test_repr_does_not_show_keys() -> None:
    ring = Keyring([K1], label="prod")
    assert repr(ring) == "Keyring(1 keys, label='prod')"
    assert base64.b64encode(K1).decode() not in repr(ring)
