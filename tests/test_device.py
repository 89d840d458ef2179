"""Which device, precision and random state a rank uses."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from raylm.launcher.device import rng_state, set_rng_state, torchrun_device, use_bf16


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


@pytest.mark.parametrize("capability, auto_is_bf16", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_auto_precision_needs_native_bf16(monkeypatch, capability, auto_is_bf16):
    """V100 (7.0) and T4 (7.5) report bf16 support through emulation; only Ampere (8.0) and newer compute in it."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    gpu = torch.device("cuda", 3)
    assert use_bf16("auto", gpu) is auto_is_bf16
    assert asked == [gpu]  # the rank's own GPU, not device 0
    assert use_bf16("bf16", gpu) and not use_bf16("fp32", gpu)
    assert not use_bf16("auto", torch.device("cpu")) and use_bf16("bf16", torch.device("cpu"))


def test_torchrun_device_is_the_cpu_without_gpus(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torchrun_device("auto") == torch.device("cuda", 1)
    assert torchrun_device("false") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torchrun_device("true") == torch.device("cpu")
