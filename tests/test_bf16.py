"""bf16 keeps fp32 master weights: a stage starts them at its unrounded weights and hands them on unrounded.

DeepSpeed runs bf16 ZeRO-0 as ZeRO-1 (``raylm.parallelism.zero.deepspeed_zero_stage``); before, its
ZeRO-0 bf16 optimizer kept fp32 masters out of the layout-free checkpoint's reach (KeyError 'exp_avg').
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import CHECKPOINT_AT_3, TINY_PRETRAIN, forget_after, losses, read_metrics
from gloo_spawn import resume_on_rank, run_on_gloo, train_runs
from raylm.configs.loader import load_config, resolve_stage
from raylm.trainer import run_dir as rundir
from raylm.trainer.session import LocalSession
from raylm.trainer.worker import StageTrainer, build_dense_model
from raylm.parallelism.masters import consolidated_state_dict
from raylm.parallelism.layout_free import layout_free_locations
from raylm.models.weights import read_part

pytestmark = pytest.mark.slow

BF16_ZERO0 = [*CHECKPOINT_AT_3, "train.precision=bf16", "cluster.num_workers=2", "parallel.zero_stage=0"]


def _final(run_dir):
    return load_file(str(run_dir / "pretrain" / "final" / "model.safetensors"))


def _layout_free_params(step_dir):
    return {name: read_part(location, None, 0, 1) for name, location in layout_free_locations(step_dir / "layout_free").items()}


@pytest.mark.timeout(600)
def test_bf16_zero0_checkpoints_resumes_and_hands_on_fp32_masters(tmp_path):
    run_on_gloo(train_runs, 2, tmp_path, {"bf16": BF16_ZERO0})
    run_dir = tmp_path / "bf16"
    final = _final(run_dir)
    masters = _layout_free_params(run_dir / "pretrain" / "step_0000005")
    assert final.keys() == masters.keys()
    for name, weight in final.items():
        # The final weights are the fp32 masters of the last step, not the bf16 module's rounding of them.
        assert weight.dtype == torch.float32 and torch.equal(weight, masters[name]), name
        if weight.dim() == 2:
            assert (weight != weight.bfloat16().float()).float().mean() > 0.9, name

    # ZeRO-1 under bf16 is the very optimizer ZeRO-0 runs as (DeepSpeed's BF16_Optimizer), so a resume on it,
    # through the layout-free copy since the layout differs, must repeat the uninterrupted run bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    forget_after(resumed, 3)
    run_on_gloo(resume_on_rank, 2, resumed, ["parallel.zero_stage=1"])
    assert [r["step"] for r in read_metrics(resumed, kind="event") if r.get("event") == "resharded"] == [3]
    assert losses(resumed) == losses(run_dir)
    again = _final(resumed)
    for name, weight in final.items():
        assert torch.equal(again[name], weight), name


def _masters_start_at_the_fp32_weights(rank: int, world_size: int, tmp: Path) -> None:
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
    the stage was built from (ZeRO-2 and ZeRO-3 here; BF16_Optimizer by the bitwise resume above)."""
    run_on_gloo(_masters_start_at_the_fp32_weights, 2, tmp_path)
