"""What the stage asks about an event: the question of its source (with the source's
standing watch), and the request built from the event — a clip when the stage keeps clips,
else the keyframe with a close-up of small changed regions."""

from __future__ import annotations

from stream_rt.graph.packets import Event, MllmRequest
from stream_rt.mllm.stage.answers import bare_request
from stream_rt.mllm.stage.clips import ClipBuffer
from stream_rt.mllm.stage.requests import build_request
from stream_rt.policies.watches import WatchBook


class Intake:
    def __init__(
        self, question: str, questions: dict[str, str], watches: WatchBook | None, max_side: int,
        crop_regions: bool, clip: ClipBuffer | None,
    ) -> None:  # fmt: skip
        """``questions``: the question of each source that has its own (``question`` for
        the rest)."""
        self.question = question
        self.questions = dict(questions)
        self.watches = watches
        self.max_side = max_side
        self.crop_regions = crop_regions
        self.clip = clip

    def question_for(self, source_id: str) -> str:
        """The question asked about ``source_id``'s events (its own, else the stage's), with
        its standing watch's condition if it has one."""
        question = self.questions.get(source_id, self.question)
        return self.watches.question(source_id, question) if self.watches is not None else question

    def request_for(self, event: Event) -> MllmRequest:
        """The request for ``event`` (decodes and scales pictures: run it off the loop)."""
        question = self.question_for(event.source_id)
        if self.clip is not None and event.frame is not None:
            return self.clip.request(event, question, self.max_side)
        return build_request(event, question, max_side=self.max_side, crop_regions=self.crop_regions)

    def bare(self, event: Event) -> MllmRequest:
        """What ``event`` asks, without pictures (to answer it without a call)."""
        return bare_request(event, self.question_for(event.source_id))
