"""Loopback ports for test services: find a free one, wait until a process listens."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def listening(port: int) -> bool:
    """True once a TCP port on this machine is in LISTEN state (read from /proc, because a
    probe connection could take a one-client server's only accept)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                return True
    return False


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Wait until ``proc`` listens on ``port``; raises RuntimeError if it exits or takes
    longer than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"process {proc.pid} ({proc.args!r}) did not start listening on port {port}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
