"""Which device and random state a rank uses, and the DeepSpeed settings bf16 brings."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from gloo_spawn import run_on_gloo
from raylm.configs.loader import load_config
from raylm.trainer.device import rng_state, set_rng_state, torchrun_device
from raylm.parallelism.memory import estimate
from raylm.parallelism.zero import deepspeed_config


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_on_cpu_has_no_gpu_state():
    state = rng_state(torch.device("cpu"))
    assert "cuda" not in state
    expected = _draws()
    _draws()
    set_rng_state(state, torch.device("cpu"))
    assert _draws() == expected


def test_a_gpu_rank_state_resumes_on_a_cpu_rank():
    """A checkpoint from a GPU rank holds that device's generator state only; a CPU rank skips it."""
    state = {**rng_state(torch.device("cpu")), "cuda": torch.zeros(16, dtype=torch.uint8)}
    expected = _draws()
    set_rng_state(state, torch.device("cpu"))
    assert _draws() == expected


def test_torchrun_device_is_the_cpu_without_gpus(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torchrun_device("auto") == torch.device("cuda", 1)
    assert torchrun_device("false") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torchrun_device("true") == torch.device("cpu")


@pytest.mark.parametrize("zero_stage, runs_as", [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_bf16_accumulates_and_reduces_gradients_in_fp32(zero_stage, runs_as):
    run = load_config("tiny", [f"parallel.zero_stage={zero_stage}"])
    config = deepspeed_config(run, dp_size=2, bf16=True)
    assert config["bf16"] == {"enabled": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"} and config["communication_data_type"] == "fp32"
    assert config["zero_optimization"]["stage"] == runs_as
    fp32 = deepspeed_config(run, dp_size=2, bf16=False)
    assert fp32["zero_optimization"]["stage"] == zero_stage and "data_types" not in fp32 and "communication_data_type" not in fp32


def test_bf16_zero0_is_planned_as_the_zero1_it_runs_as():
    zero0, zero1 = (load_config("1.3b", ["cluster.num_workers=8", f"parallel.zero_stage={s}"]) for s in (0, 1))
    assert estimate(zero0, bf16=True).optimizer_gib == estimate(zero1, bf16=True).optimizer_gib
    assert estimate(zero0, bf16=False).optimizer_gib == 8 * estimate(zero1, bf16=False).optimizer_gib


BF16_OPTIMIZERS = {0: "BF16_Optimizer", 1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


def _build_bf16_engines(rank: int, world_size: int) -> None:
    import deepspeed

    from raylm.trainer.device import _skip_deepspeed_start_up_work

    _skip_deepspeed_start_up_work()
    deepspeed.init_distributed(dist_backend="gloo")
    for zero_stage, optimizer in BF16_OPTIMIZERS.items():
        run = load_config("tiny", [f"parallel.zero_stage={zero_stage}", "cluster.num_workers=1", "train.global_batch_size=4"])
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters()), config=deepspeed_config(run, dp_size=1, bf16=True))
        assert type(engine.optimizer).__name__ == optimizer, zero_stage
        assert engine.get_data_types() == (torch.bfloat16, torch.float32), zero_stage
        assert engine.communication_data_type == torch.float32, zero_stage
        for _ in range(engine.gradient_accumulation_steps()):  # one optimizer step
            engine.backward(engine(torch.randn(4, 8, dtype=torch.bfloat16)).float().square().mean())
            engine.step()
        assert engine.global_steps == 1, zero_stage
    # Every ZeRO/bf16 optimizer imported DeepSpeed's Muon module; its torch.compile wrappers waited for a first call.
    assert "deepspeed.runtime.zero.muon.original_muon" in sys.modules
    assert "torch._inductor.compile_fx" not in sys.modules


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deepspeed_takes_the_bf16_config():
    """DeepSpeed itself builds and steps every ZeRO stage from it (its ZeRO-0 refuses fp32 accumulation under bf16),
    without importing torch's inductor for its Muon optimizer (seconds of every rank's start-up)."""
    run_on_gloo(_build_bf16_engines, 1)
