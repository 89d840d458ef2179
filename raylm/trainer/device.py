"""Where a rank computes: its device, the process group on it, its fp32 matmul setting and random state.

The launcher picks the device (Ray Train's ``get_device()`` under Ray, the GPU
at LOCAL_RANK under torchrun) and passes it in; no Ray import here.
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass
from typing import Callable, List

import numpy as np
import torch
import torch.distributed as dist

from raylm.configs.schema import RunConfig


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    """Where this rank's model, data and every collective's tensors live."""


def torchrun_device(use_gpu: str) -> torch.device:
    """Under torchrun: the GPU at LOCAL_RANK, unless there is none or ``cluster.use_gpu`` is 'false'."""
    if torch.cuda.is_available() and use_gpu != "false":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(run: RunConfig, device: torch.device) -> DistContext:
    """Bind this process to ``device``, then join (under torchrun: create) the default process group; idempotent."""
    if device.type == "cuda":
        # Before the first collective: NCCL's communicators and object
        # collectives use the current device.
        torch.cuda.set_device(device)
        # DeepSpeed's engine and PipelineModule take LOCAL_RANK as the index of their GPU.
        os.environ["LOCAL_RANK"] = str(device.index)
    else:
        # Ray does not cap threads the way torchrun does; without this each
        # worker would spin one thread per core of the node.
        torch.set_num_threads(run.cluster.cpus_per_worker)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=run.fault.collective_timeout(),
            device_id=device if device.type == "cuda" else None,
        )
    _skip_deepspeed_start_up_work()
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend())
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def leave_distributed() -> None:
    """Destroy the default process group and every group made from it, with DeepSpeed's references to them (its
    ``groups`` module keeps the first engine's data-parallel group, which a later engine would otherwise use);
    a launcher running another stage in this process then joins a new one."""
    import gc

    gc.collect()  # the finished stage's engine, which holds the groups, goes first
    if not dist.is_initialized():
        return
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()


def _skip_deepspeed_start_up_work() -> None:
    """Two things DeepSpeed does at start-up for features raylm's training never uses:

    - its CPU backend JIT-compiles a shared-memory all-reduce (minutes on a small machine) that only
      its inference path uses; training collectives go through our gloo group either way;
    - its ZeRO and bf16 optimizers import its Muon module to check the optimizer's type, and that
      module wraps three functions in ``torch.compile`` at import, which imports torch's inductor:
      2-3 s per rank and stage (measured on 2 cores). raylm hands DeepSpeed torch's AdamW, so those
      functions are compiled on their first call instead, if anything ever calls them.
    """
    import deepspeed.ops
    from deepspeed.runtime import compiler

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    compiler.compile = lambda: _compile_on_first_call


def _compile_on_first_call(fn: Callable) -> Callable:
    compiled: List[Callable] = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not compiled:
            compiled.append(torch.compile(fn))
        return compiled[0](*args, **kwargs)

    return call


def allow_tf32(device: torch.device) -> None:
    """fp32 matmuls on a GPU run in TF32 (fp32 range and accumulation, 10-bit mantissa inputs), as Megatron does.

    On Ampere and newer that is ~8x the fp32 throughput; older GPUs ignore it.
    Weights, gradients and optimizer state stay fp32.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def rng_state(device: torch.device) -> dict:
    """Every generator this rank draws from; on a GPU only its own device's (other GPUs may not exist on resume)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore ``rng_state``; a GPU state is skipped on a CPU rank."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
