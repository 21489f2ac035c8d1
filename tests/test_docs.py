"""The reference pages cannot drift: every counter and gauge the code emits is listed in
docs/METRICS.md, every MQTT record field in docs/MQTT.md; every Python snippet of the
README runs as written, and its callback pattern passes ``mypy --strict``."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import stream_rt

ROOT = Path(__file__).parents[1]
PACKAGE = Path(stream_rt.__file__).parent


def emitted_names() -> set[str]:
    """Counter and gauge names in the package's source; f-string parts become <...>."""
    patterns = [r'ctx\.count\(\s*(f?"[^"]+")', r'counters\[(f?"[^"]+")\] \+?=', r'stats\[(f?"[^"]+")\] \+=',
                r'gauges\[(f?"[^"]+")\] =', r'return \{"(fps)"', r'"(in_flight)"', r'"(waiting)"']  # fmt: skip
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "memory":  # the memory's own tallies, reported by the stage as memory_*
            continue
        for pattern in patterns:
            for literal in re.findall(pattern, path.read_text()):
                name = re.sub(r'^f(?=")', "", literal).strip('"')
                names.add(re.sub(r"\{[^}]+\}", "<x>", name))
    return names


def test_every_counter_and_gauge_is_documented() -> None:
    doc = (ROOT / "docs" / "METRICS.md").read_text()
    documented = set(re.findall(r"`([a-z_<>]+)`", doc))
    missing = set()
    for name in emitted_names():
        if "<x>" in name:
            prefix = name.split("<x>")[0]
            if not any(d.startswith(prefix) and "<" in d for d in documented):
                missing.add(name)
        elif name not in documented:
            missing.add(name)
    assert not missing, f"not in docs/METRICS.md: {sorted(missing)}"
    assert len(emitted_names()) > 30


def test_every_field_of_the_mqtt_records_is_documented() -> None:
    from stream_rt import Event, MllmAnswer, Salience

    doc = (ROOT / "docs" / "MQTT.md").read_text()
    salience = Salience("cam", 1, 1000, 0, 0.9, {"visual": 0.9})
    event = Event("cam", 1, 1000, 0, "new", "cam-1", 0, None, 0.9, 0.9, salience.components, (), True)
    answer = MllmAnswer("cam", 1, 1000, 0, "cam-1", "q", "ok", {"summary": "s"}, "t", "smoke", True)
    common = {"kind", "source_id", "seq", "pts_ns", "wall_ns"}
    for record in (event.to_record(), answer.to_record()):
        for key in set(record) - common:
            assert f"| `{key}` |" in doc, f"{record['kind']}.{key} is not in docs/MQTT.md"
    assert all(f"`{key}`" in doc for key in common)


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_snippets() -> None:
    assert len(readme_snippets()) >= 3


@pytest.mark.parametrize("index", range(len(readme_snippets())))
def test_every_python_snippet_of_the_readme_runs_as_written(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each snippet on its own, in a fresh namespace, from the checkout (its paths are the
    README's: ``samples/...``)."""
    monkeypatch.chdir(ROOT)
    exec(compile(readme_snippets()[index], f"README.md snippet {index + 1}", "exec"), {"__name__": "readme"})


def test_the_readme_callback_pattern_passes_mypy_strict(tmp_path: Path) -> None:
    """A callback taking :class:`MllmAnswer` is what a robot program writes: its
    ``CallbackSink`` must type-check under ``mypy --strict`` as the README shows it."""
    snippet = next(s for s in readme_snippets() if "def on_answer(answer: MllmAnswer)" in s)
    program = tmp_path / "robot.py"
    program.write_text(snippet)
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", str(program)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_ships_its_type_marker() -> None:
    assert (PACKAGE / "py.typed").is_file()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["stream_rt"]
