"""Peak host memory of building one rank's model, measured in fresh processes (one per layout).

Each rank reads its resident set size before the build and its peak (``ru_maxrss``) after it: the
difference is what building the model (the meta layout, its shards, their values) cost that rank.
Used by ``test_shard_init`` and ``benchmarks/shard_memory.py``.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from gloo_spawn import run_on_gloo

MIB = 2**20


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _build(rank: int, world_size: int, overrides: Sequence[str], init_from: Optional[str], out: str) -> None:
    from raylm.configs.loader import load_config
    from raylm.models.llama import Llama
    from raylm.models.weights import weight_locations
    from raylm.parallelism.apply import build_parallel_model
    from raylm.parallelism.materialize import fresh_weights, stored_weights
    from raylm.trainer.device import init_distributed

    os.environ["LOCAL_RANK"] = str(rank)  # what DeepSpeed's PipelineModule reads
    run = load_config("tiny", [*overrides, f"cluster.num_workers={world_size}"])
    init_distributed(run, torch.device("cpu"))
    weights = stored_weights(weight_locations(Path(init_from)), init_from) if init_from else fresh_weights(run.model, run.train.seed)
    before = _resident_mib()
    with torch.device("meta"):
        layout = Llama(run.model, run.train.seed)
    par = build_parallel_model(layout, run, rank, world_size, weights)
    held = sum(p.numel() * p.element_size() for p in par.module.parameters()) / MIB
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_mib": _peak_mib() - before, "weights_mib": held}))


def build_peaks(world_size: int, overrides: Sequence[str], init_from: Optional[Path] = None) -> List[dict]:
    """Per rank: ``peak_mib`` (host memory the build added at its peak) and ``weights_mib`` (the weights it holds)."""
    with tempfile.TemporaryDirectory() as out:
        run_on_gloo(_build, world_size, list(overrides), str(init_from) if init_from else None, out)
        return [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(world_size)]
