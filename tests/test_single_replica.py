"""One data-parallel replica under ZeRO-0: DeepSpeed's gradient all-reduce is left out (over one rank it is the
identity) and the weights come out bit for bit as with it; ZeRO >= 1 keeps it (its optimizer's step reads what
its reduce fills)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import TINY_PRETRAIN
from gloo_spawn import run_on_gloo

STEPS = 3


def _steps_and_reductions(trainer) -> int:
    """Run STEPS training steps; the largest tensor they all-reduced (elements)."""
    sizes = [0]
    original = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        for _ in range(STEPS):
            trainer.train_step()
    finally:
        dist.all_reduce = original
    return max(sizes)


def _compare_on_one_rank(rank: int, world_size: int, root: Path) -> None:
    from raylm.configs.loader import load_config
    from raylm.trainer import run_dir as rundir
    from raylm.trainer.session import LocalSession
    from raylm.trainer.worker import StageTrainer

    def trainer(zero_stage: int):
        run_dir = root / f"zero{zero_stage}"
        if not run_dir.exists():
            run = load_config("tiny", [*TINY_PRETRAIN, "cluster.num_workers=1", f"parallel.zero_stage={zero_stage}"])
            run.name = run_dir.name
            run_dir.mkdir()
            rundir.save_config(run_dir, run)
        return StageTrainer(run_dir, 0, lambda stage_dir, cfg: LocalSession(stage_dir, cfg.train.keep_last), torch.device("cpu"))

    skipping = trainer(0)
    assert not skipping.engine.enable_backward_allreduce
    # Only scalars: the loss's mean and the squared gradient norm over the (one-rank) groups.
    assert _steps_and_reductions(skipping) == 1

    reducing = trainer(0)
    reducing.engine.enable_backward_allreduce = True  # DeepSpeed's default
    # Every gradient, flattened into one bucket.
    assert _steps_and_reductions(reducing) == sum(p.numel() for p in reducing.engine.module.parameters())
    skipped, reduced = skipping.engine.module.state_dict(), reducing.engine.module.state_dict()
    for name, weight in reduced.items():
        assert torch.equal(skipped[name], weight), name
    assert any(not torch.equal(weight, initial) for weight, initial in zip(reduced.values(), trainer(0).engine.module.state_dict().values()))

    assert trainer(1).engine.enable_backward_allreduce


@pytest.mark.slow
def test_one_replica_under_zero0_skips_deepspeeds_gradient_all_reduce_and_trains_identically(tmp_path):
    run_on_gloo(_compare_on_one_rank, 1, tmp_path)
