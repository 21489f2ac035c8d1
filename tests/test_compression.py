"""Audio-guided token compression on the audio-visual sample (real video, real speech at
known times): the budget holds, position ids are kept, windows with speech keep more."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_rt import AudioFeatures, AvSource, CallbackSink, Graph, Packet, ReplayClock, VideoFrame
from stream_rt.mllm.prompt import chat_messages
from stream_rt.operators.audio import AudioAnalyzer
from stream_rt.operators.compression import FrameTokens, compress, density_peaks, most_changed, window_keep_rates
from stream_rt.operators.token_reuse import TokenGrid, token_patches

GRID = [TokenGrid(0, (0.0, 0.0, 1.0, 1.0), 12, 16)]  # 192 tokens per frame


@pytest.fixture(scope="module")
def clip(samples: Path) -> tuple[list[FrameTokens], list[AudioFeatures], list[float]]:
    """Frames twice a second from 0 to 30 s (token features: their 14x14 luma patches),
    the real audio features of the same span, and the labelled speech starts."""
    import asyncio

    got: list[Packet] = []
    graph = Graph(clock=ReplayClock(None))
    graph.add(AvSource("walkway", str(samples / "walkway_speech.mkv")))
    graph.add(AudioAnalyzer("audio"))
    graph.add(CallbackSink("sink", got.append))
    graph.connect("walkway.video", "sink.in", policy="block")
    graph.connect("walkway.audio", "audio.audio", policy="block", capacity=64)
    graph.connect("audio.features", "sink.in", policy="block", capacity=64)
    asyncio.run(graph.run())
    video = [p for p in got if isinstance(p, VideoFrame) and p.pts_ns < 30e9]
    frames = video[::5]  # the clip is 10 fps
    tokens = []
    for frame in frames:
        patches = token_patches([np.asarray(frame.y)], GRID).reshape(-1, 196).astype(np.float32)
        tokens.append(FrameTokens(frame.pts_ns, patches, np.arange(1000, 1000 + len(patches), dtype=np.int64)))
    audio = [p for p in got if isinstance(p, AudioFeatures) and p.pts_ns < 30e9]
    starts = [s["start_s"] for s in json.loads((samples / "walkway_speech.json").read_text())["speech"]]
    return tokens, audio, starts


def test_keep_rates_follow_sound_and_average_to_the_budget() -> None:
    rates = window_keep_rates([0.0, 0.2, 1.0, 0.0], [100, 100, 100, 300], average=0.4)
    assert all(0.25 <= r <= 0.65 for r in rates)
    assert rates[2] > rates[1] > rates[0] == rates[3]
    assert abs(np.average(rates, weights=[100, 100, 100, 300]) - 0.4) < 1e-6
    with pytest.raises(ValueError, match="within"):
        window_keep_rates([0.5], [10], average=0.9)


def test_compressed_requests_keep_the_budget_and_position_ids(clip: tuple[list[FrameTokens], list, list]) -> None:
    frames, audio, _ = clip
    for mode in ("audio", "uniform"):
        kept = compress(frames, audio, average=0.4, mode=mode)  # type: ignore[arg-type]
        total = sum(len(f.positions) for f in frames)
        assert abs(sum(len(k) for k in kept) - 0.4 * total) <= len(frames), mode
        for frame, k in zip(frames, kept, strict=True):
            assert np.all(np.diff(k) > 0) and np.isin(k, frame.positions).all(), "original ids, in order"


def test_windows_with_speech_keep_more_visual_tokens(clip: tuple[list[FrameTokens], list, list]) -> None:
    frames, audio, starts = clip
    kept = compress(frames, audio, average=0.4)
    share = {f.pts_ns: len(k) / len(f.positions) for f, k in zip(frames, kept, strict=True)}

    def window_has_speech(pts_ns: int) -> bool:
        window = int(pts_ns // 2e9)
        return any(int(s // 2) == window or int((s + 1.5) // 2) == window for s in starts)

    speech = [v for t, v in share.items() if window_has_speech(t)]
    silent = [v for t, v in share.items() if not window_has_speech(t)]
    assert speech and silent
    assert np.mean(speech) > np.mean(silent) + 0.1, (np.mean(speech), np.mean(silent))
    uniform = compress(frames, audio, average=0.4, mode="uniform")
    assert len({len(k) for k in uniform}) == 1, "the baseline keeps the same share of every frame"


def test_density_peaks_keep_one_representative_per_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
    points = np.concatenate([c + rng.normal(scale=0.3, size=(25, 2)) for c in centres]).astype(np.float32)
    chosen = density_peaks(points, 4)
    assert sorted(int(i) // 25 for i in chosen) == [0, 1, 2, 3]


def test_most_changed_keeps_the_tokens_that_moved() -> None:
    rng = np.random.default_rng(1)
    before = rng.normal(size=(50, 8)).astype(np.float32)
    after = before.copy()
    after[[3, 17, 42]] = rng.normal(size=(3, 8))
    assert sorted(most_changed(after, before, 3).tolist()) == [3, 17, 42]


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "qwen3_vl", "gemma3"])
def test_the_backend_drops_tokens_and_keeps_their_positions(
    family: str, clip: tuple[list[FrameTokens], list[AudioFeatures], list[float]], samples: Path
) -> None:
    import av

    from stream_rt.mllm.backends.call import ClipTiming
    from stream_rt.mllm.backends.transformers_backend import TransformersBackend
    from stream_rt.mllm.techniques import Techniques
    from stream_rt.mllm.techniques.compression import Compression

    from .models import model_dir

    _, audio, _ = clip
    times = [4.0, 6.0, 8.5, 10.5]  # 8.24 s: speech starts
    images, pts = [], []
    with av.open(str(samples / "walkway_speech.mkv")) as container:
        for frame in container.decode(video=0):
            if len(images) < len(times) and frame.time is not None and frame.time >= times[len(images)]:
                images.append(frame.to_ndarray(format="rgb24"))
                pts.append(int(frame.time * 1e9))
    path = str(model_dir(family))
    plain = TransformersBackend(path)
    full = plain.generate(images, "What happens?")
    compression = Compression(average=0.4)
    squeezed = TransformersBackend(path, techniques=Techniques(compression=compression))
    got = squeezed.generate(images, "What happens?", clip=ClipTiming(pts, audio))
    assert abs(got.visual_tokens - 0.4 * full.visual_tokens) <= len(images)
    assert got.prompt_tokens == full.prompt_tokens - (full.visual_tokens - got.visual_tokens)
    assert abs(compression.last_kept - got.visual_tokens / full.visual_tokens) < 1e-9
    family_ = squeezed.family
    assert family_ is not None
    prepared = family_.prepare(images, chat_messages(len(images), "What happens?"), squeezed.model)
    features = family_.encode(squeezed.model, prepared)
    compressed, kept_features, rows = Compression(average=0.4).apply(family_, prepared, features, pts, audio)
    assert len(rows) == len(kept_features) and torch.equal(
        features.tokens[torch.from_numpy(rows)], kept_features.tokens
    )
    assert len(kept_features.deepstack) == len(features.deepstack) == (3 if family == "qwen3_vl" else 0)
    for every, kept in zip(features.deepstack, kept_features.deepstack, strict=True):  # the same rows of each
        assert torch.equal(every[torch.from_numpy(rows)], kept)
    original = prepared.position_ids if prepared.position_ids is not None else torch.arange(prepared.length)[None]
    kept_positions = compressed.position_ids
    assert kept_positions is not None and len(kept_features) == int(compressed.image_mask.sum())
    rows = original.reshape(-1, prepared.length)
    kept_rows = kept_positions.reshape(len(rows), -1)
    for row, kept in zip(rows.tolist(), kept_rows.tolist(), strict=True):
        assert set(kept) <= set(row) and len(kept) < len(row), "original position ids, some dropped"
    assert compressed.next_position == prepared.next_position
