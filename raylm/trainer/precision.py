"""Whether a stage computes in bf16: ``train.precision`` as given, or the choice 'auto' makes once for every rank.

'auto' picks bf16 where it is faster: on GPUs with native bf16 (by compute capability) and on CPUs whose
bf16 matmuls, measured here with the rank's threads at the model's width, run at least ``BF16_MIN_SPEEDUP``
times fp32's. Rank 0 alone decides and broadcasts the decision: ranks measuring for themselves could land on
both sides of the threshold, and DeepSpeed hangs or fails when ranks build their engines in different precisions.

An explicit ``bf16`` on a CPU is measured too, on rank 0 alone: a CPU without bf16 units (AVX2 only) emulates its
matmuls at a small fraction of fp32's rate (0.55 against 33 GFLOP/s at 256^3 on one AVX2 core), and the stage
would run several times slower than in fp32 without a word; it is told (``slow_bf16_warning``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from raylm.trainer.mfu import measured_peak

NATIVE_BF16_CAPABILITY = (8, 0)
"""Ampere and newer compute in bf16; V100 and T4 only emulate it (``torch.cuda.is_bf16_supported()`` says yes)."""

BF16_MIN_SPEEDUP = 2.0
"""bf16 training adds work that matmuls do not speed up (casts of weights and activations, fp32 norms, softmax
and optimizer), so a CPU needs a clear matmul gain before bf16 pays: issue 12 sets it at twice fp32's peak."""

PROBE_SIZES = (256, 512, 1024)
"""Square matmuls timed per dtype for 'auto' on a CPU, those below the model's width and the width itself (at
most the last). bf16 units gain little on narrow products (a 128-wide one ran at 0.6x fp32 on two AMX cores,
a 1024-wide one at 3.4x), so the sizes follow the matmuls the stage will run: a model as narrow as the
``tiny`` preset's stays in fp32 on a CPU where a wide one goes bf16. Both dtypes take about a tenth of a
second on two cores; on a CPU without native bf16 the larger sizes overrun ``PROBE_BUDGET_S`` and are
skipped, which only confirms fp32."""

PROBE_BUDGET_S = 0.25
"""Seconds per dtype (``measured_peak``'s budget): the smallest size always runs."""

MatmulRates = Tuple[float, float]
"""(bf16, fp32) matmul FLOP/s."""


@dataclass(frozen=True)
class Precision:
    """What a stage computes in, and why."""

    bf16: bool
    basis: str
    """'train.precision' (set explicitly), 'gpu capability X.Y' or 'measured matmul peaks' (both 'auto')."""
    rates: Optional[MatmulRates] = None
    """(bf16, fp32) matmul FLOP/s rank 0 measured, when 'auto' (or an explicit bf16 on a CPU) measured them."""

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def record(self) -> Dict[str, object]:
        """Flat keys for the stage's start record and summary."""
        record: Dict[str, object] = {"precision": self.name, "precision_basis": self.basis}
        if self.rates is not None:
            record["precision_bf16_matmul_tflops"], record["precision_fp32_matmul_tflops"] = (rate / 1e12 for rate in self.rates)
        return record


def cpu_prefers_bf16(rates: MatmulRates) -> bool:
    """The rule 'auto' applies on a CPU: bf16 when its matmul peak is at least ``BF16_MIN_SPEEDUP`` x fp32's."""
    bf16_rate, fp32_rate = rates
    return bf16_rate >= BF16_MIN_SPEEDUP * fp32_rate


def probe_sizes(width: int) -> Tuple[int, ...]:
    """The ``PROBE_SIZES`` below ``width`` (the model's d_model) and ``width`` itself, at most the largest."""
    return tuple(sorted({size for size in PROBE_SIZES if size < width} | {min(width, PROBE_SIZES[-1])}))


def measure_matmul_rates(device: torch.device, width: int) -> MatmulRates:
    """(bf16, fp32) peak FLOP/s of square matmuls up to ``width`` on ``device`` with this process's threads."""
    sizes = probe_sizes(width)
    bf16, fp32 = (measured_peak(device, dtype, sizes, PROBE_BUDGET_S).flops for dtype in (torch.bfloat16, torch.float32))
    return bf16, fp32


def decide(precision: str, device: torch.device, width: int) -> Precision:
    """This process's reading of ``train.precision`` on ``device`` for a model ``width`` wide (its d_model; under 'auto'
    only rank 0's reading counts: ``choose_precision``)."""
    if precision != "auto":
        return Precision(precision == "bf16", "train.precision")
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        return Precision(capability >= NATIVE_BF16_CAPABILITY, "gpu capability {}.{}".format(*capability))
    rates = measure_matmul_rates(device, width)
    return Precision(cpu_prefers_bf16(rates), "measured matmul peaks", rates)


def choose_precision(precision: str, device: torch.device, rank: int, width: int) -> Precision:
    """Every rank's precision for a stage training a model ``width`` wide; under 'auto' rank 0's decision, broadcast
    over the default group (a collective: every rank calls it, before building its engine). An explicit bf16 on a
    CPU is taken as given, rank 0 measuring the rates for ``slow_bf16_warning`` (no collective)."""
    if precision != "auto":
        given = decide(precision, device, width)
        if given.bf16 and device.type == "cpu" and rank == 0:
            return replace(given, rates=measure_matmul_rates(device, width))
        return given
    chosen = [decide(precision, device, width) if rank == 0 else None]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def slow_bf16_warning(chosen: Precision) -> Optional[str]:
    """What to tell a user whose bf16 stage runs its matmuls slower than fp32 would, or None."""
    if not chosen.bf16 or chosen.rates is None or chosen.rates[0] >= chosen.rates[1]:
        return None
    bf16_rate, fp32_rate = chosen.rates
    # Without bf16 units (AVX2 alone) torch emulates them, at a few percent of fp32's rate; with them, products as
    # narrow as a tiny model's can still lose to fp32.
    return (f"bf16 matmuls at this model's width run at {bf16_rate / fp32_rate:.2g}x fp32's on this CPU "
            f"({bf16_rate / 1e12:.3g} against {fp32_rate / 1e12:.3g} TFLOP/s measured), so this stage trains slower than "
            "it would in fp32; set train.precision=fp32, or auto to let raylm measure and choose")
