"""What is checked before anything runs, so a bad input is one line and exit code 2
instead of a graph that starts and fails: a file source that cannot be read, a model that
cannot be used, and, for ``stream-rt validate``, the whole config."""

from __future__ import annotations

import json
from pathlib import Path

from stream_rt.config import ConfigError, load_config
from stream_rt.mllm.backend import ModelUnavailable
from stream_rt.pipeline import Pipeline, build_backend, build_source
from stream_rt.sources.av_source import AvSource, SourceError
from stream_rt.sources.status import StatusSource


def check_sources(pipeline: Pipeline) -> None:
    """Raise :class:`SourceError` (one line) for a file source that cannot be read."""
    for source in pipeline.sources:
        check_source(source)


def check_source(source: StatusSource) -> None:
    """Open a file source once (:meth:`AvSource.check`); other sources need no check."""
    if isinstance(source, AvSource):
        source.check()


def check_model(pipeline: Pipeline) -> None:
    """Raise :class:`ModelUnavailable` (one line) for a model that cannot be used; what
    only loading can find out (damaged weights) still stops the graph at start."""
    if pipeline.mllm is not None:
        pipeline.mllm.backend.check()


def validate(path: Path, effective: bool = False) -> str:
    """Check the config at ``path`` as ``run`` would before starting (its objects, file
    sources and model); raises :class:`ConfigError` (one line) or returns the ``OK`` line,
    followed, with ``effective``, by each source's effective settings as TOML."""
    from stream_rt.operators.detectors import COCO_LABELS, DEFAULT_MODEL

    config = load_config(path)
    for source in config.sources:  # the packaged detector's names are known before anything loads
        own = config.settings(source.id)
        unknown = [o for o in own.objects if own.detect.model == DEFAULT_MODEL and o not in COCO_LABELS]
        if unknown:
            raise ConfigError(f"{path}: sources ({source.id}): objects {unknown} are not COCO labels "
                              f"(such as {', '.join(COCO_LABELS[:3])}, traffic_light)")  # fmt: skip
    for source in config.sources:  # a file that is not there (or not media) fails here, not at `run`
        try:
            check_source(build_source(source))
        except SourceError as exc:
            raise ConfigError(f"{path}: sources ({source.id}): {exc}") from None
    model = None
    if config.mllm is not None:
        try:
            model = build_backend(config.mllm).check()
        except ModelUnavailable as exc:
            raise ConfigError(f"{path}: [mllm] model: {exc}") from None
    ids = ", ".join(s.id for s in config.sources) or "none"
    lines = [f"{path}: OK ({len(config.sources)} sources: {ids})" + (f"; model {model}" if model else "")]
    if effective:
        for source in config.sources:
            lines.append(f"\n[sources.{source.id}]  # effective settings")
            settings = config.settings(source.id).model_dump(mode="json", exclude_none=True)
            settings.setdefault("question", None)
            for key, value in settings.items():
                lines.append(
                    f"{key} = {_toml(value)}" if value is not None else f"# {key}: not set (the built-in default)"
                )
    return "\n".join(lines)


def _toml(value: object) -> str:
    """A value as TOML writes it (JSON's form is TOML's, but for tables)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)
