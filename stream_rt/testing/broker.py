"""MQTT for tests: a real mosquitto broker on a loopback port, a subscriber that records
everything under a topic, and throw-away TLS certificates for both."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from stream_rt.testing.ports import wait_listening


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


class Subscriber:
    """Collects every message under a prefix with paho-mqtt in its own thread: a message is
    recorded in the callback, before its acknowledgement goes back, and the session is
    persistent (QoS 1) and reconnects by itself, so nothing is lost on this side."""

    def __init__(self, port: int, topic: str = "stream_rt/#") -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connected = asyncio.Event()
        loop = asyncio.get_running_loop()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-subscriber-{port}", clean_session=False)
        client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # paho takes fractions of a second too

        def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
            c.subscribe(topic, qos=1)
            loop.call_soon_threadsafe(self.connected.set)

        def on_message(c: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

        client.on_connect, client.on_message = on_connect, on_message
        client.connect_async("127.0.0.1", port)
        client.loop_start()
        self._client = client

    def payloads(self, suffix: str) -> list[dict[str, object]]:
        return [json.loads(p) for t, p, _ in list(self.messages) if t.endswith(suffix)]

    async def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


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
