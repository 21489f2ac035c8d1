"""What the benchmarks share: the bare PyAV decode loop they measure the graph against."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import av


def rss_mb() -> float:
    """This process's resident memory, in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_growth(series: list[float]) -> dict[str, float]:
    """RSS after the warm-up (median of the tenth after the first fifth of the samples)
    and at the end (median of the last tenth), and the growth between them."""
    n = len(series)
    warm, tenth = n // 5, max(1, n // 10)
    after, end = statistics.median(series[warm : warm + tenth]), statistics.median(series[-tenth:])
    return {"rss_after_warmup_mb": after, "rss_end_mb": end, "rss_growth": round(end / after - 1, 4)}


def bare_decode(clip: Path) -> tuple[int, float]:
    """Frames and seconds of a hand-written PyAV decode loop, threaded as the source is."""
    started = time.perf_counter()
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = sum(1 for _ in container.decode(stream))
    return frames, time.perf_counter() - started


def audio_features(clip: Path) -> list[Any]:
    """The audio features the daemon computes of ``clip``'s sound (none without sound)."""
    import asyncio

    from stream_rt import AudioFeatures, AvSource, CallbackSink, Graph, Packet, ReplayClock
    from stream_rt.operators.audio import AudioAnalyzer

    got: list[Packet] = []
    graph = Graph(clock=ReplayClock(None))
    graph.add(AvSource("cam", str(clip), video=False))
    graph.add(AudioAnalyzer("audio"))
    graph.add(CallbackSink("sink", got.append))
    graph.connect("cam.audio", "audio.audio", policy="block", capacity=64)
    graph.connect("audio.features", "sink.in", policy="block", capacity=64)
    asyncio.run(graph.run())
    return [p for p in got if isinstance(p, AudioFeatures)]


def one_tile_per_frame(backend: Any) -> None:
    """SmolVLM's smallest image setting, as for video: each frame one 512 px tile (64 tokens)."""
    image_processor = backend.family.processor.image_processor
    image_processor.do_image_splitting = False
    image_processor.size = {"longest_edge": 512}


def kv_of(cache: Any) -> tuple[list[Any], list[Any]]:
    """A transformers KV cache's K/V per layer, as the backend's decoding takes them."""
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def copy_cache(backend: Any, cache: Any) -> Any:
    """A second KV cache with the same contents (decoding grows the first one)."""
    return backend.cache_of([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])


def answer_fidelity(
    reference: tuple[Any, Any, Any, Any], other: tuple[Any, Any, Any, Any], tokens: list[int]
) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || other) of the next-token distributions over
    the answer positions, feeding the same ``tokens`` after each prompt (teacher forcing).
    Each side is (backend, prepared request, first logits, KV cache after the prompt)."""
    p, q = (_teacher_forced(*side, tokens).log_softmax(-1) for side in (reference, other))
    return float((p.argmax(-1) == q.argmax(-1)).float().mean()), float((p.exp() * (p - q)).sum(-1).mean())


def _teacher_forced(backend: Any, prepared: Any, first: Any, cache: Any, tokens: list[int]) -> Any:
    import torch

    ids = torch.tensor([tokens[:-1]])
    positions = torch.arange(prepared.next_position, prepared.next_position + len(tokens) - 1)[None]
    if prepared.position_ids is not None and prepared.position_ids.dim() == 3:
        positions = positions.expand(3, 1, -1)  # M-RoPE: text positions on all three axes
    out = backend.model.get_decoder()(inputs_embeds=backend.model.get_input_embeddings()(ids), position_ids=positions,
                                      use_cache=True, **{backend.cache_kw: cache})  # fmt: skip
    return torch.cat([first, backend.model.lm_head(out.last_hidden_state[0]).float()])
