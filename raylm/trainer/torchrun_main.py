"""Run one stage's per-rank code under torchrun, without Ray.

    torchrun --nproc-per-node 2 -m raylm.trainer.torchrun_main --run-dir runs/x [config] [key=value ...]

This is the baseline the benchmarks compare Ray Train against: the same
``train_stage`` code, checkpoints written straight into the run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from raylm.configs.loader import load_config, resolve_stage
from raylm.errors import UserError
from raylm.trainer import run_dir as rundir
from raylm.trainer.device import init_distributed, torchrun_device
from raylm.trainer.session import LocalSession
from raylm.trainer.worker import train_stage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="raylm.trainer.torchrun_main")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--stage", type=int, default=0, help="index of the stage to run")
    parser.add_argument("config", nargs="?")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    try:
        run = load_config(config, overrides)
    except UserError as err:
        print(f"raylm: error: {err}", file=sys.stderr)
        return 2
    cfg = resolve_stage(run, args.stage)
    device = torchrun_device(cfg.cluster.use_gpu)
    init_distributed(cfg, device)  # the GPU is chosen before the first collective (the barrier below)
    run_dir = args.run_dir.resolve()
    if dist.get_rank() == 0:
        run.name = run_dir.name
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.save_config(run_dir, run)
    dist.barrier()
    summary = train_stage(run_dir, args.stage, lambda stage_dir, stage_cfg: LocalSession(stage_dir, stage_cfg.train.keep_last), device)
    if dist.get_rank() == 0:
        print(json.dumps(summary))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
