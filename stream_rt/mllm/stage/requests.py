"""Requests built from events: the keyframe (scaled so its longest side is at most
``max_side``), a crop of the changed regions at higher resolution when they are small, the
question, and a line of context saying what the event is."""

from __future__ import annotations

from stream_rt.graph.packets import Event, MllmRequest
from stream_rt.media.images import region_crop, resize
from stream_rt.policies.answer_reuse import scene_signature


def context_line(event: Event, clip_start_ns: int | None = None) -> str:
    """What the event is; ``clip_start_ns``: the images are frames from then to the event."""
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(event.components.items()))
    when = f"at {event.pts_ns / 1e9:.1f} s"
    if event.frame is None:
        images = " There is no picture from this source (it has no video, or none has arrived): only these scores."
    elif clip_start_ns is not None:
        images = f" The images are frames from {clip_start_ns / 1e9:.1f} s to the event, in time order."
    else:
        images = " The second image, if any, enlarges where it changed."
    seen = scene_line(event)
    if event.type == "ask":
        return (
            f"Source '{event.source_id}', {when}."
            + seen
            + (images if clip_start_ns is not None or not event.frame else "")
        )
    return (
        f"Source '{event.source_id}', event '{event.type}' {when} (episode since {event.start_pts_ns / 1e9:.1f} s), "
        f"salience {event.score:.2f} ({parts})." + seen + images
    )


def scene_line(event: Event) -> str:
    """What the detector saw and where the activity was, in words (empty without either)."""
    text = ""
    if event.objects:
        named = ", ".join(
            f"{o.label.replace('_', ' ')} {o.score:.2f}{' (still)' if o.stationary else ''}" for o in event.objects
        )
        text += f" Detected: {named}."
    if event.zones:
        text += f" Activity in zones: {', '.join(event.zones)}."
    return text


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
