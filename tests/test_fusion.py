"""Salience fusion by media time: whatever order audio and video arrive in, a step holds
the audio of its own media time — checked on packets arriving in chosen orders, and on
real recordings muxed late."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace

import numpy as np

from stream_rt import (
    AudioFeatures,
    ChangeMap,
    Channel,
    ControlPacket,
    EndOfStream,
    ManualClock,
    Packet,
    Salience,
    SourceStatus,
    VideoFrame,
)
from stream_rt.config import SalienceConfig
from stream_rt.graph import Context
from stream_rt.operators.salience import SalienceFusion

S = 1_000_000_000
FRAME = VideoFrame("cam", 0, 0, 0, np.zeros((48, 64), np.uint8))


def change(t: float, moving: bool = False, source: str = "cam") -> ChangeMap:
    regions = ((0, 0, 32, 24),) if moving else ()
    return ChangeMap(source, 0, int(t * S), 0, 16, np.zeros((3, 4), np.float32), np.zeros((3, 4), bool),
                     0.25 if moving else 0.0, regions, False, replace(FRAME, pts_ns=int(t * S)))  # fmt: skip


def audio(t: float, speech: float = 0.0, source: str = "cam") -> AudioFeatures:
    return AudioFeatures(source, 0, int(t * S), 0, -60.0, -60.0, 0.0, speech)


def talking(t: float) -> float:
    return 1.0 if 2.0 <= t < 2.5 else 0.0


def clip(seconds: float, video_until: float | None = None, source: str = "cam") -> tuple[list[Packet], list[Packet]]:
    """10 fps change maps and 32 ms audio windows with speech from 2.0 to 2.5 s."""
    video: list[Packet] = [change(i / 10, source=source) for i in range(int(seconds * 10))]
    if video_until is not None:
        video = [v for v in video if v.pts_ns < video_until * S]
    sound: list[Packet] = [audio(t, talking(t), source) for t in np.arange(0, seconds, 0.032)]
    return video, sound


Arrival = tuple[float, str, Packet]
"""(arrival time in s on the node's clock, input port, packet)."""


async def fuse(
    arrivals: list[Arrival], fusion: SalienceFusion | None = None, **kwargs: object
) -> tuple[list[Packet], dict[str, int]]:
    """Hand ``arrivals`` to a fusion node in exactly that order, its clock moved to each
    arrival time, then end its inputs; what it emitted (salience and what it passed on) and
    its counters. Unless given a node, both modalities are wired for source ``cam``, as the
    pipeline says."""
    if fusion is None:
        fusion = SalienceFusion("salience", SalienceConfig(**kwargs))
        fusion.expect("cam", video=True, audio=True)
    out = Channel("salience.salience->test", capacity=100_000)
    clock = ManualClock()
    ctx = Context("salience", clock, {"salience": [out]}, SalienceFusion.outputs, asyncio.Event())
    ends: list[Arrival] = [(0, "changes", EndOfStream("cam", -1, -1, 0)), (0, "audio", EndOfStream("cam", -1, -1, 0))]
    for at_s, port, packet in [*arrivals, *ends]:
        await clock.advance(max(0.0, at_s - clock.now_ns() / S))
        ctx.port = port
        if isinstance(packet, ControlPacket):
            await fusion.on_control(packet, ctx)
        else:
            await fusion.process(packet, ctx)
    got = []
    while (packet := out.get_nowait()) is not None:
        got.append(packet)
    return got, dict(ctx.counters)


def arriving(
    video: list[Packet], sound: list[Packet], audio_delay_s: float = 0.0, video_delay_s: float = 0.0
) -> list[Arrival]:
    """Both streams in arrival order: each packet arrives at its media time plus the delay
    of its modality."""
    timed = [(p.pts_ns / S + video_delay_s, 0, "changes", p) for p in video]
    timed += [(p.pts_ns / S + audio_delay_s, 1, "audio", p) for p in sound]
    return [(at, port, p) for at, _, port, p in sorted(timed, key=lambda x: (x[0], x[1]))]


def salience_of(got: list[Packet]) -> list[Salience]:
    return [p for p in got if isinstance(p, Salience)]


def speech_steps(got: list[Packet]) -> list[float]:
    return [round(s.pts_ns / S, 3) for s in salience_of(got) if s.components["speech"] > 0.5]


async def test_audio_arriving_late_is_fused_at_its_own_media_time() -> None:
    video, sound = clip(5.0)
    in_order, counters = await fuse(arriving(video, sound))
    assert speech_steps(in_order) == [2.1, 2.2, 2.3, 2.4, 2.5], "a step holds the audio before it"
    for delay in (0.3, 0.5, 0.9):
        late, counters = await fuse(arriving(video, sound, audio_delay_s=delay))
        assert [(s.pts_ns, s.components) for s in salience_of(late)] == [
            (s.pts_ns, s.components) for s in salience_of(in_order)
        ], delay
        assert counters.get("late_steps", 0) == 0 and counters.get("late_audio", 0) == 0


async def test_waiting_is_bounded_and_counted() -> None:
    video, sound = clip(6.0)
    got, counters = await fuse(arriving(video, sound, audio_delay_s=2.0), max_lateness_s=1.0)
    steps = salience_of(got)
    assert counters["late_steps"] >= 20 and counters["late_audio"] > 0
    assert sum(s.pts_ns in {v.pts_ns for v in video} for s in steps) == len(video), "no step is lost"
    assert speech_steps(got), "late speech still reaches a step"
    assert all(b.pts_ns > a.pts_ns for a, b in itertools.pairwise(steps)), "time never goes back"


async def test_when_the_video_dies_the_audio_goes_on_making_steps() -> None:
    video, sound = clip(8.0, video_until=1.0)
    sound = [audio(t, 1.0 if 5.0 <= t < 5.5 else 0.0) for t in np.arange(0, 8.0, 0.032)]
    got, _ = await fuse(arriving(video, sound))
    after = [s for s in salience_of(got) if s.pts_ns > 1.0 * S]
    assert len(after) > 40, "audio-only steps every ~0.1 s once the video has been gone for max_lateness_s"
    assert any(s.components["speech"] > 0.5 and 5.0 * S <= s.pts_ns <= 5.7 * S for s in after)
    assert all(s.frame is not None for s in after), "they carry the last frame"


async def test_a_source_that_says_it_has_no_audio_is_never_waited_for() -> None:
    video, _ = clip(3.0)
    online = SourceStatus("cam", -1, -1, 0, "online", "video only", ("video",))

    class Checked(SalienceFusion):
        async def process(self, packet: Packet, ctx: Context) -> None:
            await super().process(packet, ctx)
            assert not self._sources["cam"].steps, "each step is fused the moment its change map arrives"

    fusion = Checked("salience")
    fusion.expect("cam", video=True, audio=True)  # the config asks for audio; the file has none
    got, counters = await fuse([(0, "status", online), *(arriving(video, []))], fusion)
    assert len(salience_of(got)) == len(video) and "late_steps" not in counters


async def test_an_offline_source_flushes_its_steps_before_the_status_goes_on() -> None:
    video, sound = clip(3.0)
    offline = SourceStatus("cam", -1, -1, 0, "offline", "no frame for 10 s")
    arrivals = [*arriving(video, sound[:40]), (3.0, "status", offline)]  # the audio ends at 1.3 s
    got, _ = await fuse(arrivals, max_lateness_s=100)
    assert [type(p).__name__ for p in got] == ["Salience"] * len(video) + ["SourceStatus"]


async def test_audio_announced_but_never_arriving_stalls_once_and_nothing_waits_after() -> None:
    video, _ = clip(6.0)
    online = SourceStatus("cam", -1, -1, 0, "online", "a camera whose microphone is dead", ("video", "audio"))

    class Watched(SalienceFusion):
        waiting: list[int] = []

        async def process(self, packet: Packet, ctx: Context) -> None:
            await super().process(packet, ctx)
            self.waiting.append(len(self._sources["cam"].steps))

    fusion = Watched("salience")
    fusion.expect("cam", video=True, audio=True)
    got, counters = await fuse([(0, "status", online), *arriving(video, [])], fusion)
    assert len(salience_of(got)) == len(video)
    assert counters["stalled_audio"] == 1 and counters.get("late_steps", 0) <= 1
    assert max(fusion.waiting[:12]) >= 9, "for max_lateness_s the steps wait for the announced audio"
    assert max(fusion.waiting[12:]) == 0, "once it is stalled, every step is fused as it arrives"


async def test_video_lagging_its_audio_is_merged_into_later_steps_not_stamped_anew() -> None:
    video = [change(i / 10, moving=20 <= i < 30) for i in range(60)]  # motion from 2.0 to 3.0 s
    sound = [audio(t) for t in np.arange(0, 6.0, 0.032)]
    got, counters = await fuse(arriving(video, sound, video_delay_s=1.5), max_lateness_s=1.0)
    steps = salience_of(got)
    gaps = [b.pts_ns - a.pts_ns for a, b in itertools.pairwise(steps)]
    assert min(gaps) >= 50_000_000, "no burst of steps a nanosecond apart"
    assert counters["late_video"] > 0
    moving = [s.pts_ns / S for s in steps if s.components["visual"] > 0.5]
    assert moving and 2.0 <= min(moving) <= 3.6, "the motion still reaches a step, at most the lag later"
