"""Helper processes: work that would hold the GIL (a speech recogniser, a text embedder's
tokenizer and model loading) runs in a process of its own, so the event loop never waits
for it. Such a process runs at a lower priority than the daemon (words and vectors may
come later, frames may not) and, on Linux, is killed when the daemon dies (a SIGKILLed
daemon must not leave it behind, holding its stderr open)."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

NICENESS = 10
"""How much lower a helper process runs than the daemon (``os.nice``)."""


def helper_process() -> ProcessPoolExecutor:
    """One spawned process, started now and set up as above."""
    niceness = os.getpriority(os.PRIO_PROCESS, 0) + NICENESS
    executor = ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=_setup, initargs=(niceness,)
    )
    executor.submit(os.getpid)  # starts the process...
    for pid in list(executor._processes):  # ...lowered at once: its imports alone take a second of CPU
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, niceness)
    return executor


def kill(executor: ProcessPoolExecutor) -> None:
    """Stop ``executor`` now, its process killed even while a call runs (a hung call cannot
    be cancelled)."""
    for process in list(executor._processes.values()):
        process.kill()
    executor.shutdown(wait=False)  # what waited fails as BrokenProcessPool (a cancelled one trips CPython 3.11)


def _setup(niceness: int) -> None:
    with contextlib.suppress(OSError):  # where the daemon could not lower it
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
