"""Where events, answers and status leave the process: a JSON Lines file and an MQTT broker."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from stream_rt.config.base import StrictModel


class JsonlSinkConfig(StrictModel):
    path: Path = Field(title="Events file", description="file the events are appended to, one JSON object per line")
    video: bool = Field(False, title="Video records", description="also log a record per video frame")
    audio: bool = Field(False, title="Audio records", description="also log a record per audio chunk")
    snapshots_dir: Path | None = Field(
        None, title="Snapshots folder", description="write event snapshots here as <event_id>-<seq>.jpg"
    )


class MqttSinkConfig(StrictModel):
    host: str = Field("127.0.0.1", title="Broker host", description="broker host")
    port: int = Field(1883, ge=1, le=65535, title="Broker port", description="broker port")
    prefix: str = Field(
        "stream_rt", pattern=r"^[^#+]+$", title="Topic prefix", description="topic prefix (no wildcards)"
    )
    client_id: str | None = Field(None, title="Client id", description="MQTT client id; default: generated")
    username: str | None = Field(None, title="Username", description="default: $STREAM_RT_MQTT_USERNAME")
    password: str | None = Field(
        None, repr=False, title="Password", description="default: $STREAM_RT_MQTT_PASSWORD (prefer it)"
    )
    outbox: Path = Field(
        Path("stream_rt-outbox.sqlite"), title="Outbox file", description="SQLite file holding unacknowledged messages"
    )
    stats_interval_s: float = Field(
        30.0, gt=0, title="Stats interval (s)", description="publish the graph's counters on <prefix>/stats this often"
    )
    tls_ca: Path | None = Field(
        None,
        title="TLS CA certificate",
        description="CA certificate: connect with TLS and verify the broker against it",
    )
    tls_cert: Path | None = Field(
        None, title="TLS client certificate", description="client certificate, for brokers that require one"
    )
    tls_key: Path | None = Field(None, title="TLS client key", description="the client certificate's private key")
    snapshots: bool = Field(
        True,
        title="Event snapshots",
        description="publish the frame of each event but 'end' as a JPEG, retained, on <prefix>/<source>/snapshot",
    )
    home_assistant: bool = Field(
        False, title="Home Assistant discovery", description="publish Home Assistant MQTT discovery for each source"
    )
    discovery_prefix: str = Field(
        "homeassistant", pattern=r"^[^#+]+$", title="Discovery prefix", description="Home Assistant's discovery prefix"
    )


class SinksConfig(StrictModel):
    jsonl: JsonlSinkConfig | None = Field(
        None,
        title="JSON Lines file",
        description="append events, answers and each source's status to a file (off when absent)",
    )
    mqtt: MqttSinkConfig | None = Field(
        None,
        title="MQTT",
        description="publish events, answers and each source's status to an MQTT broker (off when absent)",
    )
