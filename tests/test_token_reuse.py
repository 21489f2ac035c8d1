"""Temporal token reuse on the smoke models (Qwen2-VL and SmolVLM/Idefics3 families), the
tiny Qwen3-VL and Gemma 3 (:mod:`tests.models`) and real frames of the static-camera
sample: exactness where nothing is reused, fidelity on an identical frame, the cache's
resets and bounds, and bit-identical tile reuse."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from stream_rt.config import TokenReuseConfig
from stream_rt.graph.packets import MllmRequest
from stream_rt.mllm.backends.call import ReuseKey
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.prompt import chat_messages
from stream_rt.mllm.techniques import Techniques
from stream_rt.mllm.techniques.token_reuse import ReuseOutcome, TokenReuse
from stream_rt.operators.token_reuse import TokenGrid, patch_similarity, static_tokens, token_patches

from .models import model_dir

FAMILIES = ["qwen2_vl", "idefics3", "qwen3_vl", "gemma3"]
QUESTION = "What is happening?"


def frames(samples: Path, indices: list[int]) -> list[np.ndarray]:
    """RGB frames of still_motion.mkv (static camera: 0-20 s still, then people move)."""
    out = []
    with av.open(str(samples / "still_motion.mkv")) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in indices:
                out.append(frame.to_ndarray(format="rgb24"))
            if i >= max(indices):
                break
    return out


def backends(family: str, **settings: object) -> tuple[TransformersBackend, TransformersBackend, TokenReuse]:
    path = str(model_dir(family))
    reuse = TokenReuse(TokenReuseConfig(**settings))
    # Random-weight models never stop on their own: a few tokens say enough.
    return (
        TransformersBackend(path, max_new_tokens=8),
        TransformersBackend(path, max_new_tokens=8, techniques=Techniques(token_reuse=reuse)),
        reuse,
    )


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_with_every_patch_changed_the_logits_equal_a_plain_forward(family: str, samples: Path) -> None:
    plain, reusing, reuse = backends(family, static_threshold=1.01, max_changed=1.0)  # nothing is static
    first, second = frames(samples, [10, 20])
    reusing.generate([first], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"))
    got = reusing.generate([second], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"))
    assert reuse.last.mode == "reuse" and reuse.last.reused_tokens == 0
    reference = plain.generate([second], QUESTION)
    assert got.first_logits is not None and reference.first_logits is not None
    assert (got.first_logits - reference.first_logits).abs().max() < 1e-4
    assert got.token_ids == reference.token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_an_identical_frame_with_reuse_keeps_the_next_token_distribution(family: str, samples: Path) -> None:
    plain, reusing, reuse = backends(family)
    [frame] = frames(samples, [10])
    reusing.generate([frame], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"))
    got = reusing.generate([frame.copy()], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"))
    visual = reuse.last.visual_tokens
    relevant = max(1, round(TokenReuseConfig().relevant_share * visual))  # always recomputed
    assert reuse.last.mode == "reuse" and reuse.last.reused_tokens == visual - relevant, "every other token is static"
    assert reuse.last.computed_share < 1
    reference = plain.generate([frame], QUESTION)
    assert got.first_logits is not None and reference.first_logits is not None
    assert kl(reference.first_logits, got.first_logits) < 1e-4, "stated tolerance: KL < 1e-4 nats"
    assert int(got.first_logits.argmax()) == int(reference.first_logits.argmax())


def test_the_cache_resets_on_each_listed_event(samples: Path) -> None:
    _, reusing, reuse = backends("qwen2_vl")
    still, still_later, moved = frames(samples, [10, 30, 215])
    noise = np.random.default_rng(1).integers(0, 256, still.shape, dtype=np.uint8)

    def call(frame: np.ndarray, question: str = QUESTION, event: str = "cam-1") -> str:
        reusing.generate([frame], question, reuse=ReuseKey("cam", question, event))
        return reuse.last.mode

    assert call(still) == "full (first call)"
    assert call(still_later) == "reuse"
    assert call(still_later, event="cam-2") == "full (new episode)"
    assert call(still_later, event="cam-2") == "reuse"
    assert call(still_later, question="Who is there?", event="cam-2") == "full (first call)", "a new question"
    assert call(noise, event="cam-2") == "full (too much changed)"
    original = reusing.embed
    reusing.embed = lambda *a: (_ for _ in ()).throw(RuntimeError("device lost"))  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="device lost"):
        call(moved, event="cam-2")
    reusing.embed = original  # type: ignore[method-assign]
    assert call(moved, event="cam-2") == "full (first call)", "a model error resets the cache"


def test_exact_tile_reuse_gives_bit_identical_encoder_outputs(samples: Path) -> None:
    _, reusing, reuse = backends("idefics3", tiles="exact")
    [frame] = frames(samples, [10])
    changed = frame.copy()
    changed[-60:, -80:] = 255 - changed[-60:, -80:]  # the bottom-right corner only
    reusing.generate([frame], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"))
    reusing.generate([changed], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"))
    assert reuse.last.tiles == 5 and 1 <= reuse.last.tiles_reused < 5, (
        "only the corner's tile and the global view change"
    )
    entry = reuse._entries[("cam", QUESTION)]
    family, model = reusing.family, reusing.model
    assert family is not None
    with torch.inference_mode():
        prepared = family.prepare([changed], chat_messages(1, QUESTION), model)
        fresh = [family.encode_tile(model, prepared, t) for t in range(family.tiles(prepared))]
    kept = entry.tile_features
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(kept, fresh, strict=True)), "bit-identical"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "gemma3", "llava"])
def test_a_clip_sliding_by_one_frame_encodes_only_its_new_frame(family: str, samples: Path) -> None:
    """Where the vision encoder sees each image alone, an image a cached call saw — the
    frames consecutive clips share — reuses that call's encoder output (with Qwen3-VL's
    DeepStack rows) bit for bit; with no token static, the call equals a plain one."""
    plain, reusing, reuse = backends(family, static_threshold=1.01, max_changed=1.0, tiles="exact")
    a, b, c, d = frames(samples, [10, 40, 70, 100])
    reusing.generate([a, b, c], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"))
    got = reusing.generate([b, c, d], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"))
    assert (reuse.last.tiles, reuse.last.tiles_reused) == (3, 2), "two of the three frames were seen before"
    family_, model = reusing.family, reusing.model
    assert family_ is not None
    entry = reuse._entries[("cam", QUESTION)]
    with torch.inference_mode():
        prepared = family_.prepare([b, c, d], chat_messages(3, QUESTION), model)
        fresh = [family_.encode_tile(model, prepared, t) for t in range(3)]
    for kept, new in zip(entry.tile_features, fresh, strict=True):
        assert torch.equal(kept.tokens, new.tokens) and len(kept.deepstack) == len(new.deepstack)
        assert all(torch.equal(x, y) for x, y in zip(kept.deepstack, new.deepstack, strict=True))
    reference = plain.generate([b, c, d], QUESTION)
    assert got.first_logits is not None and reference.first_logits is not None
    assert (got.first_logits - reference.first_logits).abs().max() < 1e-4
    assert got.token_ids == reference.token_ids


def test_a_token_is_static_only_if_its_pixels_stayed_close(samples: Path) -> None:
    """On a real handheld clip, raw cosine alone calls most shifted patches static (it is
    dominated by brightness); the difference bound catches them. Sensor noise on a still
    scene stays static."""
    grids = [TokenGrid(0, (0.0, 0.0, 1.0, 1.0), 16, 16)]
    with av.open(str(samples / "tree.avi")) as container:
        shots = [f.to_ndarray(format="gray") for i, f in enumerate(container.decode(video=0)) if i in (30, 45)]
    a, b = (token_patches([y], grids) for y in shots)
    by_cosine = patch_similarity(a, b) >= 0.996
    both = static_tokens(a, b)
    assert both.sum() < by_cosine.sum() and not (both & ~by_cosine).any()
    still_a, still_b = (
        token_patches([np.asarray(f.mean(axis=2), np.uint8)], grids) for f in frames(samples, [100, 170])
    )
    assert static_tokens(still_a, still_b).mean() > 0.95, "the still scene (with sensor noise) is static"
    assert static_tokens(a, a).all()


def test_a_tile_that_changed_in_places_reencodes_only_those_patches(samples: Path) -> None:
    # The tiny encoder has 2 layers: reuse starts after the first.
    _, reusing, reuse = backends("idefics3", tiles="static", encoder_partial=True, max_changed=1.0, start_layer=1)
    [frame] = frames(samples, [100])
    changed = frame.copy()
    changed[-60:, -80:] = 255 - changed[-60:, -80:]  # the bottom-right corner only
    reusing.generate([frame], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"))
    before = [f.tokens.clone() for f in reuse._entries[("cam", QUESTION)].tile_features]
    reusing.generate([changed], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"))
    after = [f.tokens for f in reuse._entries[("cam", QUESTION)].tile_features]
    assert reuse.last.mode == "reuse" and reuse.last.tiles_reused == 3, "two tiles saw the corner change"
    for tile in (3, 4):  # the bottom-right tile and the global view: re-encoded in part
        same = (before[tile] == after[tile]).all(dim=1)
        assert 0 < int(same.sum()) < len(same), "tokens away from the change keep their features exactly"


def held_bytes(reuse: TokenReuse) -> int:
    """Bytes of the tensors and arrays the cache's entries hold, each at its own size (a
    view counts only what it shows, so this is at most what the cache reports)."""
    total = 0
    for e in reuse._entries.values():
        tensors = [e.input_ids, *e.keys, *e.values, *e.tile_pixels, *(f.tokens for f in e.tile_features)]
        tensors += [t for s in e.tile_states if s is not None for t in (*s[0], *s[1], s[2])]
        tensors += [e.relevance] if e.relevance is not None else []
        total += sum(t.numel() * t.element_size() for t in tensors) + e.patches.nbytes
    return total


def test_a_flood_of_questions_keeps_the_cache_within_its_bounds(samples: Path) -> None:
    """Distinct questions (each MQTT ``ask`` has its own) on one source replace each other,
    never that source's routine question nor another source's cache; past the total
    bounds the least recently used entry goes."""
    _, reusing, reuse = backends("qwen2_vl", max_entries=4, max_entries_per_source=2)
    still, later = frames(samples, [10, 30])

    def call(source: str, question: str = QUESTION, frame: np.ndarray = still) -> ReuseOutcome:
        reusing.generate([frame], question, max_new_tokens=1, reuse=ReuseKey(source, question, f"{source}-1"))
        return reuse.last

    for source in "abc":
        call(source)
    assert call("a").mode == "reuse"
    for i in range(10):
        call("a", f"Who is person {i}?")
        assert max(Counter(source for source, _ in reuse._entries).values()) <= 2 and reuse.entries <= 4
    assert list(reuse._entries) == [("b", QUESTION), ("c", QUESTION), ("a", QUESTION), ("a", "Who is person 9?")]
    assert reuse.evictions == {"source": 9}
    assert call("a", frame=later).mode == "reuse", "the routine question still reuses after the flood"
    assert call("d").evicted == 1 and ("b", QUESTION) not in reuse._entries, "the least recently used goes"
    assert call("c").mode == "reuse"  # now the most recently used
    assert call("e").evicted == 1 and ("a", "Who is person 9?") not in reuse._entries
    assert reuse.evictions == {"source": 9, "entries": 2}
    # By bytes: room for two and a half entries of this size.
    size = reuse._entries[("c", QUESTION)].nbytes
    reuse.settings = reuse.settings.model_copy(update={"max_mib": 2.5 * size / 2**20})
    assert call("f").evicted == 3 and list(reuse._entries) == [("e", QUESTION), ("f", QUESTION)]
    assert held_bytes(reuse) <= reuse.nbytes <= 2.5 * size and reuse.evictions["bytes"] == 2
    asyncio.run(reusing.answer(MllmRequest("g", 0, 0, 0, "g-1", QUESTION, (still,))))
    assert reuse.evictions["entries"] == 3 and reuse.evictions["bytes"] >= 3, "the answer's entry evicted one or two"
    assert reusing.counters() == {f"reuse_evicted_{bound}": n for bound, n in reuse.evictions.items()}
    kept = reuse.entries
    assert reusing.gauges() == {"reuse_cache_entries": kept, "reuse_cache_mib": round(reuse.nbytes / 2**20, 1)}
    # An entry over the bound on its own is not kept, and evicts nothing else.
    reuse.settings = reuse.settings.model_copy(update={"max_mib": 0.5 * size / 2**20})
    assert call("h").evicted == 1 and ("h", QUESTION) not in reuse._entries and reuse.entries == kept
