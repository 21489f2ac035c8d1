"""The direction of imports is checked: the floors of docs/ARCHITECTURE.md, as import
contracts in ``pyproject.toml``, kept by import-linter; a wrong-way import fails here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """import-linter on the ``stream_rt`` package found in ``tree`` (its pyproject's contracts)."""
    return subprocess.run(
        [sys.executable, "-c", LINT],
        cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_every_import_points_down() -> None:
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


def test_a_wrong_way_import_is_caught(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "stream_rt", tmp_path / "stream_rt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    channel = tmp_path / "stream_rt" / "graph" / "channel.py"
    channel.write_text(channel.read_text() + "\nfrom stream_rt.sinks import jsonl  # noqa\n")
    run = lint_imports(tmp_path)
    assert run.returncode == 1, run.stdout
    assert "stream_rt.graph is not allowed to import stream_rt.sinks" in run.stdout
