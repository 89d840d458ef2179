"""Model FLOPs utilisation: achieved model FLOP/s against a matmul peak."""

from __future__ import annotations

import time

import torch


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 0, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul on ``device`` with the current thread count.

    This is the ceiling the same process can reach, so MFU against it is
    meaningful on a CPU where no datasheet peak applies. ``size`` 0 picks
    1024 on a CPU and 8192 on a GPU (smaller products leave a GPU idle).
    """
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    _sync(device)
    return 2 * size**3 * runs / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_worker: float, workers: int) -> float:
    return flops_per_token * tokens_per_s / (peak_flops_per_worker * workers)
