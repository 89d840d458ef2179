"""Shared fixtures: one real embedded Ray cluster per test session, tiny runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

# A short single-stage pretraining run of the tiny preset: every integration test starts from it.
TINY_PRETRAIN = [
    "stages=[{name: pretrain, kind: pretrain}]",
    "train.max_steps=5",
    "train.log_every=1",
    "train.eval_every=0",
    "train.ckpt_every=0",
    "train.eval_batches=2",
    "train.sample_tokens=8",
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (127.0.0.1, no dashboard), shared by the session."""
    from raylm.cluster.connect import shutdown, start_or_connect

    info = start_or_connect(None, local_cpus=4)
    yield info
    shutdown()


def read_metrics(run_dir: Path, stage: str = "pretrain", kind: str = "train") -> List[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    if lines and not lines[-1].endswith("}"):
        lines.pop()  # a line being written while a test watches a running stage
    records = [json.loads(line) for line in lines]
    return [r for r in records if r.get("stage") == stage and r.get("kind") == kind]


def losses(run_dir: Path, stage: str = "pretrain") -> List[float]:
    """One loss per step; a step trained again after a resume counts with its latest loss."""
    by_step = {r["step"]: r["loss"] for r in read_metrics(run_dir, stage)}
    return [by_step[step] for step in sorted(by_step)]


def ray_info():
    from raylm.cluster.connect import describe

    return describe(embedded=True)


def launch_in_process(tmp_path: Path, name: str, overrides: List[str], source: str = "tiny") -> Path:
    """Run every stage of a config on the session's Ray cluster; return the run dir."""
    from rich.console import Console

    from raylm.configs.loader import load_config
    from raylm.launcher import run_dir as rundir
    from raylm.launcher.stages import run_all

    run = load_config(source, [f"runs_dir={tmp_path}", f"name={name}", *overrides])
    run_dir = rundir.create(run, name)
    run_all(run_dir, run, ray_info(), Console(quiet=True))
    return run_dir


def resume_in_process(run_dir: Path, overrides: List[str]) -> None:
    """What `raylm resume <run> --set ...` does, on the session's Ray cluster."""
    from rich.console import Console

    from raylm.launcher import run_dir as rundir
    from raylm.launcher.resume import with_resume_overrides
    from raylm.launcher.stages import run_all

    run = with_resume_overrides(rundir.load(run_dir), overrides)
    rundir.save_config(run_dir, run)
    run_all(run_dir, run, ray_info(), Console(quiet=True))


def forget_after(run_dir: Path, step: int) -> None:
    """Leave the stage as a job that died right after checkpoint ``step`` would have left it."""
    stage_dir = run_dir / "pretrain"
    for path in stage_dir.glob("step_*"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    shutil.rmtree(stage_dir / "final")
    (stage_dir / "summary.json").unlink()


@pytest.fixture(scope="session")
def single_worker(ray_cluster, tmp_path_factory) -> Path:
    """The reference every layout must reproduce: one worker, no sharding."""
    return launch_in_process(tmp_path_factory.mktemp("single"), "single", [*TINY_PRETRAIN, "cluster.num_workers=1", "parallel.zero_stage=0"])


@pytest.fixture(scope="session")
def untied_single_worker(ray_cluster, tmp_path_factory) -> Path:
    """The reference for an untied output head (the 1.3b preset's kind)."""
    return launch_in_process(tmp_path_factory.mktemp("untied"), "untied", [
        *TINY_PRETRAIN, "cluster.num_workers=1", "parallel.zero_stage=0", "model.tie_embeddings=false"])


# Runs that checkpoint at step 3 (and 5): parity tests check them, resharding tests continue them elsewhere.
CHECKPOINT_AT_3 = [*TINY_PRETRAIN, "train.ckpt_every=3"]


@pytest.fixture(scope="session")
def tp2pp2_run(ray_cluster, tmp_path_factory) -> Path:
    """tp2 x pp2 on 4 workers, ZeRO-1."""
    return launch_in_process(tmp_path_factory.mktemp("tp2pp2"), "tp2pp2", [
        *CHECKPOINT_AT_3, "cluster.num_workers=4", "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"])


@pytest.fixture(scope="session")
def spare_worker_run(ray_cluster, tmp_path_factory) -> Path:
    """Elastic 1-3 workers: Ray starts 3, but 16 sequences in micro-batches of 4 split over 2 replicas, so rank 2 waits (dp2, ZeRO-2)."""
    return launch_in_process(tmp_path_factory.mktemp("spare"), "spare", [*CHECKPOINT_AT_3, "cluster.num_workers=3", "cluster.min_workers=1"])


def assert_same_training(reference: Path, run_dir: Path, label: str) -> None:
    """Same 5 losses (1e-4 relative) and same consolidated final weights (1e-5)."""
    from safetensors.torch import load_file

    expected, got = losses(reference), losses(run_dir)
    assert len(got) == len(expected) == 5
    for step, (a, b) in enumerate(zip(expected, got), start=1):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: 1 worker {a} vs {label} {b}"
    ref_weights = load_file(str(reference / "pretrain" / "final" / "model.safetensors"))
    weights = load_file(str(run_dir / "pretrain" / "final" / "model.safetensors"))
    assert ref_weights.keys() == weights.keys()
    for name in ref_weights:
        assert (ref_weights[name] - weights[name]).abs().max().item() < 1e-5, f"{label}: {name}"
