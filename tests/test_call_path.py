"""One call path where every technique composes, for every family with an adapter: the
layer loop is the model's own forward (a prompt, a prompt after a prefix, a decoded
token); every combination of token reuse, clips with compression, the memory prefix and
the layer exit, with nothing reused or skipped, gives what transformers' own forward over
the whole sequence gives; and with a still view they reuse together.

The models (:mod:`tests.models`): the fitted smoke models of Qwen2-VL, Idefics3 and LLaVA,
the tiny random-weight Qwen3-VL (DeepStack features into the first three layers) and
Gemma 3 (sliding-window layers with a 16-token window, shorter than every prompt here, and
four tokens per image that attend to each other), the tiny Qwen3-Omni thinker (DeepStack,
a mixture-of-experts decoder; here without sound, which :mod:`tests.test_omni` gives it),
and for the layer loop and reuse a tiny Qwen3-VL-MoE.

``STREAM_RT_TEST_DEVICE=cuda`` runs the same checks on a GPU (``benchmarks/gpu.sh``)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from stream_rt.config import TokenReuseConfig
from stream_rt.graph.packets import AudioFeatures
from stream_rt.memory.streaming import MemoryEntry
from stream_rt.mllm.backends.call import ClipTiming, ReuseKey, SourceMemory
from stream_rt.mllm.backends.transformers_backend import TransformersBackend, on_device
from stream_rt.mllm.models.decoder import layer_rotary, project, run_prefill
from stream_rt.mllm.prompt import chat_messages
from stream_rt.mllm.techniques import Techniques
from stream_rt.mllm.techniques.compression import Compression
from stream_rt.mllm.techniques.layer_exit import MAX_DISTANCE, LayerExit
from stream_rt.mllm.techniques.memory_prefix import MemoryPrefix, prefix_positions
from stream_rt.mllm.techniques.token_reuse import TokenReuse
from stream_rt.mllm.tiny_models import build_tiny_model

from .conftest import SAMPLES
from .models import model_dir, own_logits
from .models import own_forward as model_forward

FAMILIES = ["qwen2_vl", "idefics3", "llava", "qwen3_vl", "gemma3", "qwen3_omni_moe_thinker"]
LOOP_FAMILIES = [*FAMILIES, "qwen3_vl_moe"]
QUESTION = "What is happening?"
S = 1_000_000_000
NEW_TOKENS = 6
DEVICE = os.environ.get("STREAM_RT_TEST_DEVICE", "cpu")
if DEVICE == "cuda":  # float32 without TF32, so "equal" can mean 1e-4
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="module")
def samples() -> Path:
    """Only the static-camera clip (so the GPU check carries no more than it reads)."""
    if not (SAMPLES / "still_motion.mkv").exists():
        pytest.fail(f"still_motion.mkv missing in {SAMPLES}: run 'python scripts/fetch_samples.py'", pytrace=False)
    return SAMPLES


def frames(samples: Path, indices: list[int], clip: str = "still_motion.mkv") -> list[np.ndarray]:
    wanted = set(indices)
    out: dict[int, np.ndarray] = {}
    with av.open(str(samples / clip)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    return [out[i] for i in indices]


def own_forward(
    backend: TransformersBackend,
    embeds: torch.Tensor,
    positions: torch.Tensor | None,
    image_mask: torch.Tensor | None = None,
    deepstack: Sequence[torch.Tensor] = (),
) -> tuple[Any, Any]:
    """transformers' own forward of the language model (:func:`tests.models.own_forward`):
    (last logits, its KV cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=backend.model.config.get_text_config())
    out = model_forward(backend.model, embeds, positions, cache, image_mask, deepstack)
    return own_logits(backend.model, out), cache


@pytest.mark.parametrize("family", LOOP_FAMILIES)
def test_the_layer_loop_is_the_models_own_forward(family: str, samples: Path) -> None:
    backend = TransformersBackend(str(model_dir(family)), device=DEVICE, dtype="float32")
    backend.load()
    fam = backend.family
    assert fam is not None and fam.adapter
    [frame] = frames(samples, [10])
    with torch.inference_mode():
        prepared = on_device(fam.prepare([frame], chat_messages(1, QUESTION), backend.model), backend.device)
        features = fam.encode(backend.model, prepared)
        embeds = backend.embed(prepared, features)
        positions, mask, deepstack = prepared.position_ids, prepared.image_mask, features.deepstack
        if family.startswith("qwen3_vl"):
            assert len(deepstack) == 3, "the tiny Qwen3-VL feeds three DeepStack layers"
        reference, cache = own_forward(backend, embeds, positions, mask, deepstack)
        ours = run_prefill(backend.model, embeds, positions, mask, deepstack=deepstack)
        assert torch.allclose(ours.logits, reference, atol=1e-4)
        last = len(ours.keys) - 1  # (a full-attention layer for Gemma 3: its cache keeps every position)
        assert torch.allclose(ours.keys[last], cache.layers[last].keys, atol=1e-5)
        # The same prompt in two parts: the second, with the images, after the first's K/V
        # (a memory prefix).
        cut = int(torch.nonzero(mask)[0])
        assert cut > 0

        def part(index: slice) -> torch.Tensor | None:
            return None if positions is None else positions[..., index]

        head = run_prefill(backend.model, embeds[:, :cut], part(slice(None, cut)))
        tail = run_prefill(backend.model, embeds[:, cut:], part(slice(cut, None)), mask[cut:],
                           prefix=(head.keys, head.values), deepstack=deepstack)  # fmt: skip
        assert torch.allclose(tail.logits, reference, atol=1e-4)
        assert torch.allclose(tail.keys[last], cache.layers[last].keys, atol=1e-5)
        # One decoded token after the whole prompt, with the layer exit measuring (never exits).
        token = torch.tensor([[int(reference.argmax())]], device=backend.device)
        step_embeds = backend.model.get_input_embeddings()(token)
        at = torch.tensor([[prepared.next_position]], device=backend.device)
        at = at.expand(3, 1, 1) if positions is not None and positions.dim() == 3 else at
        exit = LayerExit(every=1)
        step = run_prefill(backend.model, step_embeds, at, prefix=(ours.keys, ours.values), exit=exit)
        out = model_forward(backend.model, step_embeds, at, cache, output_hidden_states=True)
        expected = own_logits(backend.model, out)
        # The same token leaving at the first exit that agrees with the one before (any distance).
        leaving = LayerExit(every=1, thresholds=[MAX_DISTANCE] * 8)
        early = run_prefill(backend.model, step_embeds, at, prefix=(ours.keys, ours.values), exit=leaving)
    layers = backend.model.get_decoder().layers
    assert torch.allclose(step.logits, expected, atol=1e-4)
    assert step.keys[0].shape[2] == prepared.length + 1
    assert exit.decoded == 1 and exit.mean_depth == len(layers)
    depth = max(leaving.depth_counts)
    if depth < len(layers):  # (the tiny model's exits may never agree: then it runs every layer)
        decoder = backend.model.get_decoder()
        with torch.inference_mode():
            after = out.hidden_states[depth]  # transformers' own hidden state after ``depth`` layers
            assert torch.allclose(early.logits, backend.model.lm_head(decoder.norm(after[:, -1])).float(), atol=1e-4)
            rotary = layer_rotary(backend.model, after, at)
            for j in range(depth, len(layers)):  # the skipped layers get K/V from the exit's hidden state
                _, key, value = project(layers[j], after, *rotary[j], queries=False)
                assert torch.allclose(early.keys[j][:, :, -1:], key, atol=1e-5)
                assert torch.allclose(early.values[j][:, :, -1:], value, atol=1e-5)
    else:
        assert torch.allclose(early.logits, expected, atol=1e-4)


@pytest.mark.parametrize("family", LOOP_FAMILIES)
def test_a_call_is_the_whole_models_forward(family: str, samples: Path) -> None:
    """A call through the adapter (its own encoding, positions, DeepStack rows, masks) has
    the first logits of the whole vision-language model's forward on the processor's
    output: nothing of what the model does with images is left out."""
    backend = TransformersBackend(str(model_dir(family)), max_new_tokens=1, device=DEVICE, dtype="float32")
    backend.load()
    assert backend.family is not None
    images = frames(samples, [10, 20])
    got = backend.generate(images, QUESTION)
    with torch.inference_mode():
        inputs = backend.family.inputs(images, chat_messages(len(images), QUESTION))
        out = backend.model(**{k: v.to(backend.device) for k, v in inputs.items()})
    assert got.first_logits is not None
    assert float((out.logits[0, -1].float() - got.first_logits[0]).abs().max()) < 1e-4


def memory_entries(backend: TransformersBackend) -> tuple[MemoryEntry, ...]:
    rng = np.random.default_rng(0)
    dim = backend.model.get_input_embeddings().weight.shape[1]
    return tuple(MemoryEntry("cam", i * S, i * S + S // 2, rng.normal(0, 0.02, (4, dim)).astype(np.float32),
                             f"people walk by ({i})") for i in range(3))  # fmt: skip


def quiet_audio(seconds: float) -> list[AudioFeatures]:
    return [AudioFeatures("cam", i, int(i * 0.1 * S), 0, -60.0, -60.0, 0.0, 0.0) for i in range(int(seconds * 10))]


def full_computation(backend: TransformersBackend, images: list[np.ndarray], memory: tuple[MemoryEntry, ...] | None,
                     clip: tuple[list[int], list[AudioFeatures]] | None) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """The first logits and greedy tokens of transformers' own forward over the whole
    sequence (the memory's embeddings, then the prompt's, compressed for a clip), nothing
    kept between calls."""
    fam = backend.family
    assert fam is not None
    with torch.inference_mode():
        prepared = on_device(fam.prepare(images, chat_messages(len(images), QUESTION), backend.model), backend.device)
        features = fam.encode(backend.model, prepared)
        if clip is not None:
            prepared, features, _ = Compression(average=KEEP).apply(fam, prepared, features, *clip)
        embeds = backend.embed(prepared, features)
        positions = prepared.position_ids
        next_position = prepared.next_position
        mask = prepared.image_mask.to(backend.device)
        if memory is not None:
            prefix = MemoryPrefix().embeds(backend.model, fam, memory)
            length = prefix.shape[1]
            own = positions + length if positions is not None else torch.arange(length, length + prepared.length)[None]
            own = own.to(backend.device)
            positions = torch.cat([prefix_positions(length, fam, prefix.device), own], -1)
            embeds = torch.cat([prefix, embeds], 1)
            mask = torch.cat([mask.new_zeros(length), mask])  # the memory's pooled tokens are not an image's
            next_position += length
        logits, cache = own_forward(backend, embeds, positions, mask, features.deepstack)
        first, ids = logits, []
        three_d = positions is not None and positions.dim() == 3
        while len(ids) < NEW_TOKENS:
            token = int(logits.argmax())
            ids.append(token)
            at = torch.tensor([[next_position + len(ids) - 1]], device=backend.device)
            step = backend.model.get_input_embeddings()(torch.tensor([[token]], device=backend.device))
            logits = own_logits(backend.model, model_forward(backend.model, step, at.expand(3, 1, 1) if three_d else at,
                                                             cache))  # fmt: skip
    return first, ids


KEEP = 0.4
COMBINATIONS = list(itertools.product([False, True], repeat=4))  # token reuse, clip + compression, memory, exit


@pytest.mark.parametrize("family", FAMILIES)
def test_every_combination_with_nothing_reused_equals_full_computation(family: str, samples: Path) -> None:
    path = str(model_dir(family))
    still = frames(samples, [10, 20, 30, 40, 50])
    reference_backend = TransformersBackend(path, contract_stop=False, device=DEVICE, dtype="float32")
    reference_backend.load()
    entries = memory_entries(reference_backend)
    references: dict[tuple[bool, bool], tuple[torch.Tensor, list[int]]] = {}
    for reuse, clip, memory, exit in COMBINATIONS:
        backend = TransformersBackend(
            path, contract_stop=False, max_new_tokens=NEW_TOKENS, device=DEVICE, dtype="float32",
            # nothing is static, no exit is ever taken
            techniques=Techniques(
                token_reuse=TokenReuse(TokenReuseConfig(static_threshold=1.01, max_changed=1.0)) if reuse else None,
                compression=Compression(average=KEEP) if clip else None,
                layer_exit=LayerExit(every=2, thresholds=[0.0] * 8) if exit else None,
            ),
        )  # fmt: skip
        name = f"reuse={reuse} clip={clip} memory={memory} exit={exit}"
        for call in range(2):  # the second call is the one that could reuse
            images = still[call : call + 3] if clip else [still[call * 2]]
            timing = ([i * S for i in range(call, call + 3)], quiet_audio(6.0)) if clip else None
            got = backend.generate(images, QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1") if reuse else None,
                                   clip=ClipTiming(*timing) if timing else None,
                                   memory=SourceMemory("cam", entries) if memory else None)  # fmt: skip
        assert (got.visual_dropped > 0) == clip, name
        if reuse:
            assert got.reuse is not None and got.reuse.mode == "reuse", (name, got.reuse)
            assert got.reuse.reused_tokens == 0, name
        if memory:
            assert got.memory_tokens > 0 and backend.memory_prefix.reused == 1, name
        if (clip, memory) not in references:
            kept_memory = entries if memory else None
            references[(clip, memory)] = full_computation(reference_backend, images, kept_memory, timing)
        first, ids = references[(clip, memory)]
        assert got.first_logits is not None
        difference = float((got.first_logits - first.to(got.first_logits.device)).abs().max())
        print(f"{family} {name}: max |logit difference| {difference:.1e}")  # (shown with pytest -s)
        assert difference < 1e-4, (name, difference)
        assert got.token_ids == ids, name


@pytest.mark.parametrize("family", LOOP_FAMILIES)
def test_reusing_an_identical_view_after_the_memory_equals_full_computation(family: str, samples: Path) -> None:
    """The same clip and memory asked twice: the second call reuses the K/V of its static
    tokens from an early layer on (the partial layer loop after a prefix), and since they
    are what it would compute, its logits are the full computation's."""
    path = str(model_dir(family))
    still = frames(samples, [10, 20, 30])
    backend = TransformersBackend(path, contract_stop=False, max_new_tokens=NEW_TOKENS, device=DEVICE, dtype="float32",
                                  techniques=Techniques(token_reuse=TokenReuse(),
                                                        compression=Compression(average=KEEP)))  # fmt: skip
    backend.load()
    entries = memory_entries(backend)
    timing = ([i * S for i in range(3)], quiet_audio(6.0))
    for _ in range(2):
        got = backend.generate(still, QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"), clip=ClipTiming(*timing),
                               memory=SourceMemory("cam", entries))  # fmt: skip
    assert got.reuse is not None and got.reuse.mode == "reuse" and got.reuse.reused_tokens > 0, got.reuse
    layers, start = len(backend.model.get_decoder().layers), TokenReuseConfig().start_layer
    skipped = got.reuse.reused_tokens * (layers - start) / (got.prompt_tokens * layers)
    assert got.reuse.computed_share == pytest.approx(1 - skipped), "reused from the start layer on"
    first, ids = full_computation(backend, still, entries, timing)
    assert got.first_logits is not None
    assert float((got.first_logits - first.to(got.first_logits.device)).abs().max()) < 1e-4
    assert got.token_ids == ids


def test_all_techniques_together_reuse_on_a_still_view(samples: Path) -> None:
    """Token reuse with a sliding clip compressed by audio and the memory prefix: the frames
    two consecutive clips share reuse their encoder output exactly, still tokens reuse
    their K/V, and the answer's first token distribution stays the full computation's."""
    path = str(model_dir("idefics3"))
    still = frames(samples, [10, 20, 30, 40])
    reuse = TokenReuse()
    backend = TransformersBackend(path, contract_stop=False, max_new_tokens=NEW_TOKENS, device=DEVICE, dtype="float32",
                                  techniques=Techniques(token_reuse=reuse, compression=Compression(average=0.5),
                                                        layer_exit=LayerExit(every=2)))  # fmt: skip
    plain = TransformersBackend(path, contract_stop=False, max_new_tokens=NEW_TOKENS, device=DEVICE, dtype="float32",
                                techniques=Techniques(compression=Compression(average=0.5)))  # fmt: skip
    backend.load()
    entries = memory_entries(backend)
    outcomes = []
    for call in range(2):
        kwargs: dict[str, Any] = {
            "clip": ClipTiming([i * S for i in range(call, call + 3)], quiet_audio(6.0)),
            "memory": SourceMemory("cam", entries),
        }
        got = backend.generate(still[call : call + 3], QUESTION, reuse=ReuseKey("cam", QUESTION, "cam-1"), **kwargs)
        outcomes.append(got.reuse)
    full = plain.generate(still[1:4], QUESTION, **kwargs)
    first, second = outcomes
    assert first is not None and second is not None
    assert first.mode == "full (first call)" and second.mode == "reuse"
    tiles_per_frame = first.tiles // 3
    assert second.tiles_reused >= 2 * tiles_per_frame, "the two frames both clips hold: their tiles, exactly"
    assert second.reused_tokens > 0.5 * second.visual_tokens, "a still view: most tokens keep their K/V"
    assert got.visual_dropped > 0 and got.memory_tokens > 0
    assert got.first_logits is not None and full.first_logits is not None
    p, q = full.first_logits.log_softmax(-1), got.first_logits.log_softmax(-1)
    assert int(got.first_logits.argmax()) == int(full.first_logits.argmax())
    assert float((p.exp() * (p - q)).sum()) < 0.05


def test_each_family_has_its_adapter_and_refuses_what_it_lacks() -> None:
    """Qwen3-VL (and its MoE variant) and Gemma 3 have adapters; Qwen3.5 and Gemma 4 stay
    on the generic path (their docstrings say why). A technique asked of a model without
    an adapter is one line before any weight is read."""
    from stream_rt.mllm.backend import ModelUnavailable
    from stream_rt.mllm.backends.loading import inspect_model
    from stream_rt.mllm.models.adapters import Gemma3, Qwen3VL, family_for

    assert family_for("qwen3_vl") is family_for("qwen3_vl_moe") is Qwen3VL and family_for("gemma3") is Gemma3
    assert not any(family_for(t).adapter for t in ("qwen3_5", "qwen3_5_moe", "gemma4", "internvl"))
    everything = ["token reuse", "clip compression", "layer exit"]
    assert inspect_model(model_dir("gemma3"), everything)[1] is Gemma3
    with pytest.raises(ModelUnavailable, match=r"'internvl' runs on the generic path .* no token reuse and no layer"):
        inspect_model(build_tiny_model("internvl"), ["token reuse", "layer exit"])


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3"])
async def test_the_workers_batch_decodes_each_request_as_alone(family: str, samples: Path) -> None:
    """The worker's continuous batch prefills with the adapter (Qwen3-VL's DeepStack rows
    included) and decodes rows of other lengths together through transformers' decoder and
    a cache of the loop's K/V: Gemma 3's sliding layers keep every position there too, so
    left padding leaves each row's window where its mask says."""
    import asyncio
    import threading

    from stream_rt.mllm.backends.batching import ContinuousBatch

    backend = TransformersBackend(str(model_dir(family)), device=DEVICE, dtype="float32")
    backend.load()
    still = frames(samples, [10, 20, 30])
    questions = ["What is happening?", "Describe the scene in a few words, please.", "Is anyone there?"]
    jobs = [([still[i % 3]] if i % 3 else [], questions[i % 3], 24 if i % 2 else 10) for i in range(5)]
    alone = [backend.generate(images, text, max_new_tokens=limit) for images, text, limit in jobs]
    batch = ContinuousBatch(backend, max_batch=4)

    async def one(k: int, images: list[np.ndarray], text: str, limit: int) -> Any:
        await asyncio.sleep(0.03 * k)  # later ones join a batch under way
        return await batch.generate(images, text, threading.Event(), None, limit)  # type: ignore[arg-type]

    together = await asyncio.gather(*(one(k, *job) for k, job in enumerate(jobs)))
    assert batch.largest > 1
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_answers_as_transformers_own_generate(family: str, samples: Path) -> None:
    """The adapter path with no technique on gives what the generic path — the model's own
    processor and transformers' ``generate`` — gives for the same request: a clip of two
    frames and a question (first logits within 1e-4, the same greedy tokens), whatever
    sampling defaults the checkpoint's generation config carries."""
    from stream_rt.mllm.models.families import Family

    adapter = TransformersBackend(str(model_dir(family)), device=DEVICE, dtype="float32", max_new_tokens=NEW_TOKENS,
                                  contract_stop=False)  # fmt: skip
    adapter.load()
    fam = adapter.family
    assert fam is not None and fam.adapter
    generic = TransformersBackend(adapter.model_ref, device=DEVICE, dtype="float32", max_new_tokens=NEW_TOKENS,
                                  contract_stop=False)  # fmt: skip
    generic.model, generic.family = adapter.model, Family(fam.path, fam.config, fam.processor)
    # A checkpoint's own generation defaults do not change how either path chooses its tokens.
    adapter.model.generation_config.repetition_penalty = 3.0
    images = frames(samples, [10, 40])
    ours, theirs = adapter.generate(images, QUESTION), generic.generate(images, QUESTION)
    assert ours.first_logits is not None and theirs.first_logits is not None
    assert (ours.first_logits - theirs.first_logits.to(ours.first_logits.device)).abs().max() < 1e-4
    assert ours.token_ids == theirs.token_ids and ours.prompt_tokens == theirs.prompt_tokens
