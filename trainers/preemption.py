"""SIGTERM and SIGINT stop a run at a step boundary, checkpointed, within a grace period.

What ``scancel``, a Kubernetes eviction or a spot preemption sends first is SIGTERM, then
SIGKILL after a grace period. On the first signal the driver finishes the step in flight if
its update has begun (its weights are then half-way to the next step) or abandons it if not,
writes a checkpoint at that boundary, shuts the fleets down and exits with
``EXIT_PREEMPTED``; a resumed run loses at most the abandoned step. If the grace period runs
out first, or a second signal arrives, ``on_expired`` ends the process at once (it still
prints where to resume from and exits with the same status).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, resumable with trainer.resume=auto


class StopRequested(Exception):
    """Raised by a step that was abandoned before its update began."""


class Preemption:
    """Turns SIGTERM/SIGINT into a stop request, with a watchdog for the grace period."""

    def __init__(self, grace_s: float, on_expired: Callable[[str], None], log=print):
        self.grace_s = grace_s
        self.on_expired = on_expired
        self.log = log
        self.signal_name: str | None = None
        self._timer: threading.Timer | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> Preemption:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            self.on_expired(f"a second signal ({name}) arrived")
            return
        self.signal_name = name
        self.log(f"\n{name} received: stopping at the next step boundary with a checkpoint "
                 f"(grace period {self.grace_s:g} s)")
        self._timer = threading.Timer(self.grace_s, self.on_expired, args=(f"the {self.grace_s:g} s grace period ran out",))
        self._timer.daemon = True
        self._timer.start()

    def raise_if_requested(self) -> None:
        """Called by a step before its update begins: abandon it if a stop was requested."""
        if self.requested:
            raise StopRequested(self.signal_name)

