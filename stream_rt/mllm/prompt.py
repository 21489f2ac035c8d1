"""The messages sent to a model for one request: its images, the event's context line,
the question and the answer contract, in the chat format every backend understands."""

from __future__ import annotations

from typing import Any

from stream_rt.graph.packets import MllmRequest
from stream_rt.mllm.contract import CONTRACT_INSTRUCTION

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


def chat_messages(images: int, text: Prompt) -> list[dict[str, Any]]:
    """Hugging Face chat messages: one user turn with ``images`` image entries, then
    ``text``; a conversation (a list of messages) as it is."""
    if not isinstance(text, str):
        return text
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]
