"""The lockstep of ``scripts/bench_vs_trl.py``: the two sides take turns, one step at a time.

Each side runs in its own process tree and talks to the benchmark over two pipes (file
descriptors passed on its command line as ``--channel R,W``), not over its stdout, which its
libraries fill with logs. A side announces itself (``send``), then before every step waits
for ``go`` and its options (``begin``), and after it, having saved what it keeps of the step
outside the timed span (``elapsed``), reports ``done`` with the step's seconds (``send``); while
one side works the other waits, so each step has both cores and the load that other jobs put
on the shared machine falls on both sides alike. Python's standard library only: the same
module serves trillora's venv and the benchmark's TRL venv.
"""

from __future__ import annotations

import json
import os
import time


class Lockstep:
    """A side's end: ``begin(step)`` blocks until the benchmark says go."""

    def __init__(self, channel: str):
        read_fd, write_fd = (int(fd) for fd in channel.split(","))
        self._in = os.fdopen(read_fd, "r")
        self._out = os.fdopen(write_fd, "w", buffering=1)
        self._began = 0.0

    def send(self, event: str, **fields) -> None:
        self._out.write(json.dumps({"event": event, **fields}) + "\n")

    def begin(self, step: int) -> dict:
        """Waits for ``go``; returns its options (what the benchmark varies in this step)."""
        line = self._in.readline()
        message = json.loads(line) if line.strip() else {}
        if message.get("event") != "go":
            raise SystemExit(f"bench lockstep: expected 'go' before step {step}, got {line!r}")
        self._began = time.perf_counter()
        return {k: v for k, v in message.items() if k != "event"}

    def elapsed(self) -> float:
        """Seconds since the last ``begin``."""
        return time.perf_counter() - self._began
