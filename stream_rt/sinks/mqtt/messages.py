"""Where each thing is published and in what shape: topics under the prefix, JSON payloads."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    """Topics under one prefix (``stream_rt`` by default): ``topics("gate", "status")``
    is ``stream_rt/gate/status``."""

    prefix: str

    def __call__(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))


def encode(record: dict[str, object]) -> bytes:
    """A record as compact JSON."""
    return json.dumps(record, separators=(",", ":")).encode()


def status_record(state: str, detail: str, wall_ns: int, streams: tuple[str, ...] = ()) -> dict[str, object]:
    """A source's ``status`` payload: ``online`` | ``offline``, why, and what it delivers."""
    return {"state": state, "detail": detail, "streams": list(streams), "wall_ns": wall_ns}
