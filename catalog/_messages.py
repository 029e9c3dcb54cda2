"""Gossip messages (SWIM with Lifeguard, after memberlist's net.go).

Plain values; :mod:`hostmesh.catalog._codec` turns them into bytes and back.
``MsgType`` values are on the wire: ONLY APPEND TO THIS LIST.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._model import NodeRecord

__all__ = [
    "Ack",
    "Alive",
    "Dead",
    "IndirectPing",
    "KeyringOp",
    "KeyringRequest",
    "KeyringResponse",
    "MemberState",
    "MemberStatus",
    "Message",
    "MsgType",
    "Nack",
    "Ping",
    "PushPull",
    "Records",
    "Suspect",
]


class MsgType(enum.IntEnum):
    """Message type bytes. ONLY APPEND TO THIS LIST."""

    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    SUSPECT = 5
    ALIVE = 6
    DEAD = 7
    RECORDS = 8
    PUSH_PULL = 9
    COMPOUND = 10
    KEYRING_REQUEST = 11
    KEYRING_RESPONSE = 12


class MemberStatus(enum.IntEnum):
    """A member's state as gossip sees it. ONLY APPEND TO THIS LIST."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class KeyringOp(enum.IntEnum):
    """Keyring operations rolled across the cluster. ONLY APPEND TO THIS LIST."""

    LIST = 0
    INSTALL = 1
    USE = 2
    REMOVE = 3


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe. ``target`` guards against a reused address answering for
    another node; ``source``/``source_addr`` let the target ack and learn us."""

    seq: int
    target: str
    source: str
    source_addr: str  # host:port


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask the receiver to probe ``target`` for ``source``; ``nack`` asks for a
    Nack when the target does not answer in time (Lifeguard)."""

    seq: int
    target: str
    target_addr: str
    source: str
    source_addr: str
    nack: bool = True


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    seq: int


@dataclass(frozen=True, slots=True)
class Suspect:
    incarnation: int
    node: str
    source: str  # who suspects (independent confirmations count distinct sources)


@dataclass(frozen=True, slots=True)
class Alive:
    incarnation: int
    node: str
    addr: str  # host:port of its gossip listener
    meta: Mapping[str, str] = field(default_factory=dict)  # az, region, ...


@dataclass(frozen=True, slots=True)
class Dead:
    """``source == node`` means a graceful leave."""

    incarnation: int
    node: str
    source: str


@dataclass(frozen=True, slots=True)
class Records:
    """Catalog deltas: node records, merged by (generation, version)."""

    records: tuple[NodeRecord, ...]


@dataclass(frozen=True, slots=True)
class MemberState:
    name: str
    addr: str
    incarnation: int
    status: MemberStatus
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full-state exchange over TCP (first phase).

    ``members`` is the sender's membership; ``digest`` maps node -> (generation,
    version) of its catalog records; ``records`` carries the records the sender
    already knows the peer lacks (second phase, or the join reply).
    """

    join: bool
    members: tuple[MemberState, ...]
    digest: Mapping[str, tuple[int, int]]
    records: tuple[NodeRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyringRequest:
    """Apply ``op`` with ``key`` (base64; "" for LIST) and answer ``origin_addr``.

    Broadcast like membership news, so it reaches every member; ``id`` makes
    each member apply it once.
    """

    id: int
    op: KeyringOp
    key: str
    origin_addr: str


@dataclass(frozen=True, slots=True)
class KeyringResponse:
    """One member's answer: its keys after the operation (base64, primary first)."""

    id: int
    node: str
    ok: bool
    error: str
    keys: tuple[str, ...]


Message = (
    Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | Records | PushPull
    | KeyringRequest | KeyringResponse
)  # fmt: skip
