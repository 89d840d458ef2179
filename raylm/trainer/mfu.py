"""Model FLOPs utilisation: achieved model FLOP/s against a matmul peak."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

# Square products tried, smallest first. One size alone can run below what
# the cores or the GPU can do (a 1024^3 fp32 product on some CPUs, leaving
# the peak too low and every MFU too high), so the peak is the best of
# several; the larger ones run only while they fit the time budget.
CPU_SIZES = (1024, 2048, 4096)
GPU_SIZES = (4096, 8192, 16384)
# Each size runs one warm-up product (thread pools, kernel selection; it
# also sets the round length), then ROUNDS timed rounds of back-to-back
# products lasting at least ROUND_S each, so a GPU's launch and
# synchronisation overhead stays small next to the work.
ROUNDS = 3
ROUND_S = 0.02


@dataclass(frozen=True)
class Peak:
    """The FLOP/s per worker MFU divides by, and where it came from."""

    flops: float
    source: str  # "measured" or "logging.mfu_peak_tflops"
    rates: Dict[int, float] = field(default_factory=dict)  # measured: FLOP/s of each matmul size tried

    @property
    def matmul_size(self) -> Optional[int]:
        """n of the n x n @ n x n product that gave a measured peak."""
        return max(self.rates, key=self.rates.get) if self.rates else None

    def summary(self) -> dict:
        return {
            "peak_tflops_per_worker": self.flops / 1e12, "peak_source": self.source, "peak_matmul_size": self.matmul_size,
            "peak_tflops_by_matmul_size": {str(n): rate / 1e12 for n, rate in self.rates.items()},
        }


def configured_peak(peak_tflops: float) -> Peak:
    return Peak(peak_tflops * 1e12, "logging.mfu_peak_tflops")


def measured_peak(device: torch.device, dtype: torch.dtype, sizes: Optional[Sequence[int]] = None, budget_s: float = 1.5) -> Peak:
    """The best square matmul on ``device`` with the current thread count, over ``sizes``.

    This is the ceiling the same process can reach, so MFU against it is
    meaningful on a CPU where no datasheet peak applies. Every rank runs this
    at stage start, so it is bounded: the smallest size always runs, a larger
    one only if its products, timed at the best rate so far (larger products
    are rarely slower per FLOP), fit what is left of ``budget_s``. A process
    measures each (device, dtype, thread count, sizes) once: the later stages
    of a worker group reuse what the first measured.
    """
    chosen = tuple(sorted(sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)))
    return _measured_once(device, dtype, chosen, budget_s, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _measured_once(device: torch.device, dtype: torch.dtype, sizes: Tuple[int, ...], budget_s: float, threads: int) -> Peak:
    deadline = time.perf_counter() + budget_s
    rates: Dict[int, float] = {}
    for size in sizes:
        if rates and (1 + ROUNDS) * 2 * size**3 / max(rates.values()) > deadline - time.perf_counter():
            break  # it would overrun the budget; larger sizes more so
        rates[size] = matmul_rate(device, dtype, size)
    return Peak(max(rates.values()), "measured", rates)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of the fastest of ROUNDS rounds of (size, size) @ (size, size) products.

    The fastest round, not the mean: on shared cores other processes only
    ever slow a round down, and the peak is what the hardware can do.
    """
    # Its own generator: how many sizes fit the budget depends on the machine's speed, and draws from the global one
    # would make the training that follows (and its checkpoints' RNG state) depend on it too.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    per_round = max(1, math.ceil(ROUND_S / _timed_products(a, b, 1)))
    best = min(_timed_products(a, b, per_round) / per_round for _ in range(ROUNDS))
    return 2 * size**3 / best


def _timed_products(a: torch.Tensor, b: torch.Tensor, count: int) -> float:
    _sync(a.device)
    start = time.perf_counter()
    for _ in range(count):
        a @ b
    _sync(a.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_worker: float, workers: int) -> float:
    return flops_per_token * tokens_per_s / (peak_flops_per_worker * workers)
