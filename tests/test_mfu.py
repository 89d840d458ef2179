"""The matmul peak MFU divides by: best of several sizes, bounded in time, and MFU below 1 in a real run."""

from __future__ import annotations

import json
import time

import pytest
import torch

from raylm.trainer.mfu import configured_peak, matmul_rate, measured_peak, mfu

CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """Per-core rates, whatever the machine's core count (what a 1-CPU worker measures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measured_peak_is_the_best_size_it_tried(one_thread):
    peak = measured_peak(CPU, torch.float32, sizes=(256, 64, 128), budget_s=0.6)
    assert peak.source == "measured"
    assert 64 in peak.rates and set(peak.rates) <= {64, 128, 256}  # the smallest always runs
    assert all(peak.flops >= rate > 0 for rate in peak.rates.values())
    assert peak.matmul_size in peak.rates and peak.rates[peak.matmul_size] == peak.flops
    summary = peak.summary()
    assert summary["peak_tflops_per_worker"] == peak.flops / 1e12 and summary["peak_matmul_size"] == peak.matmul_size
    assert summary["peak_tflops_by_matmul_size"] == {str(n): r / 1e12 for n, r in peak.rates.items()}


def test_sizes_that_would_overrun_the_budget_are_skipped(one_thread):
    """A 4096^3 fp32 product takes over half a second on any one core: with 0.2 s it never starts."""
    began = time.perf_counter()
    peak = measured_peak(CPU, torch.float32, sizes=(128, 4096), budget_s=0.2)
    assert list(peak.rates) == [128]
    assert time.perf_counter() - began < 2.0  # the 0.2 s budget, with room for a loaded machine


def test_measuring_leaves_the_global_generators_alone(one_thread):
    """How many sizes fit the budget depends on the machine: draws from the global generator would make the
    training after it, and the RNG state its checkpoints hold, depend on the machine's speed."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    matmul_rate(CPU, torch.float32, 32)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_process_measures_once_per_thread_count(one_thread):
    """A worker group's later stages reuse the first one's peak; another thread count is another ceiling."""
    first = measured_peak(CPU, torch.float32, sizes=(48,), budget_s=0.05)
    assert measured_peak(CPU, torch.float32, sizes=(48,), budget_s=0.05) is first
    torch.set_num_threads(2)
    assert measured_peak(CPU, torch.float32, sizes=(48,), budget_s=0.05) is not first


def test_a_configured_peak_is_used_as_given():
    peak = configured_peak(312.0)
    assert peak.flops == 312e12 and peak.source == "logging.mfu_peak_tflops"
    assert peak.summary()["peak_matmul_size"] is None
    # MFU is model FLOP/s over the summed peak of the workers: 6e8 FLOP/token x 1e5 tokens/s on 2 x 312 TFLOP/s.
    assert mfu(6e8, 1e5, peak.flops, 2) == pytest.approx(6e13 / 624e12)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_real_run_reports_mfu_below_one_against_its_measured_peak(single_worker):
    (stage,) = json.loads((single_worker / "summary.json").read_text())["stages"]
    assert stage["peak_source"] == "measured"
    assert str(stage["peak_matmul_size"]) in stage["peak_tflops_by_matmul_size"]
    assert stage["peak_tflops_per_worker"] == max(stage["peak_tflops_by_matmul_size"].values())
    assert 0 < stage["mfu"] < 1
