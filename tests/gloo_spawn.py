"""Run a function on N real processes joined by a gloo process group on localhost."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ports import free_port


# Ranks are forked from one server process that has imported these once per test session: a fresh interpreter
# spends ~6-9 s of CPU importing torch, DeepSpeed and raylm's per-rank code, which on the suite's two cores
# was most of a parity test's time. torch._dynamo (~1.6 s more) is what a rank's first model build and every
# optimizer's constructor import (both go through functions wrapped for torch.compile).
PRELOADED = ["torch", "deepspeed", "torch._dynamo", "raylm.trainer.worker", "raylm.trainer.session"]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, environ: Dict[str, str], cwd: str, args: tuple) -> None:
    # The server was started once, so a rank takes the caller's environment and directory as a spawned one would.
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    torch.set_num_threads(1)  # several ranks share the test machine's cores
    # What Ray Train and torchrun export, on loopback; DeepSpeed reads RANK, LOCAL_RANK and WORLD_SIZE.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_gloo(fn: Callable[..., Any], world_size: int, *args: Any, fresh_interpreters: bool = False) -> None:
    """Call ``fn(rank, world_size, *args)`` on every rank; a failure on any rank fails the caller.

    ``fn`` must be a module-level function (it reaches the ranks by name). ``fresh_interpreters`` starts each rank
    as a new interpreter instead of forking it: for measuring a rank's memory, which a forked rank's inherited
    heap and C library settings would blur.
    """
    multiprocessing.set_forkserver_preload(PRELOADED)
    mp.start_processes(_entry, args=(fn, world_size, free_port(), dict(os.environ), os.getcwd(), args), nprocs=world_size,
                       join=True, start_method="spawn" if fresh_interpreters else "forkserver")


def run_side_by_side(calls: Sequence[Tuple[Callable[..., Any], tuple]]) -> None:
    """Each ``(fn, args)`` as ``run_on_gloo(fn, 1, *args)``, all at once: single-rank work (one thread per rank)
    that one after another would leave the other cores idle. A failure of any fails the caller."""
    with ThreadPoolExecutor(len(calls)) as pool:
        for done in [pool.submit(run_on_gloo, fn, 1, *args) for fn, args in calls]:
            done.result()


def train_stage_on_rank(run_dir: Path, run, rank: int) -> None:
    """One stage of ``run`` on this gloo rank, checkpoints straight into ``run_dir`` (as torchrun does); rank 0 writes
    the run's config first."""
    from raylm.trainer import run_dir as rundir

    if rank == 0:
        run.name = run_dir.name
        run_dir.mkdir()
        rundir.save_config(run_dir, run)
    dist.barrier()
    train_saved_stage(run_dir)


def train_runs(rank: int, world_size: int, root: Path, runs: Dict[str, List[str]]) -> None:
    """Each of ``runs`` (name -> overrides of the tiny preset) trained in turn on this gloo rank, into ``root/name``:
    the per-rank code Ray runs, without paying a worker group's start-up per run."""
    from raylm.configs.loader import load_config

    for name, overrides in runs.items():
        train_stage_on_rank(root / name, load_config("tiny", overrides), rank)


def resume_on_rank(rank: int, world_size: int, run_dir: Path, overrides: List[str]) -> None:
    """What `raylm resume <run> --set ...` does, on this gloo rank: rank 0 saves the changed config, every rank
    continues the first stage from its last checkpoint."""
    from raylm.launcher.resume import with_resume_overrides
    from raylm.trainer import run_dir as rundir

    if rank == 0:
        rundir.save_config(run_dir, with_resume_overrides(rundir.load(run_dir), overrides))
    dist.barrier()
    train_saved_stage(run_dir)


def train_saved_stage(run_dir: Path) -> None:
    """The first stage of the run whose config is in ``run_dir`` on this gloo rank: from its last checkpoint, if
    it has one (what a restart does)."""
    from raylm.trainer.session import LocalSession
    from raylm.trainer.worker import StageTrainer

    StageTrainer(run_dir, 0, lambda stage_dir, cfg: LocalSession(stage_dir, cfg.train.keep_last), torch.device("cpu")).run_loop()
