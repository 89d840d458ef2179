"""Work repeated on a background thread while a block runs, and once more when it ends."""

from __future__ import annotations

import threading
from typing import Callable, Optional


class Periodic:
    """Calls ``action`` every ``every_s`` seconds on a daemon thread while in use, then once more on exit (after
    the thread stopped, so the last call sees everything the block did), failed or not."""

    def __init__(self, action: Callable[[], None], every_s: float, name: str):
        self.action = action
        self.every_s = every_s
        self.name = name
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Periodic":
        self._thread = threading.Thread(target=self._repeat, daemon=True, name=self.name)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.action()

    def stop(self) -> None:
        """Stop repeating (without the last call)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _repeat(self) -> None:
        while not self._stop.wait(self.every_s):
            self.action()
