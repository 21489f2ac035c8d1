"""Operations: logging setup (metrics and health endpoints plug in here)."""

from stream_rt.ops.logging import setup_logging

__all__ = ["setup_logging"]
