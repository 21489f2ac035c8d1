"""What audio-guided compression saves on a model that hears the clip (issue 24, part 2):
tokens kept and prefill time, with and without compression, in one run.

A 16-frame clip of the walkway recording (8 s from 4.5 s in, quiet then speech from 8.24 s)
with its sound goes to a random-weight Qwen2.5-Omni thinker, or Qwen3-Omni's
(``--model-type qwen3_omni_moe_thinker``), built offline
(:func:`stream_rt.mllm.tiny_models.build_tiny_model`, ``--size tiny`` or ``realistic``):
once whole, once compressed with the guidance of its audio encoder's attention (40 % of
the visual tokens on average, 70 % of the audio tokens). RANDOM WEIGHTS: the answers mean
nothing, and which window the encoder attends to is arbitrary; the figures are tokens and
time. Prints the medians of ``--rounds`` alternating calls; the last line is one JSON object.

    python benchmarks/omni_compression.py --rounds 5 [--model-type qwen3_omni_moe_thinker]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from stream_rt.mllm.backends.call import ClipTiming
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.techniques import Techniques
from stream_rt.mllm.techniques.compression import Compression
from stream_rt.mllm.tiny_models import build_tiny_model
from stream_rt.testing import clip_with_sound

S = 1_000_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=Path, default=Path("samples"))
    parser.add_argument("--model-type", choices=["qwen2_5_omni_thinker", "qwen3_omni_moe_thinker"],
                        default="qwen2_5_omni_thinker")  # fmt: skip
    parser.add_argument("--size", choices=["tiny", "realistic"], default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    model = str(build_tiny_model(args.model_type, size=args.size))
    images, pts, sound = clip_with_sound(args.samples / "walkway_speech.mkv", 4.5, 16, 0.5)
    clip = ClipTiming(pts, [], sound, pts[0])
    whole = TransformersBackend(model, max_new_tokens=1, threads=args.threads)
    compression = Compression(average=0.4, audio_keep=0.7)
    squeezed = TransformersBackend(model, max_new_tokens=1, threads=args.threads,
                                   techniques=Techniques(compression=compression))  # fmt: skip
    runs: dict[str, list] = {"whole": [], "compressed": []}
    for backend in (whole, squeezed):
        backend.generate(images, "What happens?", clip=clip)  # warm-up
    for _ in range(args.rounds):
        for name, backend in (("whole", whole), ("compressed", squeezed)):
            runs[name].append(backend.generate(images, "What happens?", clip=clip))
    figures = {}
    for name, gens in runs.items():
        last = gens[-1]
        figures[name] = {
            "prompt_tokens": last.prompt_tokens, "visual_tokens": last.visual_tokens,
            "audio_tokens": last.audio_tokens, "prefill_s": statistics.median(g.prefill_s for g in gens),
            "encode_s": statistics.median(g.encode_s or 0.0 for g in gens),
        }  # fmt: skip
        print(f"{name:>10}: {figures[name]}")
    w, c = figures["whole"], figures["compressed"]
    result = {
        "model": f"{args.model_type} {args.size}, RANDOM WEIGHTS", "frames": len(images),
        "sound_s": round(len(sound) / 16_000, 2), "visual_kept": round(c["visual_tokens"] / w["visual_tokens"], 3),
        "audio_kept": round(c["audio_tokens"] / w["audio_tokens"], 3),
        "prompt_kept": round(c["prompt_tokens"] / w["prompt_tokens"], 3),
        "prefill_speedup": round(w["prefill_s"] / c["prefill_s"], 2), "rounds": args.rounds,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
