"""One stage as one Ray Train run (TorchTrainer, Ray Train V2 API)."""

from __future__ import annotations

from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from raylm.configs.schema import RunConfig
from raylm.launcher.ray_entry import train_loop_per_worker


def stage_trainer(run_dir: Path, run: RunConfig, stage_index: int, stage_cfg: RunConfig, use_gpu: bool) -> TorchTrainer:
    """``stage_cfg`` is the stage-resolved config; ``run_dir`` must be visible to every node."""
    stage = run.stages[stage_index]
    c = stage_cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "run_dir": str(run_dir),
            "stage_index": stage_index,
            "stage_name": stage.name,
            "tp": stage_cfg.parallel.tp,
            "pp": stage_cfg.parallel.pp,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(stage_cfg.fault.hang_timeout_s)),
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=use_gpu, resources_per_worker=resources, placement_strategy="PACK"),
        run_config=RayRunConfig(
            name=stage.name,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=stage_cfg.fault.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=stage_cfg.train.keep_last),
        ),
    )
