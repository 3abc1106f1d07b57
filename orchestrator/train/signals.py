"""Stop requests: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (sent by clusters before a time limit).

A handler only records the request; the loop checks it between steps, agrees on it with the
other ranks, writes a checkpoint and leaves as `preempted`.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            log.warning("%s received: stopping after this step with a checkpoint", name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
