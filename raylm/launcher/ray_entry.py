"""What each Ray Train worker runs: log to a file, then the per-rank loop."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from raylm.launcher.layout import LOGS_DIR
from raylm.launcher.ray_session import RaySession


def _log_to_file(stage_dir: Path) -> None:
    """Send this rank's stdout/stderr (DeepSpeed's and ours) to runs/<name>/<stage>/logs/."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    logs = stage_dir / LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    handle = open(logs / f"rank_{rank:03d}.log", "a", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    node = ray.get_runtime_context().get_node_id()
    print(f"[raylm] rank {rank} pid {os.getpid()} node {node}", flush=True)


def _check_placement(tp: int, pp: int) -> None:
    """Every rank learns every rank's node; a TP group across nodes stops the stage."""
    import ray
    import torch.distributed as dist

    from raylm.cluster.placement import check_tp_placement
    from raylm.parallelism.topology import Topology

    node_of_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(node_of_rank, ray.get_runtime_context().get_node_id())
    check_tp_placement(node_of_rank, Topology.for_world(tp, pp, dist.get_world_size()).all_tp_groups())


def train_loop_per_worker(config: dict) -> None:
    from raylm.launcher.worker import train_stage

    run_dir = Path(config["run_dir"])
    _log_to_file(run_dir / config["stage_name"])
    _check_placement(config["tp"], config["pp"])
    train_stage(run_dir, config["stage_index"], lambda stage_dir, _cfg: RaySession(stage_dir))
