"""Real etcd members on loopback for tests: one for the store contract, three for HA.

Every member is a real ``etcd`` process (Debian's etcd-server, installed by
scripts/test.sh) on free loopback ports with its data dir under the test's
tmp dir; :class:`EtcdCluster` starts them, waits until each one reports
healthy (a leader is elected), can SIGKILL one, and stops them all at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

#: Seconds a cluster may take to elect a leader and answer /health on a busy machine.
START_TIMEOUT = 30.0
#: Tries with fresh ports when a port was taken between picking and binding it.
START_ATTEMPTS = 3


def etcd_binary() -> str:
    """The etcd binary; a missing one is an error (scripts/test.sh installs it), never a skip."""
    path = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if path is None:
        raise RuntimeError("etcd is not installed: scripts/test.sh installs Debian's etcd-server")
    return path


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Member:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class EtcdCluster:
    """``size`` etcd members forming one new cluster under ``base``.

    Args:
        heartbeat_ms, election_ms: etcd's raft timing. A single member runs
            fast (50/500: leases as short as 1 s); a cluster keeps etcd's
            defaults (100/1000) so that a loaded machine does not flap.

    Use as a context manager: members are started on entry and stopped (and
    waited for) on exit.
    """

    def __init__(
        self, base: Path, size: int = 1, *, heartbeat_ms: int = 50, election_ms: int = 500
    ) -> None:
        self.base = base
        self.size = size
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.members: list[Member] = []

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        binary = etcd_binary()
        for attempt in range(1, START_ATTEMPTS + 1):
            self._spawn(binary, attempt)
            try:
                self._wait_healthy()
                return
            except RuntimeError:
                self.stop()
                if attempt == START_ATTEMPTS:
                    raise

    def _spawn(self, binary: str, attempt: int) -> None:
        ports = free_ports(2 * self.size)
        self.members = []
        for i in range(self.size):
            name = f"m{i}"
            data_dir = self.base / f"try{attempt}" / name
            data_dir.mkdir(parents=True)
            self.members.append(
                Member(
                    name=name,
                    client_url=f"http://127.0.0.1:{ports[2 * i]}",
                    peer_url=f"http://127.0.0.1:{ports[2 * i + 1]}",
                    data_dir=data_dir / "data",
                    log_path=data_dir / "etcd.log",
                )
            )
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.log = m.log_path.open("wb")
            m.process = subprocess.Popen(
                [
                    binary,
                    f"--name={m.name}",
                    f"--data-dir={m.data_dir}",
                    f"--listen-client-urls={m.client_url}",
                    f"--advertise-client-urls={m.client_url}",
                    f"--listen-peer-urls={m.peer_url}",
                    f"--initial-advertise-peer-urls={m.peer_url}",
                    f"--initial-cluster={initial}",
                    "--initial-cluster-state=new",
                    f"--initial-cluster-token=hostmesh-test-{os.getpid()}-{attempt}",
                    f"--heartbeat-interval={self.heartbeat_ms}",
                    f"--election-timeout={self.election_ms}",
                    "--logger=zap",
                    "--log-level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=m.log,
                stderr=subprocess.STDOUT,
            )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(self.members)
        with httpx.Client(trust_env=False, timeout=1.0) as http:
            while pending:
                for m in list(pending):
                    assert m.process is not None
                    if m.process.poll() is not None:
                        raise RuntimeError(f"etcd {m.name} exited:\n{m.log_tail()}")
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        if http.get(f"{m.client_url}/health").json().get("health") == "true":
                            pending.remove(m)
                if pending and time.monotonic() > deadline:
                    tails = "\n".join(f"--- {m.name}\n{m.log_tail()}" for m in pending)
                    raise RuntimeError(f"etcd not healthy within {START_TIMEOUT} s:\n{tails}")
                if pending:
                    time.sleep(0.05)  # polling the members' /health, bounded by the deadline

    def kill(self, endpoint: str) -> None:
        """SIGKILL the member serving ``endpoint`` (no clean shutdown) and reap it."""
        for m in self.members:
            if m.client_url == endpoint and m.process is not None:
                m.process.send_signal(signal.SIGKILL)
                m.process.wait(timeout=10)
                return
        raise KeyError(endpoint)

    def stop(self) -> None:
        for m in self.members:
            if m.process is not None and m.process.poll() is None:
                m.process.terminate()
        for m in self.members:
            if m.process is not None:
                try:
                    m.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    m.process.kill()
                    m.process.wait(timeout=10)
            if m.log is not None:
                m.log.close()
                m.log = None
