"""The multimodal model's settings: the backend and model, the request (question, images,
clips), the budget across sources, and the techniques that make calls cheaper (token
reuse, clip compression, memory, layer exit)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from stream_rt.config.base import StrictModel


class TokenReuseConfig(StrictModel):
    enabled: bool = Field(
        False, title="Enabled", description="recompute only the visual tokens that changed since the last call"
    )
    static_threshold: float = Field(
        0.996, gt=0, le=1.01, title="Static threshold", description="a token is static at this patch similarity"
    )
    max_patch_difference: float = Field(
        6.0,
        ge=0,
        title="Largest patch difference",
        description="...and at most this mean luma difference from the patch it was computed from",
    )
    start_layer: int = Field(
        2, ge=0, title="Start layer", description="layers every token is computed in before reuse starts"
    )
    relevant_share: float = Field(
        0.1,
        ge=0,
        le=1,
        title="Relevant share",
        description="share of visual tokens the question attended to most, always recomputed",
    )
    max_changed: float = Field(
        0.6, ge=0, le=1, title="Most changed share", description="above this share of changed tokens: a plain full call"
    )
    schedule: Literal["fixed", "entropy"] = Field(
        "fixed",
        title="Schedule",
        description="'fixed': reuse every static token from start_layer on; 'entropy': VLA-Cache's ratios",
    )
    tiles: Literal["off", "exact", "static"] = Field(
        "static",
        title="Tile reuse",
        description="tiled encoders (SmolVLM): reuse a tile's encoder output when its pixels are identical ('exact') "
        "or all its tokens are static ('static')",
    )
    encoder_partial: bool = Field(
        True,
        title="Partial encoding",
        description="tiled encoders: re-encode only the patches under changed tokens, reusing the rest's K/V",
    )
    max_entries: int = Field(
        8,
        ge=1,
        title="Cache entries",
        description="cached calls (one per source and question) kept at most; the least recently used goes",
    )
    max_entries_per_source: int = Field(
        2,
        ge=1,
        title="Cache entries per source",
        description="...of them for one source; a question asked once goes before one asked repeatedly",
    )
    max_mib: float = Field(
        512.0,
        gt=0,
        title="Cache size (MiB)",
        description="MiB of K/V, patches and tiles the cache holds at most (host or GPU memory)",
    )


class ClipConfig(StrictModel):
    frames: int = Field(
        1,
        ge=1,
        le=64,
        title="Frames",
        description="frames per request: 1 = the event's keyframe; more = a clip ending at the event",
    )
    interval_s: float = Field(
        0.5, gt=0, title="Frame interval (s)", description="clips: one frame every this many seconds of media time"
    )
    compression: Literal["audio", "uniform", "off"] = Field(
        "audio",
        title="Token compression",
        description="clips: drop visual tokens, more where there is sound ('audio', OmniZip style), evenly "
        "('uniform'), or not at all ('off')",
    )
    keep: float = Field(0.4, gt=0, le=1, title="Kept share", description="clips: average share of visual tokens kept")
    window_s: float = Field(
        2.0,
        gt=0,
        title="Compression window (s)",
        description="clips: audio-guided compression sets keep rates per window",
    )
    sound: bool = Field(
        True,
        title="Sound",
        description="clips: send the clip's sound (16 kHz mono) to a model that takes audio (Qwen2.5-Omni's or "
        "Qwen3-Omni's thinker); other models never get it",
    )
    audio_keep: float = Field(
        0.7,
        gt=0,
        le=1,
        title="Kept share of audio tokens",
        description="clips, a model that hears them with compression 'audio': the share of its audio tokens kept, "
        "those its audio encoder attended to most (OmniZip); each window's share kept sets its video keep rate",
    )


class MemoryConfig(StrictModel):
    enabled: bool = Field(
        False, title="Enabled", description="keep a fixed-size memory per source and put it before every prompt"
    )
    max_entries: int = Field(
        16, ge=3, title="Entries", description="entries per source at most; the most alike neighbours merge"
    )
    anchors: int = Field(2, ge=0, title="Anchors", description="the first entries of a source, never merged")
    tokens: int = Field(16, ge=1, title="Tokens per entry", description="pooled visual tokens per entry")
    text_tokens: int = Field(
        32, ge=0, title="Text tokens per entry", description="tokens of each entry's text in the prompt"
    )
    snapshot: Path | None = Field(
        None, title="Snapshot file", description="restore the memory from this file at start; save it there"
    )
    snapshot_interval_s: float = Field(
        60.0, gt=0, title="Snapshot interval (s)", description="save the snapshot this often (and at stop)"
    )
    refresh: Literal["episode", "call"] = Field(
        "episode",
        title="Refresh",
        description="'episode': every call of an episode sees the memory as the episode began (its prefix K/V and "
        "token reuse carry through the episode; what the episode's answers leave shows from the next one); 'call': "
        "every call sees the latest memory (each call recomputes the prefix)",
    )

    @model_validator(mode="after")
    def _room_to_merge(self) -> MemoryConfig:
        if self.anchors >= self.max_entries - 1:
            raise ValueError(f"anchors ({self.anchors}) must be below max_entries - 1 ({self.max_entries - 1})")
        return self


class MllmConfig(StrictModel):
    backend: Literal["transformers", "openai"] = Field(
        "transformers",
        title="Backend",
        description="'transformers': a local model; 'openai': an OpenAI-compatible server",
    )
    model: str = Field(
        "smoke",
        title="Model",
        description="transformers: a model directory, a hub id already in the local cache, or 'smoke' (random "
        "weights, not meaningful); openai: the model name the server knows",
    )
    url: str | None = Field(
        None, title="Server URL", description="openai: the server's base URL, e.g. 'http://127.0.0.1:8000/v1'"
    )
    api_key: str | None = Field(
        None, repr=False, title="API key", description="openai: default $STREAM_RT_MLLM_API_KEY (prefer it)"
    )
    device: str = Field("cpu", title="Device", description="transformers: 'cpu', 'cuda' or 'cuda:N'")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        title="Weights' type",
        description="transformers: weights' type; 'auto' = bfloat16 on CUDA, float32 on CPU",
    )
    threads: int | None = Field(
        None, ge=1, title="Threads", description="transformers: CPU threads for the model (default: torch's)"
    )
    allow_download: bool = Field(
        False, title="Allow download", description="transformers: download hub models that are not cached"
    )
    max_new_tokens: int = Field(128, ge=1, title="Longest answer", description="longest answer, in tokens")
    contract_stop: bool = Field(
        True, title="Contract stop", description="stop decoding as soon as the JSON answer is complete"
    )
    token_reuse: TokenReuseConfig = Field(
        default_factory=TokenReuseConfig,
        title="Token reuse",
        description="recompute only the visual tokens that changed since the last call",
    )
    clip: ClipConfig = Field(
        default_factory=ClipConfig,
        title="Clips",
        description="how many frames a request shows the model, and how their tokens are compressed",
    )
    memory: MemoryConfig = Field(
        default_factory=MemoryConfig,
        title="Memory",
        description="a fixed-size memory per source, put before every prompt",
    )
    layer_exit_every: int = Field(
        0,
        ge=0,
        title="Layer exit interval",
        description="transformers: evaluate an early exit every N layers while decoding (0: off)",
    )
    layer_exit_thresholds: list[float] = Field(
        default_factory=list,
        title="Layer exit thresholds",
        description="per exit after the first: leave when successive exits' token distributions are closer than this "
        "(calibrate with benchmarks/mllm.py; empty or 0: never leave early)",
    )
    question: str | None = Field(
        None, title="Question", description="what to ask about each event (default: a general question)"
    )
    timeout_s: float = Field(
        120.0, gt=0, title="Timeout (s)", description="an answer that takes longer is reported as a timeout"
    )
    flow: Literal["latest", "block"] = Field(
        "latest",
        title="Flow",
        description="model busy: 'latest' keeps only the newest waiting request (live); 'block' waits (default "
        "of replays: every request is answered)",
    )
    max_image_side: int = Field(
        768, ge=32, title="Longest image side", description="scale keyframes down to this longest side"
    )
    crop_regions: bool = Field(
        True, title="Crop regions", description="add a close-up of small changed regions as a second image"
    )
    reuse_threshold: float = Field(
        0.02,
        ge=0,
        le=1,
        title="Answer reuse threshold",
        description="reuse the last answer while at most this share of the scene changed (0: never)",
    )
    reuse_max_age_s: float = Field(
        120.0, gt=0, title="Answer reuse age (s)", description="...and the last answer is younger than this"
    )
    max_in_flight: int | None = Field(
        None,
        ge=1,
        title="Calls at once",
        description="model calls at once across sources, taken round-robin (default: 1 for "
        "'transformers', which runs one call at a time, 4 for 'openai')",
    )
    calls_per_minute: int = Field(
        0,
        ge=0,
        title="Calls per minute",
        description="routine model calls a minute across all sources, beyond which they are answered "
        "'dropped' (0: only the trigger's budget per source); asked questions are not counted",
    )

    @property
    def in_flight(self) -> int:
        """:attr:`max_in_flight`, or the backend's default."""
        return self.max_in_flight or (4 if self.backend == "openai" else 1)

    @model_validator(mode="after")
    def _openai_needs_url(self) -> MllmConfig:
        if self.backend == "openai" and not self.url:
            raise ValueError("the 'openai' backend needs url (e.g. 'http://127.0.0.1:8000/v1')")
        if self.in_flight > 1 and self.backend != "openai":
            raise ValueError("max_in_flight > 1 needs the 'openai' backend (a local model runs one call at a time)")
        if self.memory.enabled and self.backend != "transformers":
            raise ValueError("memory needs the 'transformers' backend (it feeds the model visual tokens)")
        return self
