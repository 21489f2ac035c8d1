"""Operating the daemon: its HTTP endpoints (/healthz, /metrics) and its log."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stream_rt.config.base import StrictModel


class OpsConfig(StrictModel):
    http: str | None = Field(
        None,
        pattern=r"^[^:]+:\d+$",
        title="HTTP address",
        description="serve /healthz and /metrics here, e.g. '127.0.0.1:9108'",
    )
    offline_grace_s: float = Field(
        30.0, ge=0, title="Offline grace (s)", description="/healthz fails once a source is offline this long"
    )


class LoggingConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", title="Level", description="least severe message logged"
    )
    format: Literal["text", "json"] = Field("text", title="Format", description="'json': one JSON object per line")
