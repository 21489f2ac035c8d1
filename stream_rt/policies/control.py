"""What commands change at run time, and the command target the MQTT sink acts on.

- :class:`EpisodeControls`: each source's trigger settings — its ``[trigger]`` section
  (the defaults with its own keys on top) and ``require_zones`` as configured — with what
  commands changed since: whether the source may open episodes, and its ``on`` / ``off``
  thresholds. The trigger reads them at every step; nothing else keeps them.
- :class:`SourceControl`: the command target (:class:`stream_rt.sinks.commands.CommandTarget`)
  — ``enabled`` and ``trigger`` change the episode controls, ``ask`` queues a question
  (:class:`~stream_rt.policies.asks.AskQueue`), ``watch`` sets or removes a standing watch
  (:class:`~stream_rt.policies.watches.WatchBook`).

The pipeline makes one of each concern and hands it to every node that needs it when the
node is built: the episode controls to the trigger, the ask queue to the trigger, the
watch book to the trigger and the MLLM stage, and all three to the command target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stream_rt.config import TriggerConfig
from stream_rt.policies.asks import AskQueue, AskRefused
from stream_rt.policies.watches import WatchBook


def _checked(config: TriggerConfig) -> TriggerConfig:
    if not 0 <= config.off <= config.on <= 1:
        raise ValueError(f"trigger thresholds need 0 <= off <= on <= 1, got on={config.on}, off={config.off}")
    return config


@dataclass
class _Switches:
    enabled: bool = True
    on: float | None = None  # set by a command (None: the configured one)
    off: float | None = None


class EpisodeControls:
    def __init__(
        self,
        default: TriggerConfig | None = None,
        sources: Mapping[str, TriggerConfig] | None = None,
        require_zones: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """``default``: the ``[trigger]`` section of every source without one of its own in
        ``sources``; ``require_zones``: a source's zones one of which a step must touch to
        open an episode (none: any step may)."""
        self.default = _checked(default if default is not None else TriggerConfig())
        self._configs = {source: _checked(config) for source, config in (sources or {}).items()}
        self._zones = {source: tuple(zones) for source, zones in (require_zones or {}).items()}
        self._switches: dict[str, _Switches] = {}

    def config(self, source_id: str) -> TriggerConfig:
        """The source's configured ``[trigger]`` section."""
        return self._configs.get(source_id, self.default)

    def configs(self) -> list[TriggerConfig]:
        """Every configured section: the default and each source's own."""
        return [self.default, *self._configs.values()]

    def require_zones(self, source_id: str) -> tuple[str, ...]:
        return self._zones.get(source_id, ())

    def thresholds(self, source_id: str) -> tuple[float, float]:
        """The source's ``on`` and ``off`` now (a command's, else the configured ones)."""
        config, switches = self.config(source_id), self._switches.get(source_id, _Switches())
        return (config.on if switches.on is None else switches.on, config.off if switches.off is None else switches.off)

    def overrides(self, source_id: str) -> tuple[float | None, float | None, bool]:
        """What commands set for the source: ``on``, ``off`` (None: not set) and enabled."""
        switches = self._switches.get(source_id, _Switches())
        return switches.on, switches.off, switches.enabled

    def set_enabled(self, source_id: str, enabled: bool) -> None:
        """Let a source open episodes, or not (its open episode ends at its next step)."""
        self._switches.setdefault(source_id, _Switches()).enabled = enabled

    def is_enabled(self, source_id: str) -> bool:
        switches = self._switches.get(source_id)
        return switches is None or switches.enabled

    def set_thresholds(self, source_id: str, on: float | None, off: float | None) -> None:
        """Override a source's on/off thresholds (``None`` keeps the current one)."""
        current_on, current_off = self.thresholds(source_id)
        new_on = on if on is not None else current_on
        new_off = off if off is not None else current_off
        if not 0 <= new_off <= new_on <= 1:
            raise ValueError(f"thresholds need 0 <= off <= on <= 1, got on={new_on}, off={new_off}")
        switches = self._switches.setdefault(source_id, _Switches())
        switches.on, switches.off = new_on, new_off


class SourceControl:
    """The command target: what ``<source>/<feature>/set`` commands act on."""

    def __init__(
        self, episodes: EpisodeControls, asks: AskQueue | None = None, watches: WatchBook | None = None
    ) -> None:
        """``asks`` / ``watches``: ``None`` when no model is configured (those commands are
        then refused)."""
        self.episodes = episodes
        self.asks = asks
        self.watches = watches

    def set_enabled(self, source_id: str, enabled: bool) -> None:
        self.episodes.set_enabled(source_id, enabled)

    def is_enabled(self, source_id: str) -> bool:
        return self.episodes.is_enabled(source_id)

    def set_thresholds(self, source_id: str, on: float | None, off: float | None) -> None:
        self.episodes.set_thresholds(source_id, on, off)

    def ask(self, source_id: str, question: str) -> str:
        """Queue a question about a source; at its next step an ``ask`` event carries it (and
        calls the model, outside the budget). Returns that event's id; raises
        :class:`AskRefused` when it cannot be kept (no model, the source offline or ended,
        too many questions still open)."""
        if self.asks is None:
            raise AskRefused("no model is configured to answer questions ([mllm] is missing)")
        return self.asks.ask(source_id, question)

    def set_watch(self, source_id: str, watch_id: str, condition: str, expires_s: float, recheck_s: float) -> None:
        """Set the source's standing watch (replacing the one it had)."""
        self._watches().set(source_id, watch_id, condition, expires_s, None, recheck_s)

    def remove_watch(self, source_id: str) -> None:
        self._watches().remove(source_id)

    def _watches(self) -> WatchBook:
        if self.watches is None:
            raise ValueError("no model is configured to check a watch ([mllm] is missing)")
        return self.watches
