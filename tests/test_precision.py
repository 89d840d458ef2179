"""What ``train.precision`` means on a rank: as given, or 'auto' decided by rank 0 for every rank.

The CPU rule is tested with injected matmul rates, never with this machine's: the CPU model changes from one
session to the next (AMX one day, AVX-512 without bf16 the next), and so does what a measurement would say.
"""

from __future__ import annotations

import time

import pytest
import torch

from gloo_spawn import run_on_gloo
from raylm.trainer import precision
from raylm.trainer.precision import (Precision, choose_precision, cpu_prefers_bf16, decide, measure_matmul_rates, probe_sizes,
                                    slow_bf16_warning)

CPU = torch.device("cpu")
WIDTH = 768


def _must_not_measure(device, width):
    raise AssertionError("measured matmul rates where the decision needs none")


@pytest.mark.parametrize("rates, bf16", [
    ((2.0e12, 1.0e12), True),  # exactly twice: bf16
    ((8.0e12, 1.0e12), True),  # AMX-like
    ((1.99e12, 1.0e12), False),  # just short of twice
    ((1.0e12, 1.0e12), False),  # AVX-512 without bf16 units
    ((0.1e12, 1.0e12), False),  # emulated bf16
])
def test_cpu_auto_picks_bf16_where_its_matmul_peak_is_at_least_twice_fp32s(monkeypatch, rates, bf16):
    assert cpu_prefers_bf16(rates) is bf16
    monkeypatch.setattr(precision, "measure_matmul_rates", lambda device, width: rates)
    chosen = decide("auto", CPU, WIDTH)
    assert chosen == Precision(bf16, "measured matmul peaks", rates)
    assert chosen.record() == {"precision": "bf16" if bf16 else "fp32", "precision_basis": "measured matmul peaks",
                               "precision_bf16_matmul_tflops": rates[0] / 1e12, "precision_fp32_matmul_tflops": rates[1] / 1e12}


@pytest.mark.parametrize("device", [CPU, torch.device("cuda", 0)])
def test_explicit_precision_is_used_as_given_without_measuring(monkeypatch, device):
    monkeypatch.setattr(precision, "measure_matmul_rates", _must_not_measure)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        chosen = decide(name, device, WIDTH)
        assert chosen.dtype == dtype and chosen.name == name
        assert chosen.record() == {"precision": name, "precision_basis": "train.precision"}
        # No collective either: this runs without a process group.
        assert choose_precision(name, device, 1, WIDTH) == chosen


@pytest.mark.parametrize("rates, warned", [((0.55e9, 33e9), True), ((0.9e12, 1.0e12), True), ((1.0e12, 1.0e12), False),
                                           ((8.0e12, 1.0e12), False)])
def test_an_explicit_bf16_on_a_cpu_is_measured_on_rank_0_and_named_where_it_is_slower_than_fp32(monkeypatch, rates, warned):
    monkeypatch.setattr(precision, "measure_matmul_rates", lambda device, width: rates)
    chosen = choose_precision("bf16", CPU, 0, WIDTH)
    assert chosen == Precision(True, "train.precision", rates)
    warning = slow_bf16_warning(chosen)
    if warned:
        assert warning.startswith(f"bf16 matmuls at this model's width run at {rates[0] / rates[1]:.2g}x fp32's on this CPU")
        assert warning.endswith("set train.precision=fp32, or auto to let raylm measure and choose")
    else:
        assert warning is None
    # Only rank 0 measures (no collective), and fp32 or a GPU needs no measurement.
    monkeypatch.setattr(precision, "measure_matmul_rates", _must_not_measure)
    assert choose_precision("bf16", CPU, 1, WIDTH) == Precision(True, "train.precision")
    assert choose_precision("fp32", CPU, 0, WIDTH) == Precision(False, "train.precision")
    assert choose_precision("bf16", torch.device("cuda", 0), 0, WIDTH) == Precision(True, "train.precision")
    assert slow_bf16_warning(Precision(True, "train.precision")) is None


@pytest.mark.parametrize("capability, auto_is_bf16", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_auto_on_a_gpu_needs_native_bf16(monkeypatch, capability, auto_is_bf16):
    """V100 (7.0) and T4 (7.5) report bf16 support through emulation; only Ampere (8.0) and newer compute in it."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(precision, "measure_matmul_rates", _must_not_measure)
    gpu = torch.device("cuda", 3)
    chosen = decide("auto", gpu, WIDTH)
    assert chosen.bf16 is auto_is_bf16 and chosen.basis == "gpu capability {}.{}".format(*capability)
    assert asked == [gpu]  # the rank's own GPU, not device 0


@pytest.mark.parametrize("width, sizes", [(64, (64,)), (128, (128,)), (256, (256,)), (768, (256, 512, 768)), (4096, (256, 512, 1024))])
def test_the_probe_runs_the_model_s_width_and_the_sizes_below(width, sizes):
    assert probe_sizes(width) == sizes


def test_the_measurement_is_short():
    """Every 'auto' stage on a CPU pays it on rank 0 (the other ranks wait): two dtypes at the largest sizes within
    a few tenths of a second, whatever the CPU (2 s leaves room for a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))  # a worker's share of a small machine
    try:
        began = time.perf_counter()
        bf16, fp32 = measure_matmul_rates(CPU, 4096)
        assert time.perf_counter() - began < 2.0
    finally:
        torch.set_num_threads(threads)
    assert bf16 > 0 and fp32 > 0


# (bf16, fp32) rates each rank would measure: on either side of the threshold, rank 1 opposite to rank 0.
DISAGREEING = {"bf16": [(3.0e12, 1.0e12), (1.5e12, 1.0e12)], "fp32": [(1.5e12, 1.0e12), (3.0e12, 1.0e12)]}


def _follow_rank_0(rank: int, world_size: int) -> None:
    for expected, rates in DISAGREEING.items():
        measured = []
        precision.measure_matmul_rates = lambda device, width: measured.append((device, width)) or rates[rank]
        chosen = choose_precision("auto", CPU, rank, WIDTH)
        assert chosen == Precision(expected == "bf16", "measured matmul peaks", rates[0]), (rank, chosen)
        assert measured == ([(CPU, WIDTH)] if rank == 0 else []), rank  # only rank 0 measures


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_rank_takes_rank_0s_decision():
    run_on_gloo(_follow_rank_0, 2)
