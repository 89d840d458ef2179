"""What each Ray Train worker runs: log to a file, then the per-rank loop."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

from raylm.configs.loader import from_yaml_file, resolve_stage
from raylm.configs.schema import RunConfig
from raylm.launcher import run_dir as rundir
from raylm.launcher.layout import CONFIG_FILE, LOGS_DIR
from raylm.launcher.ray_session import RaySession
from raylm.parallelism.zero import usable_world_size


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _keep_ranks_below(active: int, cfg: RunConfig) -> bool:
    """Replace Ray's process group by one over ranks [0, active); True on those ranks.

    An elastic restart may start a worker count that no whole number of
    tp x pp replicas splitting the global batch fills (7 workers with tp=2,
    say); DeepSpeed needs the default group to be exactly the training ranks.
    """
    import ray
    import torch.distributed as dist

    rank, backend = dist.get_rank(), dist.get_backend()
    rendezvous: list = [(ray.util.get_node_ip_address(), _free_port()) if rank == 0 else None]
    dist.broadcast_object_list(rendezvous, src=0)
    dist.destroy_process_group()
    if rank >= active:
        return False
    host, port = rendezvous[0]
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=active,
                            timeout=timedelta(seconds=cfg.fault.hang_timeout_s))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(active))
    return True


def _wait_out_the_stage(run_dir: Path, stage: str) -> None:
    """A rank without work still joins every ``ray.train.report`` (a barrier) until the stage is finished."""
    import ray.train

    while not rundir.stage_finished(run_dir, stage):
        ray.train.report({}, checkpoint=None)


def train_loop_per_worker(config: dict) -> None:
    import ray.train.torch
    import torch.distributed as dist

    from raylm.launcher.worker import train_stage

    run_dir, stage = Path(config["run_dir"]), config["stage_name"]
    _log_to_file(run_dir / stage)
    cfg = resolve_stage(from_yaml_file(run_dir / CONFIG_FILE), config["stage_index"])
    workers = dist.get_world_size()
    active = usable_world_size(cfg, workers)
    if active == 0:
        raise RuntimeError(f"{workers} workers hold no whole tp={cfg.parallel.tp} x pp={cfg.parallel.pp} replica")
    if active < workers:
        print(f"[raylm] {workers} workers started; {active} train (whole tp x pp replicas that split the global batch)", flush=True)
        if not _keep_ranks_below(active, cfg):
            print("[raylm] this rank has no work in this layout; it waits for the stage to finish", flush=True)
            _wait_out_the_stage(run_dir, stage)
            return
    _check_placement(cfg.parallel.tp, cfg.parallel.pp)
    # The GPU Ray assigned this worker (LOCAL_RANK need not be its index), or the CPU.
    device = ray.train.torch.get_device()
    train_stage(run_dir, config["stage_index"], lambda stage_dir, stage_cfg: RaySession(stage_dir, stage_cfg.train.keep_last), device)
