"""Real helper processes for tests: a mosquitto broker, and waiting for a port to listen."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
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
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not start listening on port {port}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


RecordProperty = Callable[[str, object], None]
"""pytest's ``record_property`` fixture: figures of a fault test for ``benchmarks/faults.py``."""


class Broker:
    """A real mosquitto on a loopback port, which tests can kill and start again."""

    def __init__(
        self, port: int, workdir: Path, persistent: bool = False, auth: Path | None = None, tls: Path | None = None
    ) -> None:
        self.port = port
        self.config = workdir / "mosquitto.conf"
        # persistent: sessions and queued messages are saved on every change, so a test
        # subscriber's session survives a kill; messages go to subscribers at once (no
        # in-flight window), so what the broker acknowledged is already on its way to them.
        persistence = (
            f"persistence true\npersistence_location {workdir}/\n"
            "autosave_interval 1\nautosave_on_changes true\nmax_inflight_messages 0\n"
        )
        self.config.write_text(
            # user root: stay able to read files in the test's private tmp dir when run as root.
            f"listener {port} 127.0.0.1\nlog_dest none\nuser root\n"
            + (f"allow_anonymous false\npassword_file {auth}\n" if auth else "allow_anonymous true\n")
            + (persistence if persistent else "persistence false\n")
            + (
                f"cafile {tls}/ca.crt\ncertfile {tls}/server.crt\nkeyfile {tls}/server.key\nrequire_certificate true\n"
                if tls
                else ""
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdin=subprocess.DEVNULL)
        wait_listening(self.port, self.proc)

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(5)


def make_certificates(directory: Path) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, made
    with the openssl command line."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    directory.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "san.cnf"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", f"{name}.crt", *extra)  # fmt: skip
    return directory
