"""What every config model shares: strictness (unknown keys refused, values frozen) and the
one error a config that cannot be used raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """The configuration cannot be used; ``str()`` is one line per problem."""


class StrictModel(BaseModel):
    """A config section: unknown keys are refused, a parsed value is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
