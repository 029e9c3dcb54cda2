"""systemd service notifications (sd_notify(3)) without a dependency.

Under a ``Type=notify`` unit systemd passes ``NOTIFY_SOCKET`` (a unix datagram
socket: a path, or ``@name`` for the abstract namespace) and, with
``WatchdogSec=``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. The daemons send:

- ``READY=1`` once every listener is bound (``Agent.run`` and ``Server.run``,
  just before ``task_status.started``), with a ``STATUS=`` line saying where
  they listen;
- ``RELOADING=1`` ... ``READY=1`` around a SIGHUP reload;
- ``STOPPING=1`` when shutdown starts;
- ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` from a task in the daemon's own
  Trio loop (sd_watchdog_enabled(3) recommends half the interval), so the pings
  stop when the loop is wedged and systemd restarts the service.

Without ``NOTIFY_SOCKET`` every call is a no-op. A send never raises and never
blocks the loop: notifications are advisory and systemd's reply to a lost
``READY=1`` (a start timeout) is visible on its own.

The first :func:`notifier` call reads the variables and removes them from
``os.environ`` (as ``sd_notify(unset_environment=1)`` would), so check scripts
and other children do not inherit them and talk to systemd in our name.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

import trio

from ._log import get_logger

__all__ = [
    "MAX_MESSAGE",
    "MAX_STATUS",
    "Notifier",
    "notifier",
]

log = get_logger("hostmesh.systemd")

#: Bytes in one notification datagram. systemd reads at most PIPE_BUF (4096)
#: bytes per message (NOTIFY_BUFFER_MAX in src/core/manager.c) and drops longer
#: ones whole; we cut STATUS= text instead so the rest still arrives.
MAX_MESSAGE = 4096
#: Characters of a STATUS= line: one line in ``systemctl status``.
MAX_STATUS = 512
#: Longest unix socket path (``sun_path`` is 108 bytes on Linux, NUL included).
MAX_SOCKET_PATH = 107
#: Shortest watchdog period honoured, in µs. Pinging every 50 ms is as often as
#: a Python loop should; smaller values are a misconfiguration.
MIN_WATCHDOG_USEC = 100_000
#: Longest watchdog period honoured, in µs (one day); anything larger is garbage.
MAX_WATCHDOG_USEC = 24 * 3600 * 1_000_000


class Notifier:
    """Sends notifications to systemd over ``NOTIFY_SOCKET``.

    Args:
        address: the socket (a path, or ``@name`` for the abstract namespace);
            ``""`` disables every notification.
        watchdog_usec: systemd's watchdog period in µs; 0 = no watchdog.

    The notifier owns its socket; :meth:`close` closes it (the process-wide one
    lives as long as the process).
    """

    def __init__(self, address: str = "", watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False
        self._pinging = False

    @classmethod
    def from_env(
        cls, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
    ) -> Notifier:
        """Read (and remove) ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        Bad values are logged once and switch off what they configure, never
        the daemon: a unit with a typo must still start.
        """
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        usec_text = env.pop("WATCHDOG_USEC", "")
        pid_text = env.pop("WATCHDOG_PID", "")
        if address and not _valid_address(address):
            log.warning("NOTIFY_SOCKET ignored: not a path or @name", value=address[:200])
            address = ""
        usec = _watchdog_usec(usec_text, pid_text, os.getpid() if pid is None else pid)
        return cls(address, usec if address else 0)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def watchdog_interval(self) -> float:
        """Seconds between WATCHDOG=1 pings (half the period); 0 = no watchdog."""
        return self.watchdog_usec / 2 / 1_000_000 if self.enabled else 0.0

    def send(self, fields: Mapping[str, str]) -> bool:
        """Send one notification (``KEY=value`` lines); True when it was sent.

        Values are made single-line. Errors are logged once and otherwise
        ignored; the socket never blocks (a full systemd queue drops the message).
        """
        if not self.address:
            return False
        message = "".join(f"{k}={_one_line(v)}\n" for k, v in fields.items()).encode()
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 1].rsplit(b"\n", 1)[0] + b"\n"
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, _sockaddr(self.address))
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "systemd notification not delivered",
                    socket=self.address,
                    error=errno.errorcode.get(exc.errno or 0, str(exc)),
                )
            return False
        return True

    def ready(self, status: str) -> bool:
        """Every listener is bound: ``READY=1`` and a status line."""
        return self.send({"READY": "1", "STATUS": _status(status)})

    def status(self, status: str) -> bool:
        return self.send({"STATUS": _status(status)})

    def reloading(self, status: str = "reloading") -> bool:
        """A reload starts; follow it with :meth:`ready` (systemd waits for it)."""
        monotonic_usec = str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        return self.send(
            {"RELOADING": "1", "MONOTONIC_USEC": monotonic_usec, "STATUS": _status(status)}
        )

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown started; ``status`` (if given) says why. Repeats are harmless."""
        fields = {"STOPPING": "1"}
        if status is not None:
            fields["STATUS"] = _status(status)
        return self.send(fields)

    async def watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` every half period until cancelled; never returns otherwise.

        Returns at once without a watchdog, or when another task of this
        process already pings (``hostmesh dev`` runs several daemons in one loop).
        """
        interval = self.watchdog_interval
        if interval <= 0 or self._pinging:
            return
        self._pinging = True
        try:
            while True:
                self.send({"WATCHDOG": "1"})
                await trio.sleep(interval)
        finally:
            self._pinging = False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_NOTIFIER: Notifier | None = None


def notifier() -> Notifier:
    """The process's notifier, made from (and removing) the environment on first use."""
    global _NOTIFIER
    if _NOTIFIER is None:
        _NOTIFIER = Notifier.from_env()
    return _NOTIFIER


def _valid_address(address: str) -> bool:
    if address.startswith("@"):
        return 1 < len(address.encode()) <= MAX_SOCKET_PATH + 1 and "\0" not in address
    return (
        address.startswith("/") and len(address.encode()) <= MAX_SOCKET_PATH and "\0" not in address
    )


def _sockaddr(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def _watchdog_usec(usec_text: str, pid_text: str, pid: int) -> int:
    """sd_watchdog_enabled(3): the period, or 0 when unset, invalid or for another pid."""
    if not usec_text:
        return 0
    if pid_text and (not pid_text.isdigit() or int(pid_text) != pid):
        return 0  # meant for another process (e.g. our parent)
    if not usec_text.isdigit() or not MIN_WATCHDOG_USEC <= int(usec_text) <= MAX_WATCHDOG_USEC:
        log.warning(
            "WATCHDOG_USEC ignored: expected µs between "
            f"{MIN_WATCHDOG_USEC} and {MAX_WATCHDOG_USEC}",
            value=usec_text[:64],
        )
        return 0
    return int(usec_text)


def _one_line(value: str) -> str:
    return " ".join(value.splitlines())


def _status(text: str) -> str:
    """A STATUS= value: one line, at most MAX_STATUS characters."""
    return _one_line(text)[:MAX_STATUS]
