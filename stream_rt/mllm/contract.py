"""The answer contract: what the model is asked to return, how its text is checked, and
when decoding can stop.

The model answers with one JSON object (``summary``, ``condition_met``, ``action``,
``confidence``). :class:`JsonObjectEnd` watches the decoded text as it streams and says
when the first top-level object has closed, so decoding stops there instead of running on
into explanations or markdown fences; :func:`parse_answer` then validates the object.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class SceneAnswer(BaseModel):
    """The default answer contract."""

    model_config = ConfigDict(extra="ignore")
    summary: str = Field(max_length=2000, description="what is happening, in one or two sentences")
    condition_met: bool | None = Field(None, description="whether the configured condition holds")
    action: str | None = Field(None, max_length=200, description="what to do now, if anything")
    confidence: float | None = Field(None, ge=0, le=1, description="how sure the model is, 0..1")


CONTRACT_INSTRUCTION = (
    'Answer with one JSON object and nothing else: {"summary": "<what is happening>", '
    '"condition_met": true or false, "action": "<what to do, or none>", "confidence": <0 to 1>}.'
)


class JsonObjectEnd:
    """Feed decoded text piece by piece; :attr:`closed` turns true once the first
    top-level JSON object is complete (braces inside strings and escapes are ignored).
    :attr:`end` is the offset just past its closing brace in the text fed so far."""

    def __init__(self) -> None:
        self.closed = False
        self.end = -1
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._seen = 0

    def feed(self, text: str) -> bool:
        for i, char in enumerate(text):
            if self.closed:
                break
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"' and self._depth > 0:
                self._in_string = True
            elif char == "{":
                self._depth += 1
            elif char == "}" and self._depth > 0:
                self._depth -= 1
                if self._depth == 0:
                    self.closed = True
                    self.end = self._seen + i + 1
        self._seen += len(text)
        return self.closed


def parse_answer(text: str) -> tuple[dict[str, Any] | None, str]:
    """The validated answer in ``text`` (the first JSON object in it) and ``""``, or
    ``None`` and why it is not a valid answer, in one line."""
    start = text.find("{")
    if start < 0:
        return None, "no JSON object in the answer"
    end = JsonObjectEnd()
    end.feed(text[start:])
    if not end.closed:
        return None, "the JSON object is not closed"
    try:
        data = json.loads(text[start : start + end.end])
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} at column {exc.colno}"
    try:
        return SceneAnswer.model_validate(data).model_dump(), ""
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "answer"
        return None, f"{where}: {error['msg']}"
