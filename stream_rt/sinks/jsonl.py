"""Write packets as JSON lines, one record per packet (``Packet.to_record()``).

Each line is flushed as it is written, so a crash loses at most the line being written;
the file is fsynced when the sink stops. With ``snapshots_dir``, the sink encodes a JPEG
snapshot of the frame of every event but ``end`` (off the event loop; an event that
already carries ``snapshot_jpeg`` is written as it is), writes it there as
``<event_id>-<seq>.jpg``, and the event's record names the file and its size.

An end of stream reaches the sink along every path from its source (its status, the
events, the answers, each in its own time): it is written once per source (only for
``sources``, when given), when the sink stops, so it is the last record of its source.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import IO

from stream_rt.graph.node import Context, Sink
from stream_rt.graph.packets import EndOfStream, Event, Packet
from stream_rt.media.images import encode_jpeg


class JsonlSink(Sink):
    """Appends one JSON line per packet reaching ``in`` (``Packet.to_record()``) to ``path``,
    flushed per line and fsynced when the sink stops; ``control``: control packets too (each
    source's end written once, last); ``snapshots_dir``: events' JPEG snapshots, encoded
    here; ``sources``: only those sources' ends are written."""

    inputs = {"in": (Packet,)}

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        control: bool = True,
        snapshots_dir: str | Path | None = None,
        sources: set[str] | None = None,
    ) -> None:
        super().__init__(name)
        self.path = Path(path)
        self.control = control
        self.sources = sources
        self._ends: dict[str, EndOfStream] = {}  # the first end of each source, written at stop
        self.snapshots_dir = Path(snapshots_dir) if snapshots_dir is not None else None
        self.written = 0
        self._file: IO[str] | None = None

    async def start(self, ctx: Context) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        if self.snapshots_dir is not None:
            self.snapshots_dir.mkdir(parents=True, exist_ok=True)

    async def process(self, packet: Packet, ctx: Context) -> None:
        snapshot = None
        if (
            self.snapshots_dir is not None
            and isinstance(packet, Event)
            and packet.type != "end"
            and packet.frame is not None
        ):
            snapshot = packet.snapshot_jpeg or await asyncio.to_thread(encode_jpeg, packet.frame)
        self._write(packet, snapshot)

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if not self.control:
            return
        if isinstance(packet, EndOfStream):
            if self.sources is None or packet.source_id in self.sources:
                self._ends.setdefault(packet.source_id, packet)
            return
        self._write(packet)

    async def stop(self, ctx: Context) -> None:
        if self._file is not None:
            for end in self._ends.values():
                self._write(end)
            self._ends.clear()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _write(self, packet: Packet, snapshot: bytes | None = None) -> None:
        assert self._file is not None, "JsonlSink used before start()"
        record = packet.to_record()
        if self.snapshots_dir is not None and isinstance(packet, Event) and snapshot:
            path = self.snapshots_dir / f"{packet.event_id}-{packet.seq}.jpg"
            path.write_bytes(snapshot)
            record.update(snapshot=str(path), snapshot_bytes=len(snapshot))
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        self.written += 1
