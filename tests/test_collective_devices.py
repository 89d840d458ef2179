"""Every collective of a tp2 x pp2 stage gets tensors on the rank's device: training, evaluation,
the layout-free checkpoint and the consolidation of the final weights (4 gloo processes, bf16).

The rank's device is the CPU here; what is not on it are the other pipeline
stages' weights, released to ``meta``: gathering them, as the final
consolidation once did, fails the check (on NCCL it failed for CPU tensors).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from collective_devices import OffDeviceTensor, tensors_on
from conftest import TINY_PRETRAIN
from gloo_spawn import run_on_gloo
from raylm.configs.loader import load_config
from raylm.trainer import run_dir as rundir
from raylm.trainer.session import LocalSession
from raylm.trainer.worker import train_stage

CPU = torch.device("cpu")


def test_the_check_refuses_a_tensor_off_the_device():
    original = dist.all_reduce
    with tensors_on(CPU), pytest.raises(OffDeviceTensor, match="all_reduce .* on meta"):
        dist.all_reduce(torch.zeros(2, device="meta"))  # checked before it reaches a process group
    assert dist.all_reduce is original


def _train_checking_devices(rank: int, world_size: int, run_dir: Path) -> None:
    with tensors_on(CPU):
        train_stage(run_dir, 0, lambda stage_dir, cfg: LocalSession(stage_dir, cfg.train.keep_last), CPU)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tp2_pp2_bf16_collectives_stay_on_the_device(tmp_path):
    run = load_config("tiny", [
        *TINY_PRETRAIN, f"runs_dir={tmp_path}", "cluster.num_workers=4", "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1",
        "train.precision=bf16", "train.max_steps=2", "train.ckpt_every=2", "train.eval_every=2",
    ])
    run_dir = tmp_path / "devices"
    run.name = run_dir.name
    run_dir.mkdir()
    rundir.save_config(run_dir, run)
    run_on_gloo(_train_checking_devices, 4, run_dir)

    # The final weights are the fp32 masters, the very values the last checkpoint's layout-free copy holds.
    final = load_file(str(run_dir / "pretrain" / "final" / "model.safetensors"))
    masters = {}
    for stage_file in sorted((run_dir / "pretrain" / "step_0000002" / "layout_free").glob("stage_*.safetensors")):
        masters.update({k.split("/", 1)[1]: v for k, v in load_file(str(stage_file)).items() if k.startswith("param/")})
    assert final.keys() == masters.keys()
    for name, weight in final.items():
        assert weight.dtype == torch.float32 and torch.equal(weight, masters[name]), name
