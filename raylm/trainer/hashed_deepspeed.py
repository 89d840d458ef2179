"""DeepSpeed's checkpoint files written through a ``WrittenFiles`` ledger, so each is hashed as it is written.

DeepSpeed writes every state file through its engine's ``checkpoint_engine.save``; for one ``save_checkpoint``
call raylm wraps that engine so that ``save`` goes through the ledger and everything else stays DeepSpeed's.
(No DeepSpeed import here: importing it costs seconds and prints to stdout.)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from raylm.written_files import WrittenFiles

TORCH_ENGINE = "TorchCheckpointEngine"
"""The name of DeepSpeed's default engine, a plain ``torch.save`` of each state dict: what the wrapper replaces."""


class _HashingSaves:
    def __init__(self, own, written: WrittenFiles):
        self._own = own
        self._written = written

    def save(self, state_dict, path: str) -> None:
        self._written.torch_save(state_dict, path)

    def __getattr__(self, name: str):
        return getattr(self._own, name)


@contextmanager
def hashed_saves(engine, written: WrittenFiles) -> Iterator[None]:
    """Within the block, ``engine.save_checkpoint`` writes its state files through ``written``."""
    own = engine.checkpoint_engine
    if getattr(own, "name", None) != TORCH_ENGINE:
        raise RuntimeError(f"raylm hashes the files of DeepSpeed's {TORCH_ENGINE}; this engine uses {type(own).__name__}")
    engine.checkpoint_engine = _HashingSaves(own, written)
    try:
        yield
    finally:
        engine.checkpoint_engine = own
