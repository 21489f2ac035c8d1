"""The trigger's settings: when salience opens, updates and ends an episode, and the model
call budget per source."""

from __future__ import annotations

from pydantic import Field

from stream_rt.config.base import StrictModel


class TriggerConfig(StrictModel):
    on: float = Field(0.5, ge=0, le=1, title="On threshold", description="score that opens an episode")
    off: float = Field(0.3, ge=0, le=1, title="Off threshold", description="score below which an episode may end")
    confirm_s: float = Field(
        0.1, ge=0, title="Confirm (s)", description="how long the score must stay on before an episode opens"
    )
    cutoff_s: float = Field(3.0, gt=0, title="Cutoff (s)", description="how long below 'off' ends an episode")
    update_interval_s: float = Field(
        10.0, gt=0, title="Update interval (s)", description="at most one update per episode this often"
    )
    max_episode_s: float = Field(
        600.0, gt=0, title="Longest episode (s)", description="longest episode before it is ended and reopened"
    )
    cooldown_s: float = Field(
        2.0, ge=0, title="Cooldown (s)", description="least time between two model calls of a source"
    )
    max_calls_per_min: float = Field(
        6.0, gt=0, title="Calls per minute", description="most model calls per source per minute"
    )
    snapshot: bool = Field(False, title="Snapshots", description="attach a JPEG of the frame to new and update events")
    ask_wait_s: float = Field(
        2.0,
        gt=0,
        title="Ask wait (s)",
        description="an ask command waits at most this long for the source's next step, then is asked "
        "about its last frame",
    )
