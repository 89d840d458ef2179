"""DeepSpeed's checkpoint files written through a ``WrittenFiles`` ledger, so each is hashed as it is written.

DeepSpeed writes every state file through its engine's ``checkpoint_engine.save``; for one ``save_checkpoint``
call raylm puts in its place DeepSpeed's own torch engine with that one method writing through the ledger.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from raylm.written_files import WrittenFiles


class _HashingTorchCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, written: WrittenFiles):
        super().__init__(None)
        self.written = written

    def save(self, state_dict, path: str) -> None:
        self.written.torch_save(state_dict, path)


@contextmanager
def hashed_saves(engine, written: WrittenFiles) -> Iterator[None]:
    """Within the block, ``engine.save_checkpoint`` writes its state files through ``written``."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"raylm hashes DeepSpeed's torch checkpoint engine's files; this engine uses {type(engine.checkpoint_engine).__name__}")
    own = engine.checkpoint_engine
    engine.checkpoint_engine = _HashingTorchCheckpointEngine(written)
    try:
        yield
    finally:
        engine.checkpoint_engine = own
