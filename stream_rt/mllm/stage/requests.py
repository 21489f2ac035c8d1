"""Requests built from events: the keyframe (scaled so its longest side is at most
``max_side``), a crop of the changed regions at higher resolution when they are small, the
question, and a line of context saying what the event is."""

from __future__ import annotations

from stream_rt.graph.packets import Event, MllmRequest
from stream_rt.media.images import region_crop, resize
from stream_rt.mllm.prompt import context_line
from stream_rt.policies.answer_reuse import scene_signature


def build_request(event: Event, question: str, *, max_side: int = 768, crop_regions: bool = True) -> MllmRequest:
    """The request for ``event`` (its ``question`` if it is an ``ask``); an event without a
    frame (an audio-only source) is asked about in words alone."""
    if event.frame is None:
        return MllmRequest(event.source_id, event.seq, event.pts_ns, event.wall_ns, event.event_id,
                           event.question or question, (), context_line(event))  # fmt: skip
    rgb = event.frame.rgb()
    images = [resize(rgb, max_side)]
    crop = region_crop(rgb, event.regions) if crop_regions else None
    if crop is not None:
        images.append(resize(crop, max_side // 2))
    return MllmRequest(
        event.source_id, event.seq, event.pts_ns, event.wall_ns, event.event_id, event.question or question,
        tuple(images), context_line(event), scene_signature(event.frame.y),
    )  # fmt: skip
