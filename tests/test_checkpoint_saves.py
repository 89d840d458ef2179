"""A stage's checkpoint saves on 2 gloo ranks, without DeepSpeed or Ray: an asynchronous save commits on the
writer thread while the training thread does nothing (no poll, no collective), deletes the checkpoints beyond
``keep_last`` there, and a failed write raises on the training thread at its next look."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from gloo_spawn import run_on_gloo
from raylm.trainer.checkpoint import MANIFEST, TrainerState, step_dir_name, verify
from raylm.trainer.checkpoint_saves import CheckpointSaves
from raylm.trainer.session import LocalSession

pytestmark = pytest.mark.slow  # real processes, as every gloo test

STATE = TrainerState(step=2, consumed_samples=32, tokens_seen=2048, world_size=2, tp=1, pp=1, dp=2)


def _saves(root: Path, logged: list) -> CheckpointSaves:
    writer_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    return CheckpointSaves(LocalSession(root, keep_last=1), logged.append, writer_group)


def _write_part(written, directory: Path) -> None:
    written.write_bytes(directory / f"part_rank{dist.get_rank()}.bin", bytes([dist.get_rank()]) * 4096)


def _commit_while_training_waits(rank: int, world_size: int, root: Path) -> None:
    logged: list = []
    saves = _saves(root, logged)
    saves.save(STATE, {"loss": 2.0}, _write_part)
    first = root / step_dir_name(2)
    deadline = time.monotonic() + 60
    while not (first / MANIFEST).is_file():  # the training thread only waits: the writer thread commits
        assert time.monotonic() < deadline, "the asynchronous checkpoint never committed without the training thread"
        time.sleep(0.02)
    assert logged == []  # logged by the training thread, at its next look
    saves.poll()
    saves.save(replace(STATE, step=4), {"loss": 1.5}, _write_part)
    saves.finish()
    dist.barrier()
    assert verify(root / step_dir_name(4)) is None
    assert not first.exists()  # beyond keep_last=1: deleted by rank 0's writer thread once step 4 committed
    if rank == 0:
        assert [(r["step"], r["event"], r["async"]) for r in logged] == [(2, "checkpoint", True), (4, "checkpoint", True)]
        assert all(0 < r["stall_s"] <= r["seconds"] for r in logged)
        assert all(r["bytes"] == 2 * 4096 for r in logged)


def _write_into_a_directory(written, directory: Path) -> None:
    taken = directory / f"taken_rank{dist.get_rank()}"
    taken.mkdir()
    written.write_bytes(taken, b"x")


def _failed_write_raises(rank: int, world_size: int, root: Path) -> None:
    saves = _saves(root, [])
    saves.save(STATE, {"loss": 2.0}, _write_into_a_directory)
    with pytest.raises(IsADirectoryError):
        saves.finish()
    assert not (root / step_dir_name(2) / MANIFEST).exists()


def test_an_async_checkpoint_commits_on_the_writer_thread(tmp_path):
    run_on_gloo(_commit_while_training_waits, 2, tmp_path)


def test_a_failed_background_write_raises_on_the_training_thread(tmp_path):
    run_on_gloo(_failed_write_raises, 2, tmp_path)
