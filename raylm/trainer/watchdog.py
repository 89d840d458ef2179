"""Turn a hang into a failure the launcher can restart.

A rank stuck in a collective with a dead or frozen peer may wait for as long
as the slowest process-group timeout (DeepSpeed's and torch's own groups
default to 30 minutes). The watchdog gives every rank a heartbeat: when no
progress was reported for ``timeout_s`` the process exits, Ray Train sees the
worker die and restarts the group from the latest complete checkpoint.
"""

from __future__ import annotations

import os
import sys
import threading
import time

HANG_EXIT_CODE = 75


class HangWatchdog:
    def __init__(self, timeout_s: float, what: str):
        self.timeout_s = timeout_s
        self.what = what
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raylm-hang-watchdog", daemon=True)

    def __enter__(self) -> "HangWatchdog":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        # Wake at the deadline itself, not on a poll: the process groups' collectives give up only a short grace
        # after it (``FaultConfig.collective_timeout``), and this line must come first.
        while True:
            idle = time.monotonic() - self._last
            if idle >= self.timeout_s:
                print(
                    f"[raylm] {self.what}: no progress for {idle:.0f} s (fault.hang_timeout_s={self.timeout_s:g}); "
                    "exiting so the worker group restarts from the last complete checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(HANG_EXIT_CODE)
            if self._stop.wait(self.timeout_s - idle):
                return
