"""The version of stream_rt (as pyproject.toml states it), importable from every floor."""

__version__ = "0.1.0"
