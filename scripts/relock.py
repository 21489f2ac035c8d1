#!/usr/bin/env python3
"""Re-resolve requirements.lock to the newest versions pyproject.toml allows; keep it only if the suite passes.

Usage: ``python3 scripts/relock.py [--hold SPEC]... [--keep-temp] [-- PYTEST_ARGS...]``

In a temporary folder, from a clean copy of the committed tree (``git archive HEAD``: nothing
uncommitted and nothing installed by hand takes part), it

1. resolves stream-rt with the extras that scripts/setup.sh installs, every package at the
   newest version the ranges in pyproject.toml allow, with pip-compile (pip-tools); torch is
   held at setup.sh's pin, which on this machine is the CPU wheel;
2. installs that candidate lock in a fresh virtual environment the way setup.sh does (torch
   first, then ``pip install -c <lock> -e ".[extras]"``) and checks that what got installed
   is exactly the candidate lock;
3. runs the test suite there: ``python -m pytest -q`` as .ci/run does, or PYTEST_ARGS for a
   quick trial (the lock's header then says that only a selection passed);
4. if pytest passes, rewrites requirements.lock and prints what moved (old -> new, added,
   removed); if anything fails, prints what would have moved and leaves the lock alone.

Why pip-tools and not uv (both tried on this machine): pip-compile resolves with pip itself
and reads pip's own configuration (pip.conf, PIP_* variables: find-links, extra indexes), the
same configuration setup.sh's ``pip install`` uses, so the lock holds what pip would install.
Here that is what picks the CPU torch wheel (torch 2.13.0+cpu, in find-links) over PyPI's
torch 2.13.0, whose metadata pulls in fifteen nvidia-* packages and triton. uv resolves the
same set only when it is handed the machine's settings by hand: it reads neither pip.conf nor
PIP_FIND_LINKS (left alone it chose PyPI's torch with nvidia-* and triton), and with the two
local file:// indexes its default first-index strategy fails (it sees transformers 5.17
only) unless told ``--index-strategy unsafe-best-match``. Its speed (1 s against 8 s) does
not matter beside the test suite.

No hashes: a constraints file with hashes puts pip in hash-checking mode for every
requirement, and the package itself, installed editable (``-e .``), cannot be hashed, so pip
refuses the install.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
# The resolver itself, pinned so that a new pip or pip-tools release cannot change how a lock is made.
TOOLS = ["pip==26.3", "pip-tools==7.7.0"]
# Packages that only a CUDA build of torch brings; the lock must never hold them.
CUDA_ONLY = re.compile(r"^(nvidia-.*|triton)$")
HOLDS = "relock-holds.txt"  # the constraints file pip-compile names in its "# via -c" notes
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)


def say(message: str) -> None:
    print(f"relock: {message}", flush=True)


def fail(message: str) -> NoReturn:
    print(f"relock: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """Package -> version of every ``name==version`` line, names normalised, local labels kept."""
    return {norm(name): version for name, version in PIN.findall(text)}


def run(cmd: list[str], what: str, *, cwd: Path, env: dict[str, str] | None = None) -> None:
    """Run quietly; on failure show the end of its output (without pip's noise about this machine's mirrors)."""
    done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stdout.splitlines() if "is ignored: it is neither a file nor" not in line]
        print("\n".join(lines[-40:]), file=sys.stderr)
        fail(f"{what} failed (exit {done.returncode}): see above")


def from_setup(setup: str) -> tuple[str, str]:
    """setup.sh's torch pin and extras, so that the lock is made for exactly what setup.sh installs."""
    torch = re.search(r"^torch_pin=(torch==\S+)$", setup, re.MULTILINE)
    extras = re.search(r'-c requirements\.lock -e "\.\[([a-z,]+)\]"', setup)
    if not torch or not extras:
        fail("scripts/setup.sh no longer has 'torch_pin=torch==X' and '-c requirements.lock -e \".[extras]\"'")
    return torch.group(1), extras.group(1)


def copy_committed_tree(dest: Path) -> tuple[str, str]:
    """Unpack HEAD's tree into dest; return HEAD and the last commit that changed pyproject.toml."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "pyproject.toml", "scripts/setup.sh"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if dirty:
        say("note: pyproject.toml or scripts/setup.sh has uncommitted changes; the committed ones are used")
    # Named in the lock's header: the last commit that changed pyproject.toml (HEAD itself may never be pushed).
    pyproject_commit = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%H", "HEAD", "--", "pyproject.toml"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], stdout=subprocess.PIPE)
    assert archive.stdout is not None
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(dest, filter="data")
    if archive.wait() != 0:
        fail("git archive HEAD failed")
    return commit, pyproject_commit


def installed(python: Path) -> dict[str, str]:
    script = (
        "import json, importlib.metadata as m; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True).stdout
    return {norm(name): version for name, version in json.loads(out).items()}


def describe_moves(old: dict[str, str], new: dict[str, str]) -> list[str]:
    both = sorted(old.keys() & new.keys())
    moved = [f"  {name}: {old[name]} -> {new[name]}" for name in both if old[name] != new[name]]
    added = [f"  added: {name} {new[name]}" for name in sorted(new.keys() - old.keys())]
    removed = [f"  removed: {name} {old[name]}" for name in sorted(old.keys() - new.keys())]
    return moved + added + removed


def header(*, torch: str, extras: str, commit: str, holds: list[str], tested: str) -> str:
    held = ", ".join([f"{torch} (setup.sh's pin)", *holds])
    return "\n".join(
        [
            "# requirements.lock: every package that scripts/setup.sh installs, pinned at the versions",
            "# the test suite passed with (Linux x86_64, CPython 3.11). A constraints file: pyproject.toml",
            "# still names the package, its extras and their ranges. Install with:",
            f"#   pip install {torch}    # first (on this machine the CPU wheel, +cpu)",
            f'#   pip install -c requirements.lock -e ".[{extras}]"',
            "# Made by scripts/relock.py (see the README), not by hand:",
            f"#   resolved from pyproject.toml as of commit {commit[:12]} by pip-compile ({TOOLS[1]})",
            f"#   held ({HOLDS} below): {held}",
            f"#   passed: {tested}",
            "# No hashes: pip's hash-checking mode cannot install the package itself editable (-e .).",
            "",
        ]
    )


def main() -> None:
    argv = sys.argv[1:]
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="scripts/relock.py",
        description="Re-resolve requirements.lock to the newest allowed versions; keep it only if pytest passes.",
        epilog="Arguments after '--' go to pytest instead of the full suite, e.g. -- -k test_config",
    )
    parser.add_argument(
        "--hold",
        action="append",
        default=[],
        metavar="SPEC",
        help="an extra constraint for this resolution only, e.g. 'opencv-python-headless<5.1' while a fix "
        "for a new release lands; named in the lock's header",
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary folder (copy, venvs) for a look")
    options = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        fail(f"the lock describes CPython 3.11; run this with python3.11, not {sys.version.split()[0]}")

    tmp = Path(tempfile.mkdtemp(prefix="stream-rt-relock-"))
    try:
        relock(tmp, options.hold, pytest_args)
    finally:
        if options.keep_temp:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def relock(tmp: Path, holds: list[str], pytest_args: list[str]) -> None:
    started = time.monotonic()

    def step(message: str) -> None:
        say(f"[{time.monotonic() - started:4.0f} s] {message}")

    src = tmp / "src"
    src.mkdir()
    commit, pyproject_commit = copy_committed_tree(src)
    torch, extras = from_setup((src / "scripts" / "setup.sh").read_text())
    step(f"resolving commit {commit[:12]} in {tmp} (extras {extras}; held: {', '.join([torch, *holds])})")

    tools = tmp / "tools"
    run([sys.executable, "-m", "venv", str(tools)], "creating the resolver's venv", cwd=tmp)
    run([str(tools / "bin" / "pip"), "install", "-q", *TOOLS], f"installing {' '.join(TOOLS)}", cwd=tmp)
    (src / HOLDS).write_text("\n".join([torch, *holds]) + "\n")
    candidate = tmp / "requirements.lock"
    compile_cmd = [
        str(tools / "bin" / "pip-compile"),
        "--quiet",
        "--upgrade",
        f"--extra={extras}",
        "--strip-extras",
        "--allow-unsafe",
        "--no-emit-index-url",
        "--no-emit-find-links",
        "--no-emit-trusted-host",
        "--constraint",
        HOLDS,
        "--output-file",
        str(candidate),
        "pyproject.toml",
    ]
    run(compile_cmd, "pip-compile", cwd=src, env={**os.environ, "CUSTOM_COMPILE_COMMAND": "scripts/relock.py"})
    body = candidate.read_text()
    cuda = sorted(name for name in pins(body) if CUDA_ONLY.match(name))
    if cuda:
        fail(f"the resolution took a CUDA torch ({', '.join(cuda)}): is the CPU wheel in pip's find-links?")
    # torch==2.13.0+cpu -> torch==2.13.0: the same wheel here, and a pin a machine without it can still meet.
    body = re.sub(r"^torch==([^+\s]+)\+\S+$", r"torch==\1", body, flags=re.MULTILINE)
    new = pins(body)
    if f"torch=={new.get('torch')}" != torch:
        fail(f"the lock's torch ({new.get('torch')}) is not setup.sh's {torch}")
    old = pins(LOCK.read_text()) if LOCK.exists() else {}
    moves = describe_moves(old, new)
    step(f"resolved {len(new)} packages; moved, added or removed against requirements.lock: {len(moves)}")

    venv = tmp / "venv"
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "venv", str(venv)], "creating the test venv", cwd=tmp)
    step(f"installing {torch}, then the candidate lock, as scripts/setup.sh does")
    run([str(python), "-m", "pip", "install", "-q", torch], f"installing {torch}", cwd=src)
    run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(candidate), "-e", f".[{extras}]"],
        "installing from the candidate lock",
        cwd=src,
    )
    run([str(python), "-m", "pip", "check"], "pip check", cwd=src)
    have = {name: version.split("+")[0] for name, version in installed(python).items()}
    have.pop("pip", None)
    have.pop("stream-rt", None)
    drift = describe_moves(new, have)
    if drift:
        print("\n".join(drift), file=sys.stderr)
        fail("the install differs from the candidate lock (lock -> installed above)")
    step(f"installed exactly the candidate lock ({len(new)} packages)")

    samples = Path(os.environ.get("STREAM_RT_SAMPLES", REPO / "samples"))
    env = {**os.environ, "STREAM_RT_SAMPLES": str(samples)}
    fetch = [str(python), "scripts/fetch_samples.py", "--dest", str(samples)]
    run(fetch, "fetching the sample media", cwd=src, env=env)
    # Where the tests, the scenarios (../samples/...) and the examples look for them, as in a checkout.
    (src / "samples").symlink_to(samples.resolve(), target_is_directory=True)
    tested = " ".join(["python -m pytest -q", *pytest_args])
    step(f"running {tested} (sample media in {samples})")
    rc = subprocess.run([str(python), "-m", "pytest", "-q", *pytest_args], cwd=src, env=env).returncode
    if rc != 0:
        print("\n".join(moves) or "  (nothing moved)")
        fail(f"pytest failed (exit {rc}) with the versions above; requirements.lock left as it was")
    if pytest_args:
        tested = f"`{tested}` (a selection, not the whole suite)"
    else:
        tested = f"`{tested}` (the whole suite, as .ci/run)"

    text = header(torch=torch, extras=extras, commit=pyproject_commit, holds=holds, tested=tested) + body
    step(f"pytest passed: {tested}")
    print("\n".join(moves) or "  (no package moved)")
    LOCK.write_text(text)
    say(f"rewrote {LOCK.relative_to(REPO)} ({len(moves)} moved, added or removed); review and commit it")


if __name__ == "__main__":
    main()
