"""bf16 keeps fp32 master weights: a stage starts them at its unrounded weights and hands them on unrounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import TINY_PRETRAIN
from gloo_spawn import run_on_gloo
from raylm.configs.loader import load_config, resolve_stage
from raylm.launcher import run_dir as rundir
from raylm.launcher.session import LocalSession
from raylm.launcher.worker import StageTrainer, build_dense_model
from raylm.parallelism.masters import consolidated_state_dict

pytestmark = pytest.mark.slow


def _masters_start_at_the_fp32_weights(rank: int, world_size: int, tmp: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))  # what DeepSpeed reads
    for zero_stage in (2, 3):
        run = load_config("tiny", [*TINY_PRETRAIN, "train.precision=bf16", f"parallel.zero_stage={zero_stage}"])
        run_dir = tmp / f"zero{zero_stage}"
        if rank == 0:
            run.name = run_dir.name
            run_dir.mkdir()
            rundir.save_config(run_dir, run)
        dist.barrier()
        trainer = StageTrainer(run_dir, 0, lambda stage_dir, cfg: LocalSession(stage_dir, cfg.train.keep_last), torch.device("cpu"))
        masters = consolidated_state_dict(trainer.engine, trainer.par)
        for name, weight in build_dense_model(resolve_stage(run, 0), None).state_dict().items():
            if name in masters:  # a tied head is stored once
                assert torch.equal(masters[name], weight), f"ZeRO-{zero_stage}: {name}"


@pytest.mark.timeout(600)
def test_bf16_masters_start_at_the_fp32_weights(tmp_path):
    """DeepSpeed builds its fp32 masters from the bf16-rounded module; raylm overwrites them with the fp32 weights
    the stage was built from."""
    run_on_gloo(_masters_start_at_the_fp32_weights, 2, tmp_path)
