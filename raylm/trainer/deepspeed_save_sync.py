"""DeepSpeed's ``save_checkpoint`` without the synchronisation raylm's own save already makes.

On every save DeepSpeed checks that all ranks pass the same tag (two all-reduces) and brackets the save with two
barriers over the world: one after rank 0 makes the checkpoint directory, one once every rank has written. raylm
saves under one constant tag, makes the directory on every rank's behalf before the save
(``raylm.trainer.session.fresh_checkpoint_dir``, a barrier; a private directory per rank otherwise) and commits
only after gathering every rank's written files (``raylm.trainer.checkpoint_saves``): the three only add latency
to the training thread. Nothing in what DeepSpeed writes depends on them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class _WithoutBarrier:
    """DeepSpeed's ``comm`` module as ``save_checkpoint`` sees it, but for ``barrier``, which returns at once."""

    def __init__(self, comm):
        self._comm = comm

    def barrier(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(self._comm, name)


@contextmanager
def without_redundant_sync(engine) -> Iterator[None]:
    """Within the block, ``engine.save_checkpoint`` skips its tag check and its barriers (on every rank alike)."""
    from deepspeed.runtime import engine as defining  # where save_checkpoint looks its ``dist.barrier()`` up (imported: cheap)

    comm = defining.dist
    defining.dist = _WithoutBarrier(comm)
    engine._checkpoint_tag_validation = lambda tag: None  # shadows the method for this engine only
    try:
        yield
    finally:
        del engine._checkpoint_tag_validation
        defining.dist = comm
