#!/usr/bin/env python3
"""Before and after a change, side by side in one run: benchmark scripts run from a
worktree of an earlier commit and from this checkout, alternating, on the same machine.

Each benchmark already measures its figures against a bare baseline in the same run
(ratios); this compares those figures between the two trees, as after / before. Every
numeric figure of each benchmark's last line (one JSON object) is listed; a ratio near 1
means the change cost nothing there. Each tree runs with itself first on ``PYTHONPATH``
and as the working directory, so each measures its own code.

Usage: python benchmarks/compare_trees.py REV [--repeat 1]
           [--run "gates.py --parts kernels replay detector"] [--run "events.py" ...]
The series goes to ``benchmarks/series/compare_<rev>.json``; the last line printed is one
JSON object with the medians per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = ["gates.py --parts kernels replay detector", "events.py", "mqtt.py"]


def flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def run(tree: Path, command: str) -> dict[str, float]:
    script, *args = shlex.split(command)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(tree / "benchmarks" / script), *args],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{script} in {tree} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    figures = flatten(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"compare: {tree.name}: {command} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit before the change")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--run", action="append", help="a benchmark script and its arguments (repeatable)")
    options = parser.parse_args()
    runs = options.run or DEFAULT_RUNS
    before = Path(tempfile.mkdtemp(prefix="stream-rt-before-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(before), options.rev], cwd=ROOT, check=True)
    if (ROOT / "samples").exists():
        (before / "samples").symlink_to(ROOT / "samples")
    series: dict[str, dict[str, list[dict[str, float]]]] = {cmd: {"before": [], "after": []} for cmd in runs}
    try:
        for round_ in range(options.repeat):
            for cmd in runs:
                order = [("before", before), ("after", ROOT)]
                for label, tree in order if round_ % 2 == 0 else reversed(order):
                    series[cmd][label].append(run(tree, cmd))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for cmd, sides in series.items():
        names = sorted(set(sides["before"][0]) & set(sides["after"][0]))
        summary[cmd] = {}
        for name in names:
            b = statistics.median(f[name] for f in sides["before"])
            a = statistics.median(f[name] for f in sides["after"])
            summary[cmd][name] = {"before": b, "after": a, "after_over_before": round(a / b, 3) if b else float("nan")}
            print(f"{cmd.split()[0]:12s} {name:45s} {b:12.4g} {a:12.4g} {a / b if b else float('nan'):8.3f}")
    out = ROOT / "benchmarks" / "series" / f"compare_{options.rev[:12]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rev": options.rev, "runs": series}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
