"""Peak host memory of building one rank's model, measured in fresh processes (one per layout).

Each rank resets its peak resident set size before the build and reads it after: the growth is what building the model (the meta layout, its shards, their values) cost that rank.
Used by ``test_shard_init`` and ``benchmarks/shard_memory.py``.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from gloo_spawn import run_on_gloo
from peak_rss import peak_since, start_measuring

MIB = 2**20


def _build(rank: int, world_size: int, layouts: Sequence[Sequence[str]], init_from: Optional[str], out: str) -> None:
    from raylm.configs.loader import load_config
    from raylm.models.llama import Llama
    from raylm.models.weights import weight_locations
    from raylm.parallelism.apply import build_parallel_model
    from raylm.parallelism.materialize import fresh_weights, stored_weights
    from raylm.trainer.device import init_distributed

    os.environ["LOCAL_RANK"] = str(rank)  # what DeepSpeed's PipelineModule reads
    results = []
    for overrides in layouts:
        run = load_config("tiny", [*overrides, f"cluster.num_workers={world_size}"])
        init_distributed(run, torch.device("cpu"))
        weights = stored_weights(weight_locations(Path(init_from)), init_from) if init_from else fresh_weights(run.model, run.train.seed)
        with torch.device("meta"):  # holds nothing, but the first meta model imports torch's meta kernels (~80 MiB, once)
            layout = Llama(run.model, run.train.seed)
        before = start_measuring()
        par = build_parallel_model(layout, run, rank, world_size, weights)
        # Read every weight: stored ones may be lazily mapped from their file until something reads them (as
        # moving them to the GPU does), and only then count in the resident set.
        held = sum(p.numel() * p.element_size() for p in par.module.parameters() if p.sum().isfinite()) / MIB
        results.append({"peak_mib": peak_since(before), "weights_mib": held})
        del par, layout, weights
        gc.collect()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@contextmanager
def _freed_memory_leaves():
    """Spawned ranks run with a fixed glibc mmap threshold: every freed large tensor goes back to the system, so
    the resident set follows the live tensors (otherwise freed ones stay in the heap, counted, or get reused
    unseen by a later measurement in the same process)."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # read by the spawned ranks' C library at start
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def build_peaks(world_size: int, layouts: Sequence[Sequence[str]], init_from: Optional[Path] = None) -> List[List[dict]]:
    """Per layout (a list of overrides), per rank: ``peak_mib`` (host memory the build added at its peak) and
    ``weights_mib`` (the weights it holds). Several layouts share the ranks' processes, one after the other,
    under a fixed mmap threshold; a single layout runs with the C library's defaults, as a training rank does."""
    with tempfile.TemporaryDirectory() as out, (_freed_memory_leaves() if len(layouts) > 1 else nullcontext()):
        run_on_gloo(_build, world_size, [list(layout) for layout in layouts], str(init_from) if init_from else None, out,
                    fresh_interpreters=True)
        per_rank = [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(world_size)]
    return [[ranks[index] for ranks in per_rank] for index in range(len(layouts))]


def _step(rank: int, world_size: int, overrides: Sequence[str], bf16: bool, out: str) -> None:
    from raylm.configs.loader import load_config
    from raylm.models.llama import Llama
    from raylm.parallelism.apply import build_parallel_model
    from raylm.parallelism.materialize import fresh_weights
    from raylm.trainer.device import init_distributed

    run = load_config("tiny", [*overrides, f"cluster.num_workers={world_size}"])
    init_distributed(run, torch.device("cpu"))
    with torch.device("meta"):
        layout = Llama(run.model, run.train.seed)
    par = build_parallel_model(layout, run, rank, world_size, fresh_weights(run.model, run.train.seed))
    model = par.module.to(torch.bfloat16 if bf16 else torch.float32)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)  # as after the first step: backward accumulates into them
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, run.model.vocab_size, (run.parallel.micro_batch_size, run.model.max_seq_len + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    par.loss_fn(model(inputs[:, :8]).float(), targets[:, :8]).backward()  # kernels' one-time set-up, outside the measurement
    before = start_measuring()
    par.loss_fn(model(inputs).float(), targets).backward()  # what the training loop runs per micro-batch
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_mib": peak_since(before)}))


def step_peaks(world_size: int, overrides: Sequence[str], bf16: bool = False) -> List[float]:
    """Per tensor rank (world_size = tp, pp = 1): the host memory one micro-batch's forward and backward adds at its peak."""
    with tempfile.TemporaryDirectory() as out, _freed_memory_leaves():
        run_on_gloo(_step, world_size, list(overrides), bf16, out, fresh_interpreters=True)
        return [json.loads(Path(out, f"rank{rank}.json").read_text())["peak_mib"] for rank in range(world_size)]
