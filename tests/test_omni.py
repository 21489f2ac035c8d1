"""Models that hear: Qwen2.5-Omni's and Qwen3-Omni's thinkers take a clip's sound as audio,
and audio-guided compression takes its guidance from the model's own audio encoder (OmniZip).

Each test runs on both tiny random-weight thinkers of :mod:`stream_rt.mllm.tiny_models`
(built offline: tokenizer, Qwen2-VL image processor and Whisper feature extractor written
locally, seeded weights). Qwen2.5-Omni's audio encoder gives 25 tokens a second; Qwen3-Omni's
(convolutions over 1 s windows, before its layers) 13 a second, and its images feed
DeepStack. Their answers and attention mean nothing, so the tests compare with
transformers' own forward and follow whatever the encoder attends to, never a fixed
answer. The sound is the real walkway recording's, whose speech starts at 8.24 s."""

from __future__ import annotations

import itertools
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_rt.config import LOSSLESS_CHANNELS, parse_config
from stream_rt.mllm.backends.call import ClipTiming
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.prompt import chat_messages
from stream_rt.mllm.techniques import Techniques
from stream_rt.mllm.techniques.compression import Compression
from stream_rt.mllm.tiny_models import build_tiny_model
from stream_rt.operators.compression import FrameTokens, HeardTokens, compress, keep_heard
from stream_rt.pipeline import build_pipeline
from stream_rt.testing import clip_with_sound

from .models import own_forward, own_logits

QUESTION = "What happens?"
S = 1_000_000_000


def clip(samples: Path, start_s: float, frames: int) -> tuple[list[np.ndarray], list[int], np.ndarray]:
    """``frames`` frames of walkway_speech.mkv from ``start_s``, 0.5 s apart, their times and their sound."""
    return clip_with_sound(samples / "walkway_speech.mkv", start_s, frames)


@dataclass(frozen=True)
class Omni:
    model: str  # the tiny model's directory
    per_second: int  # audio tokens a second of sound


@pytest.fixture(scope="module", params=[("qwen2_5_omni_thinker", 25), ("qwen3_omni_moe_thinker", 13)],
                ids=["qwen2_5_omni", "qwen3_omni"])  # fmt: skip
def omni(request: pytest.FixtureRequest) -> Omni:
    model_type, per_second = request.param
    return Omni(str(build_tiny_model(model_type)), per_second)


def test_with_nothing_compressed_a_call_with_sound_is_the_models_own_forward(omni: Omni, samples: Path) -> None:
    images, pts, sound = clip(samples, 7.0, 3)
    backend = TransformersBackend(omni.model, max_new_tokens=1, dtype="float32")
    backend.load()
    heard: list[torch.Size] = []
    hook = backend.model.model.audio_tower.register_forward_hook(
        lambda module, args, out: heard.append(out.last_hidden_state.shape)
    )
    try:
        got = backend.generate(images, QUESTION, clip=ClipTiming(pts, [], sound, pts[0]))
    finally:
        hook.remove()
    assert got.audio_tokens == omni.per_second, f"1 s of sound: {omni.per_second} audio tokens"
    assert [shape[0] for shape in heard] == [got.audio_tokens], "the audio encoder ran once, on the clip's sound"
    assert backend.family is not None and backend.family.hears
    with torch.inference_mode():
        inputs = backend.family.inputs(images, chat_messages(len(images), QUESTION, sound=True), sound)
        assert int((inputs["input_ids"] == backend.model.config.audio_token_id).sum()) == got.audio_tokens
        out = backend.model(**inputs)
    assert got.first_logits is not None
    assert float((out.logits[0, -1].float() - got.first_logits[0]).abs().max()) < 1e-4


def test_compressed_by_the_audio_encoders_attention_it_is_the_models_own_forward_on_the_kept_tokens(
    omni: Omni, samples: Path
) -> None:
    images, pts, sound = clip(samples, 6.0, 8)
    compression = Compression(average=0.4, audio_keep=0.7)
    backend = TransformersBackend(
        omni.model, max_new_tokens=1, dtype="float32", techniques=Techniques(compression=compression)
    )
    got = backend.generate(images, QUESTION, clip=ClipTiming(pts, [], sound, pts[0]))
    heard_all = got.audio_tokens + got.audio_dropped
    assert abs(heard_all - 3.5 * omni.per_second) <= 1, "3.5 s of sound"
    assert got.audio_tokens == round(0.7 * heard_all), (got.audio_tokens, got.audio_dropped)
    visual_all = got.visual_tokens + got.visual_dropped
    assert abs(got.visual_tokens - 0.4 * visual_all) <= len(images), (got.visual_tokens, visual_all)
    family = backend.family
    assert family is not None
    with torch.inference_mode():
        prepared = family.prepare(images, chat_messages(len(images), QUESTION, sound=True), backend.model, sound)
        features, heard = family.encode(backend.model, prepared), family.hear(backend.model, prepared)
        assert heard is not None
        kept, kept_features, _, kept_heard = Compression(average=0.4).apply_heard(
            family, prepared, features, heard, pts, pts[0]
        )
        assert kept.length == got.prompt_tokens
        assert kept.audio_mask is not None and int(kept.audio_mask.sum()) == len(kept_heard) == got.audio_tokens
        embeds = backend.embed(kept, kept_features, kept_heard)
        out = own_forward(backend.model, embeds, kept.position_ids, None, kept.image_mask, kept_features.deepstack)
        reference = own_logits(backend.model, out)
    assert got.first_logits is not None
    assert float((reference[0] - got.first_logits[0]).abs().max()) < 1e-4
    # The kept tokens keep the positions the model gave them in the whole request.
    assert prepared.position_ids is not None and kept.position_ids is not None
    whole = prepared.position_ids[0, 0].tolist()
    assert set(kept.position_ids[0, 0].tolist()) <= set(whole)


def test_each_windows_video_keep_rate_follows_the_share_of_its_sound_the_encoder_attended_to(
    omni: Omni, samples: Path
) -> None:
    """8 s of the walkway (quiet, then speech from 8.24 s) in four 2 s windows: the windows
    whose audio tokens the model's audio encoder attends to most keep the most video."""
    images, pts, sound = clip(samples, 4.5, 16)
    backend = TransformersBackend(omni.model, dtype="float32")
    backend.load()
    family = backend.family
    assert family is not None
    with torch.inference_mode():
        prepared = family.prepare(images, chat_messages(len(images), QUESTION, sound=True), backend.model, sound)
        features, heard = family.encode(backend.model, prepared), family.hear(backend.model, prepared)
        assert heard is not None
        compression = Compression(average=0.4, audio_keep=0.7)
        _, _, rows, _ = compression.apply_heard(family, prepared, features, heard, pts, pts[0])
    kept_audio = keep_heard(heard.attention.numpy(), 0.7)
    window = 2 * S
    audio_window = (heard.offsets_ns.numpy() + pts[0] - pts[0]) // window
    audio_share = [float(kept_audio[audio_window == w].mean()) for w in range(4)]
    per_image = len(features) // len(images)
    video_window = (np.asarray(pts)[rows // per_image] - pts[0]) // window
    video_share = [float((video_window == w).sum()) / (4 * per_image) for w in range(4)]
    assert max(audio_share) - min(audio_share) > 0.3, f"the encoder tells the windows apart: {audio_share}"
    order = np.argsort(audio_share, kind="stable")
    assert all(video_share[a] <= video_share[b] for a, b in itertools.pairwise(order)), (audio_share, video_share)
    assert video_share[order[-1]] > video_share[order[0]] + 0.1, (audio_share, video_share)
    assert abs(np.mean(video_share) - 0.4) < 0.02


def test_the_window_whose_sound_is_kept_keeps_more_video() -> None:
    """The operator alone: speech heard (the encoder's attention) in the second of two
    windows keeps more of its frames' tokens, at the same average."""
    rng = np.random.default_rng(0)
    frames = [FrameTokens(i * S // 2, rng.normal(size=(16, 8)).astype(np.float32), np.arange(16) + 16 * i)
              for i in range(8)]  # fmt: skip
    attention = np.concatenate([np.full(50, 0.1), rng.uniform(0.5, 1.0, 50)]).astype(np.float32)  # 2 s each
    heard = HeardTokens(np.arange(100, dtype=np.int64) * 40_000_000, keep_heard(attention, 0.7))
    kept = compress(frames, [], heard=heard)
    first, second = sum(len(k) for k in kept[:4]), sum(len(k) for k in kept[4:])
    assert second > first
    assert abs((first + second) / 128 - 0.4) < 0.03


async def test_a_replay_with_speech_hears_each_clip(omni: Omni, samples: Path, ffmpeg: str, tmp_path: Path) -> None:
    """Through the daemon: the walkway's speech (7 s from 5 s in) replayed, every model call
    hears its clip's sound — the audio tokens in its prompt, 70 % of them kept."""
    cut = tmp_path / "walkway.mkv"
    subprocess.run([ffmpeg, "-v", "error", "-ss", "5", "-t", "7", "-i", str(samples / "walkway_speech.mkv"),
                    "-c", "copy", str(cut)], check=True)  # fmt: skip
    out = tmp_path / "events.jsonl"
    config = parse_config({
        "sources": [{"id": "walkway", "url": str(cut)}],
        "graph": LOSSLESS_CHANNELS,
        "mllm": {"model": omni.model, "reuse_threshold": 0, "flow": "block", "max_new_tokens": 4,
                 "clip": {"frames": 4, "interval_s": 0.5, "compression": "audio"}},
        "sinks": {"jsonl": {"path": str(out)}},
    })  # fmt: skip
    await build_pipeline(config, speed=None).graph.run()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [r for r in records if r["kind"] == "MllmAnswer"]
    assert answers, "the replay calls the model"
    for a in answers:
        assert a["status"] in ("ok", "invalid"), a["error"]
        tokens = a["tokens"]
        heard = tokens["audio"] + tokens.get("audio_dropped", 0)
        span_s = (a["frame_pts_ns"][-1] - a["frame_pts_ns"][0]) / S
        assert abs(heard - omni.per_second * span_s) <= 2, (tokens, span_s)
        assert tokens["audio"] == round(0.7 * heard), tokens


def test_token_reuse_and_the_memory_prefix_hear_the_clip_too(omni: Omni, samples: Path) -> None:
    """The same clip, sound and memory asked twice, compressed by the encoder's attention:
    the second call reuses its static visual tokens' K/V after the memory's prefix (the
    sound comes after the images, so it never stops their reuse), and its logits are
    transformers' own forward over the memory's embeddings and the compressed prompt."""
    from stream_rt.mllm.backends.call import ReuseKey, SourceMemory
    from stream_rt.mllm.techniques.memory_prefix import MemoryPrefix, prefix_positions
    from stream_rt.mllm.techniques.token_reuse import TokenReuse

    from .test_call_path import memory_entries

    images, pts, sound = clip(samples, 7.0, 3)
    techniques = Techniques(token_reuse=TokenReuse(), compression=Compression())
    backend = TransformersBackend(omni.model, max_new_tokens=1, dtype="float32", techniques=techniques)
    backend.load()
    entries = memory_entries(backend)
    for _ in range(2):
        got = backend.generate(images, QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"),
                               clip=ClipTiming(pts, [], sound, pts[0]),
                               memory=SourceMemory("cam", entries))  # fmt: skip
    assert got.reuse is not None and got.reuse.mode == "reuse" and got.reuse.reused_tokens > 0, got.reuse
    assert got.memory_tokens > 0 and got.audio_tokens > 0
    family = backend.family
    assert family is not None
    with torch.inference_mode():
        prepared = family.prepare(images, chat_messages(len(images), QUESTION, sound=True), backend.model, sound)
        features, heard = family.encode(backend.model, prepared), family.hear(backend.model, prepared)
        assert heard is not None
        kept, kept_features, _, kept_heard = Compression().apply_heard(family, prepared, features, heard, pts, pts[0])
        prefix = MemoryPrefix().embeds(backend.model, family, entries)
        length = prefix.shape[1]
        assert kept.position_ids is not None
        positions = torch.cat([prefix_positions(length, family, prefix.device), kept.position_ids + length], -1)
        embeds = torch.cat([prefix, backend.embed(kept, kept_features, kept_heard)], 1)
        visual = torch.cat([torch.zeros(length, dtype=torch.bool), kept.image_mask.cpu()])
        out = own_forward(backend.model, embeds, positions, None, visual, kept_features.deepstack)
        reference = own_logits(backend.model, out)
    assert got.first_logits is not None
    assert float((reference[0] - got.first_logits[0]).abs().max()) < 1e-4
