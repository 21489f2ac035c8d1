"""Write packets as JSON lines, one record per packet (``Packet.to_record()``).

Each line is flushed as it is written, so a crash loses at most the line being written;
the file is fsynced when the sink stops. With ``snapshots_dir``, an event's JPEG snapshot
is written there as ``<event_id>-<seq>.jpg`` and its record names the file.

An end of stream reaches the sink along every path from its source (its status, the
events, the answers, each in its own time): it is written once per source (only for
``sources``, when given), when the sink stops, so it is the last record of its source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from stream_rt.graph.node import Context, Sink
from stream_rt.graph.packets import EndOfStream, Event, Packet


class JsonlSink(Sink):
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
        self._write(packet)

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

    def _write(self, packet: Packet) -> None:
        assert self._file is not None, "JsonlSink used before start()"
        record = packet.to_record()
        if self.snapshots_dir is not None and isinstance(packet, Event) and packet.snapshot_jpeg:
            path = self.snapshots_dir / f"{packet.event_id}-{packet.seq}.jpg"
            path.write_bytes(packet.snapshot_jpeg)
            record["snapshot"] = str(path)
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        self.written += 1
