"""Follow detected objects from detection to detection, and tell moving from stationary.

An IoU tracker: each detection joins the track of the same label whose predicted box
overlaps it most (at least ``min_iou``), greedily, best overlap first; one left over joins
the nearest track left of its label within one box size per second since that track was
seen (a walker detected once a second may not overlap its last box); the others start
tracks. Detections come at most a few times a second (only where change fired), so a
track predicts its box by the velocity between its last two detections, and a track not
detected for ``lost_s`` of media time is forgotten — unless it was standing still, which
is kept for ``STILL_KEEP_S``: the detector runs only where change fires, so a parked car
may go unseen for long, and must be known again when it is.

A track is **stationary** once its box has stayed within ``move_share`` of its size of
where it was, and of the size it had, ``stationary_s`` ago: a parked car, a person standing or sitting still. A
stationary object does not make activity (the object gate drops the changes on it), so
it cannot open episodes again and again; once it moves it is active again, with the
same ``track_id``.

A small tracker of our own: the maintained libraries (ByteTrack in ``supervision``,
``norfair``) bring dependencies and per-frame Kalman filters that detections a few times
a second of mostly slow scenes do not need.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from stream_rt.graph.packets import Box
from stream_rt.operators.detectors import Detection, box_iou

STILL_KEEP_S = 60.0
"""How long a track that was not moving is kept without being detected."""
REACH_SIZES = 3.0
"""The farthest a detection may be from a track's predicted box to join it, in box sizes."""


@dataclass
class Track:
    track_id: int
    label: str
    score: float
    box: Box
    seen_ns: int
    velocity: tuple[float, float] = (0.0, 0.0)  # pixels per second of the box's centre
    anchor: Box = (0, 0, 0, 0)  # where it was when it last moved
    anchor_ns: int = 0
    hits: int = 1

    def predicted(self, at_ns: int, horizon_s: float = 3.0) -> Box:
        """Where it is by now, moving on as it last moved, for at most ``horizon_s``."""
        dt = min(horizon_s, max(0.0, (at_ns - self.seen_ns) / 1e9))
        dx, dy = self.velocity[0] * dt, self.velocity[1] * dt
        x0, y0, x1, y1 = self.box
        return (round(x0 + dx), round(y0 + dy), round(x1 + dx), round(y1 + dy))

    def stationary(self, at_ns: int, stationary_ns: int) -> bool:
        return at_ns - self.anchor_ns >= stationary_ns


@dataclass
class Tracker:
    stationary_s: float = 2.0
    lost_s: float = 3.0
    min_iou: float = 0.2
    move_share: float = 0.15
    tracks: list[Track] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def update(self, detections: list[Detection], at_ns: int) -> None:
        """Match one frame's detections to the tracks; start, move and forget tracks."""
        self.tracks = [t for t in self.tracks if self._kept(t, at_ns)]
        pairs = sorted(
            (
                (box_iou(t.predicted(at_ns, self.lost_s), d.box), ti, di)
                for ti, t in enumerate(self.tracks)
                for di, d in enumerate(detections)
                if t.label == d.label
            ),
            reverse=True,
        )
        used_tracks: set[int] = set()
        used_detections: set[int] = set()
        for overlap, ti, di in pairs:
            if overlap < self.min_iou or ti in used_tracks or di in used_detections:
                continue
            used_tracks.add(ti)
            used_detections.add(di)
            self._move(self.tracks[ti], detections[di], at_ns)
        # Fast walkers seen a second apart may not overlap their last box: the nearest of the
        # same label within one box size per second of media time joins instead.
        near = sorted(
            (_distance(t.predicted(at_ns, self.lost_s), d.box), ti, di)
            for ti, t in enumerate(self.tracks)
            for di, d in enumerate(detections)
            if t.label == d.label and ti not in used_tracks and di not in used_detections
        )
        for distance, ti, di in near:
            track = self.tracks[ti]
            reach = _size(track.box) * min(REACH_SIZES, max(1.0, (at_ns - track.seen_ns) / 1e9))
            if distance > reach or ti in used_tracks or di in used_detections:
                continue
            used_tracks.add(ti)
            used_detections.add(di)
            self._move(track, detections[di], at_ns)
        for di, d in enumerate(detections):
            if di not in used_detections:
                self.tracks.append(
                    Track(next(self._ids), d.label, d.score, d.box, at_ns, anchor=d.box, anchor_ns=at_ns)
                )

    def _move(self, track: Track, detection: Detection, at_ns: int) -> None:
        dt = (at_ns - track.seen_ns) / 1e9
        if dt > 0:
            (ax, ay), (bx, by) = _centre(track.box), _centre(detection.box)
            track.velocity = ((bx - ax) / dt, (by - ay) / dt)
        track.box, track.score, track.seen_ns = detection.box, detection.score, at_ns
        track.hits += 1
        (ax, ay), (bx, by) = _centre(track.anchor), _centre(detection.box)
        size = _size(detection.box)
        grown = abs(size - _size(track.anchor))  # coming towards the camera, or going away
        if max(abs(bx - ax), abs(by - ay), grown) > self.move_share * size:
            track.anchor, track.anchor_ns = detection.box, at_ns  # it moved: stationary counts from here
        if track.stationary(at_ns, int(self.stationary_s * 1e9)):
            track.velocity = (0.0, 0.0)

    def _kept(self, track: Track, at_ns: int) -> bool:
        unseen = at_ns - track.seen_ns
        # Last seen standing or creeping (a parked car, a person still); one that walked out is
        # forgotten. One seen once counts as still: under flickering light a person standing
        # is detected once a flicker, seconds apart, and must stay the same person.
        still = max(abs(v) for v in track.velocity) <= self.move_share * _size(track.box) / self.stationary_s
        return unseen <= self.lost_s * 1e9 or (still and unseen <= STILL_KEEP_S * 1e9)

    def is_stationary(self, track: Track, at_ns: int) -> bool:
        return track.stationary(at_ns, int(self.stationary_s * 1e9))


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _distance(a: Box, b: Box) -> float:
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return float(((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5)


def _size(box: Box) -> float:
    return float(max(box[2] - box[0], box[3] - box[1], 1))
