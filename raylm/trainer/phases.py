"""Where a rank's stage set-up and wrap-up time goes: named wall-clock phases, in order."""

from __future__ import annotations

import time
from typing import Dict, Optional


class Phases:
    """``mark(name)`` closes the phase that began at the previous mark (or at ``began``)."""

    def __init__(self, began: Optional[float] = None):
        self.began = time.time() if began is None else began
        self._last = self.began
        self.seconds: Dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now
