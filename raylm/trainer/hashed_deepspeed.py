"""DeepSpeed's checkpoint files written through a ``WrittenFiles`` ledger, so each is hashed as it is written.

DeepSpeed writes every state file through its engine's ``checkpoint_engine.save``; for one ``save_checkpoint``
call raylm wraps that engine so that ``save`` goes through the ledger and everything else stays DeepSpeed's.
DeepSpeed also copies its recovery scripts (``zero_to_fp32.py`` and the like) into every checkpoint, outside
that engine and on the training thread even when the state files are written in the background; raylm leaves
them out: no resume reads them, the layout-free copy and the final safetensors are raylm's consolidated weights,
and the scripts stay runnable from the installed package (``python -m deepspeed.utils.zero_to_fp32``).
A checkpoint's directory then holds exactly the files its manifest lists.
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
    """Within the block, ``engine.save_checkpoint`` writes its state files through ``written``, and nothing else."""
    own = engine.checkpoint_engine
    if getattr(own, "name", None) != TORCH_ENGINE:
        raise RuntimeError(f"raylm hashes the files of DeepSpeed's {TORCH_ENGINE}; this engine uses {type(own).__name__}")
    engine.checkpoint_engine = _HashingSaves(own, written)
    engine._copy_recovery_script = lambda save_path: None  # shadows the method for this engine only
    try:
        yield
    finally:
        del engine._copy_recovery_script
        engine.checkpoint_engine = own
