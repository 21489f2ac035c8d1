"""The messages sent to a model for one request: its images, the event's context line,
the question and the answer contract, in the chat format every backend understands."""

from __future__ import annotations

from typing import Any

from stream_rt.graph.packets import Event, MllmRequest
from stream_rt.mllm.contract import CONTRACT_INSTRUCTION

HEARD_WORDS = 80
"""The most words of what was said that a prompt quotes (the latest): a bound on its tokens."""

DEFAULT_QUESTION = (
    "What is happening in this scene? Is a person, vehicle or animal doing something that needs attention?"
)


def request_text(request: MllmRequest) -> str:
    parts = [request.context, request.question, CONTRACT_INSTRUCTION]
    return "\n".join(p for p in parts if p)


Prompt = str | list[dict[str, Any]]
"""What a model is asked: one user turn's text, or a whole conversation as Hugging Face
chat messages (system, user and assistant turns, an ``{"type": "image"}`` entry where
each image goes, in the order of the images given with it)."""


def chat_messages(images: int, text: Prompt, sound: bool = False) -> list[dict[str, Any]]:
    """Hugging Face chat messages: one user turn with ``images`` image entries, then (with
    ``sound``) an audio entry, then ``text``; a conversation (a list of messages) as it is."""
    if not isinstance(text, str):
        return text
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
    if sound:
        content.append({"type": "audio"})
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


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


def heard_line(event: Event) -> str:
    """What was said in the event's span, quoted (empty when nothing was): what a request
    adds to its context once the event's words are known."""
    if not event.words:
        return ""
    words = event.words[-HEARD_WORDS:]
    cut = "... " if len(event.words) > len(words) else ""
    return f' Heard (speech recognition, may be wrong): "{cut}{" ".join(w.text for w in words)}".'


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
