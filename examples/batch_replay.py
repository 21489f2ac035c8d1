#!/usr/bin/env python3
"""Offline batch replay: every recording in a folder through the default pipeline, one
HTML report per recording and an index of them all.

    python examples/batch_replay.py FOLDER --out reports/ [--model smoke|MODEL_DIR]

Each recording gets ``reports/<name>/index.html`` (timeline, episodes, answers) and
``summary.json``; ``reports/index.html`` links them with their episode counts. A file
that is not media is listed with its error and the batch goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
from pathlib import Path

from stream_rt import build_pipeline, parse_config

MEDIA = {".avi", ".mkv", ".mp4", ".mov", ".ts", ".webm", ".wav", ".mp3", ".flac"}


async def replay(path: Path, out: Path, model: str | None) -> dict[str, object]:
    source_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)
    config = parse_config({
        "sources": [{"id": source_id, "url": str(path), "live": False}],
        # A replay loses nothing: every edge blocks, and the model is waited for.
        "graph": {"video_channel": {"policy": "block", "capacity": 4},
                  "audio_channel": {"policy": "block", "capacity": 64}},
        **({"mllm": {"model": model, "flow": "block"}} if model else {}),
    })  # fmt: skip
    pipeline = build_pipeline(config, speed=None)
    pipeline.attach_report(out / source_id, f"Replay of {path.name}", (config.trigger.on, config.trigger.off))
    try:
        await pipeline.graph.run()
    except Exception as exc:  # one bad file must not stop the batch
        return {"file": path.name, "error": str(exc).splitlines()[0]}
    summary = json.loads((out / source_id / "summary.json").read_text())
    return {"file": path.name, "report": f"{source_id}/index.html", "episodes": len(summary["episodes"]),
            "duration_s": summary["duration_s"]}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--model", help="ask a model about each episode ('smoke': random weights, not meaningful)")
    args = parser.parse_args()
    files = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in MEDIA)
    rows = []
    for n, path in enumerate(files, 1):
        print(f"[{n}/{len(files)}] {path.name}", flush=True)
        rows.append(await replay(path, args.out, args.model))
    items = "".join(
        f'<li><a href="{html.escape(str(r["report"]))}">{html.escape(str(r["file"]))}</a>: {r["episodes"]} episode(s) '
        f"in {r['duration_s']} s</li>" if "report" in r else
        f"<li>{html.escape(str(r['file']))}: <b>not replayed</b> ({html.escape(str(r['error']))})</li>"
        for r in rows
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    head = '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Replays</title></head>'
    (args.out / "index.html").write_text(f"{head}<body><h1>Replays</h1><ul>{items}</ul></body></html>\n")
    (args.out / "batch.json").write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} recordings, reports in {args.out / 'index.html'}")


if __name__ == "__main__":
    asyncio.run(main())
