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


def die_with_launcher() -> None:
    """SIGKILL this rank when the process that started it (torchrun's agent, or the supervisor) dies (Linux).

    torchrun starts each rank in a session of its own, so a SIGKILL of the launcher's process group (a crashed
    supervisor, `kill -9`, the OOM killer) leaves the ranks running: over their direct gloo or NCCL links they
    can train on and write checkpoints beside the job that `orch resume` starts. A rank whose launcher is gone
    is lost anyway; the kernel now ends it with its launcher. Elsewhere (macOS) this does nothing.
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("cannot tie this rank to its launcher (prctl errno %d)", ctypes.get_errno())
        return
    if os.getppid() != launcher:  # the launcher died before the tie was made
        os.kill(os.getpid(), signal.SIGKILL)
