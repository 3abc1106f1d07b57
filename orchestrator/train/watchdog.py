"""The hang watchdog of one rank: no progress for resources.hang_timeout_s ends the rank with every thread's stack.

A rank that hangs in a collective (another rank stopped or lost) or in a data read does not fail:
it waits, up to the collective timeout, or forever in a read. The watchdog is a thread beside the
training loop. The loop reports progress after every step; checkpoints, sample grids and
evaluations pause the watch (they are progress of their own, and have their own timeouts). When
nothing has moved for the timeout, the watchdog writes every thread's Python stack into the job's
log (faulthandler: also the threads stuck in C code), records the hang (rank 0, in the job state),
and ends the rank with EXIT_HANG. The launcher then stops the other ranks, and with
resources.max_restarts left the job starts again from its newest checkpoint.

A backstop in C (faulthandler.dump_traceback_later) ends the rank the same way if even this thread
cannot run (a C call holding the GIL), a grace period later. Re-arming it joins and starts a C thread
(~0.2 ms on a busy CPU: 2% of a small model's step), so progress re-arms it every few seconds, not
every step; the grace period covers the difference.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

log = logging.getLogger(__name__)

EXIT_HANG = 3  # the exit code of a rank the watchdog ended
BACKSTOP_GRACE_S = 30.0
BACKSTOP_REARM_S = 5.0  # progress re-arms the backstop at most this often (well inside BACKSTOP_GRACE_S)


class HangWatchdog:
    """Ends this rank when `progress()` has not been called for `timeout_s` seconds outside `paused()` sections."""

    def __init__(self, timeout_s: float, on_hang: Callable[[str], None]):
        self.timeout_s = timeout_s
        self.on_hang = on_hang  # gets the message; records it where the job's state is kept
        self.step = 0
        self._last = time.monotonic()
        self._backstop_from = -BACKSTOP_REARM_S  # when the backstop was last armed
        self._armed = False  # from the first progress report on: the first step may compile for minutes
        self._paused: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def progress(self, step: int) -> None:
        """The loop finished `step`: the watch starts over."""
        self.step, self._last, self._armed = step, time.monotonic(), True
        if self._last - self._backstop_from >= BACKSTOP_REARM_S:
            self._arm_backstop()

    def _arm_backstop(self) -> None:
        self._backstop_from = time.monotonic()
        faulthandler.dump_traceback_later(self.timeout_s + BACKSTOP_GRACE_S, exit=True, file=sys.stderr)

    @contextmanager
    def paused(self, what: str):
        """A section that is progress of its own (a checkpoint, a grid, an evaluation): not watched."""
        self._paused = what
        faulthandler.cancel_dump_traceback_later()
        try:
            yield
        finally:
            self._paused = None
            if self._armed:
                self._last = time.monotonic()
                self._arm_backstop()  # it was cancelled for the pause

    def close(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        interval = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(interval):
            idle = time.monotonic() - self._last
            if not self._armed or self._paused is not None or idle < self.timeout_s:
                continue
            message = (
                f"hang: no progress for {idle:.0f} s after step {self.step} (resources.hang_timeout_s "
                f"{self.timeout_s:g}); every thread's stack is in the log"
            )
            log.error("%s; dumping the stacks of rank %s", message, os.environ.get("RANK", "0"))
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            try:
                self.on_hang(message)
            except Exception:  # recording must not keep a hung rank alive
                log.exception("could not record the hang")
            os._exit(EXIT_HANG)
