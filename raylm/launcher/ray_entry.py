"""What each Ray Train worker runs: log to a file, then the per-rank loop."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import List

from raylm import storage
from raylm.configs.loader import from_yaml_file, resolve_stage
from raylm.configs.schema import RunConfig
from raylm.trainer import run_dir as rundir
from raylm.trainer.layout import CONFIG_FILE
from raylm.trainer.device import leave_distributed
from raylm.trainer.phases import Phases
from raylm.trainer.run_inputs import fetch_inputs
from raylm.launcher.rank_logs import LogShipper, log_rel, redirect_output
from raylm.launcher.ray_session import RaySession
from raylm.parallelism.zero import usable_world_size


def _check_placement(tp: int, pp: int) -> None:
    """Every rank learns every rank's node; a TP group across nodes stops the stage."""
    import ray
    import torch.distributed as dist

    from raylm.cluster.placement import check_tp_placement
    from raylm.parallelism.topology import Topology

    node_of_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(node_of_rank, ray.get_runtime_context().get_node_id())
    check_tp_placement(node_of_rank, Topology.for_world(tp, pp, dist.get_world_size()).all_tp_groups())


def _pin_collectives_to(node_ip: str) -> None:
    """On a cluster that lives on loopback (the embedded one) keep gloo's and NCCL's sockets there too.

    Both pick an interface of their own: gloo the address the hostname
    resolves to (often the machine's routable one), NCCL one that is not
    loopback. Both take an interface name; one set by the user wins.
    """
    import psutil

    if not ipaddress.ip_address(node_ip).is_loopback:
        return
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == node_ip for a in addresses):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
            return


def _join_process_group(backend: str, cfg: RunConfig, rank: int, active: int, device) -> bool:
    """Create the default process group over ranks [0, ``active``); True on those ranks.

    raylm, not Ray Train, creates it: torch's own rendezvous makes rank 0's
    TCPStore listen on every interface, while here rank 0 opens the store's
    socket on its node's address only (127.0.0.1 on the embedded cluster) and
    hands it to the store. ``active`` is below the worker count after an elastic
    restart that started a worker count no whole number of tp x pp replicas
    splitting the global batch fills (7 workers with tp=2, say): DeepSpeed
    needs the default group to be exactly the training ranks.
    """
    import ray
    import torch.distributed as dist
    from ray.train.collective import broadcast_from_rank_zero

    node_ip = ray.util.get_node_ip_address()
    listener = socket.create_server((node_ip, 0), family=socket.AF_INET6 if ":" in node_ip else socket.AF_INET) if rank == 0 else None
    host, port = broadcast_from_rank_zero((node_ip, listener.getsockname()[1]) if listener else None)  # a barrier of every worker
    if rank >= active:
        return False
    if listener:
        print(f"[raylm] process-group store on {host}:{port}", flush=True)
    _pin_collectives_to(node_ip)
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)  # NCCL's communicators use the current device from the first collective on
    timeout = cfg.fault.collective_timeout()
    # The store owns the listening socket from here (detach: Python must not close it too).
    store = dist.TCPStore(host, port, active, is_master=listener is not None, timeout=timeout,
                          master_listen_fd=listener.detach() if listener else None)
    dist.init_process_group(backend, store=store, rank=rank, world_size=active, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    # What torchrun exports; DeepSpeed and init_distributed read them.
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(active))
    return True


def _wait_out_the_stage(run_dir: Path, stage: str) -> None:
    """A rank without work still joins every ``ray.train.report`` (a barrier) until the stage is finished."""
    import ray.train

    while not rundir.stage_finished(run_dir, stage):
        ray.train.report({}, checkpoint=None)


def _fetch_run_inputs(run_dir: Path, stage_index: int, stage: str, relay) -> None:
    """On a run in object storage: the config, tokenizer, the stage's data and the weights it starts from,
    into this machine's view of the run (each file once per machine, whatever the rank count or restarts)."""
    import ray
    import ray.train

    fetched = fetch_inputs(run_dir, stage_index)
    rank = ray.train.get_context().get_world_rank()
    print(f"[raylm] run inputs ready on this machine; rank {rank} downloaded {fetched / 2**20:.1f} MiB of them", flush=True)
    relay.put.remote({"stage": stage, "step": 0, "kind": "event", "event": "fetched", "rank": rank,
                      "node": ray.get_runtime_context().get_node_id(), "bytes": fetched})


def _stages_to_run(run_dir: Path, run: RunConfig, indices: List[int]) -> List[int]:
    """The fit's stages not finished yet, as rank 0 sees them (every rank runs the same ones; after a restart
    the finished ones are skipped)."""
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    rank_0 = ray.train.get_context().get_world_rank() == 0
    todo = [i for i in indices if not rundir.stage_finished(run_dir, run.stages[i].name)] if rank_0 else None
    return broadcast_from_rank_zero(todo)


def train_loop_per_worker(config: dict) -> None:
    """Every stage of the fit in order (``config["stage_indices"]``), each its own checkpoint namespace, logs,
    records and summary, in one worker group: a stage costs no worker start-up of its own."""
    import ray
    import ray.train

    # A run in object storage is worked on in this machine's view of it; otherwise its directory is shared.
    run_dir = storage.view_of(storage.Store(config["run_uri"])) if config["run_uri"] else Path(config["run_dir"])
    if config["run_uri"]:
        storage.pull(run_dir, CONFIG_FILE)
    run = from_yaml_file(run_dir / CONFIG_FILE)
    rank = ray.train.get_context().get_world_rank()
    for index in _stages_to_run(run_dir, run, config["stage_indices"]):
        phases = Phases()
        stage = run.stages[index].name
        log = log_rel(stage, rank)
        redirect_output(run_dir, log)
        print(f"[raylm] rank {rank} pid {os.getpid()} node {ray.get_runtime_context().get_node_id()}", flush=True)
        with LogShipper(run_dir, log):
            _run_rank(config, run_dir, run, index, stage, phases)
        # The next stage makes its own default group: its layout may train another number of ranks.
        leave_distributed()


def _run_rank(config: dict, run_dir: Path, run: RunConfig, index: int, stage: str, phases: Phases) -> None:
    import ray.train
    import ray.train.torch

    from raylm.trainer.worker import train_stage

    if config["run_uri"]:
        _fetch_run_inputs(run_dir, index, stage, config["relay"])
        phases.mark("fetch_inputs")
    cfg = resolve_stage(run, index)
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    os.environ.update(LOCAL_RANK=str(context.get_local_rank()), LOCAL_WORLD_SIZE=str(context.get_local_world_size()))
    active = usable_world_size(cfg, workers)
    if active == 0:
        raise RuntimeError(f"{workers} workers hold no whole tp={cfg.parallel.tp} x pp={cfg.parallel.pp} replica")
    if active < workers:
        print(f"[raylm] {workers} workers started; {active} train (whole tp x pp replicas that split the global batch)", flush=True)
    # The GPU Ray assigned this worker (LOCAL_RANK need not be its index), or the CPU.
    device = ray.train.torch.get_device()
    if not _join_process_group(config["backend"], cfg, rank, active, device):
        print("[raylm] this rank has no work in this layout; it waits for the stage to finish", flush=True)
        _wait_out_the_stage(run_dir, stage)
        return
    _check_placement(cfg.parallel.tp, cfg.parallel.pp)
    train_stage(run_dir, index, lambda stage_dir, stage_cfg: RaySession(stage_dir, stage_cfg.train.keep_last, config["relay"]),
                device, phases)
