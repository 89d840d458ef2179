"""Environment variables set for a while, then put back as they were."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Dict, Iterator


@contextmanager
def environment(settings: Dict[str, str]) -> Iterator[None]:
    """``settings`` in this process's environment inside the block; each variable restored (or removed) after it."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
