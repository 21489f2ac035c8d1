"""Standing watches: conditions the model re-checks on a source, each with an id that names
its topics and records."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from stream_rt.config.base import StrictModel


def _not_set(watch_id: str) -> str:
    if watch_id == "set":  # its state is published on watch/<id>: "set" is the command topic
        raise ValueError("'set' cannot be a watch id")
    return watch_id


WatchId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$"), AfterValidator(_not_set)]
"""A watch's name as it appears in topics (``<source>/watch/<id>``)."""
MAX_WATCH_S = 366 * 86400.0
"""The longest ``expires_s`` and ``recheck_s`` a watch may have (a year), in the config or by command."""


class WatchConfig(StrictModel):
    id: WatchId = Field(title="Watch id", description="name of the watch in topics and records (not 'set')")
    source: str = Field(title="Source", description="the source it watches")
    condition: str = Field(
        min_length=1, max_length=1000, pattern=r"\S", title="Condition", description="what the model checks, in words"
    )
    expires_s: float = Field(
        0.0,
        ge=0,
        le=MAX_WATCH_S,
        allow_inf_nan=False,
        title="Expires after (s)",
        description="the watch ends this long after it is set (0: never)",
    )
    confirm: int = Field(
        2, ge=1, title="Confirmations", description="answers in a row that must agree to flip its state"
    )
    recheck_s: float = Field(
        0.0,
        ge=0,
        le=MAX_WATCH_S,
        allow_inf_nan=False,
        title="Recheck interval (s)",
        description="while unmet, ask the model about the view this often even without salience (0: never)",
    )
