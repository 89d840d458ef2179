"""Shared fixtures: one real embedded Ray cluster per test session, tiny runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
# Nothing may come from the Hugging Face hub; set before transformers, datasets or lm-eval read it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Ctrl-C as an interactive run has it: a suite started in the background of a non-interactive shell inherits SIGINT
# ignored (bash does that to background jobs), and so would every process it starts; the Ctrl-C tests need it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
    # Not measured at every stage start (a second of both cores per rank, hundreds of starts in the suite);
    # `single_worker` measures it, for the MFU tests.
    "logging.mfu_peak_tflops=1.0",
    # The same arithmetic on every machine: a GPU would otherwise switch the suite to bf16 and NCCL.
    "train.precision=fp32",
    "cluster.use_gpu=false",
]
TINY_SETTINGS = [item for item in TINY_PRETRAIN if not item.startswith("stages")]
"""TINY_PRETRAIN without its one stage: for tests that give their own ``stages``."""


def cli_here(capsys, *args: str) -> Tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI run in this process: what ``python -m raylm.launcher.cli`` exits
    with and prints, without an interpreter's start and imports per command."""
    from raylm.launcher.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *args: str) -> str:
    """Run the CLI in this process; it must exit 2 with one 'raylm: error:' line, which is returned. Any other
    exception escapes, as a traceback would."""
    code, _, err = cli_here(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raylm: error: "), err
    return lines[0]


def finished_run(runs_dir: Path, name: str = "done", kind: str = "pretrain", state: Optional[dict] = None) -> Path:
    """A run directory whose one stage (named after its ``kind``) looks finished, made without Ray or training:
    the tiny model's fresh weights (or ``state``), a byte tokenizer and a summary, where a stage keeps them."""
    import torch

    from raylm.configs.loader import load_config
    from raylm.data.tokenizer import train_tokenizer
    from raylm.trainer import run_dir as rundir
    from raylm.models.llama import Llama
    from raylm.models.weights import save_consolidated

    sft_stage = ["stages=[{name: sft, kind: sft, data: {source: 'builtin:pydoc-sft'}}]"] if kind == "sft" else []
    run = load_config("tiny", [f"runs_dir={runs_dir}", f"name={name}", *TINY_PRETRAIN, *sft_stage, "data.tokenizer=byte"])
    run_dir = rundir.create(run, name)
    final = run_dir / kind / "final"
    torch.manual_seed(0)
    save_consolidated(state if state is not None else Llama(run.model).state_dict(), run.model, final)
    train_tokenizer([], "byte", run.model.vocab_size).save(final)
    summary = {"stage": kind, "kind": kind, "steps": 5, "final_loss": 5.0, "eval_loss": 5.1, "tokens_per_s": 1.0,
               "mfu": 0.0, "sample": "The ", "final_dir": str(final)}
    (run_dir / kind / "summary.json").write_text(json.dumps(summary))
    return run_dir


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


def losses(run_dir: Path, stage: str = "pretrain", key: str = "loss") -> List[float]:
    """One loss (or another ``key`` of the train records) per step; a step trained again after a resume counts with
    its latest one."""
    by_step = {r["step"]: r[key] for r in read_metrics(run_dir, stage)}
    return [by_step[step] for step in sorted(by_step)]


def ray_info():
    from raylm.cluster.connect import describe

    return describe(embedded=True)


def launch_in_process(tmp_path: Path, name: str, overrides: List[str], source: str = "tiny") -> Path:
    """Run every stage of a config on the session's Ray cluster; return the run dir."""
    from rich.console import Console

    from raylm.configs.loader import load_config
    from raylm.trainer import run_dir as rundir
    from raylm.launcher.stages import run_all

    run = load_config(source, [f"runs_dir={tmp_path}", f"name={name}", *overrides])
    run_dir = rundir.create(run, name)
    run_all(run_dir, run, ray_info(), Console(quiet=True))
    return run_dir


def resume_in_process(run_dir: Path, overrides: List[str]) -> None:
    """What `raylm resume <run> --set ...` does, on the session's Ray cluster."""
    from rich.console import Console

    from raylm.trainer import run_dir as rundir
    from raylm.launcher.resume import with_resume_overrides
    from raylm.launcher.stages import run_all

    run = with_resume_overrides(rundir.load(run_dir), overrides)
    rundir.save_config(run_dir, run)
    run_all(run_dir, run, ray_info(), Console(quiet=True))


def forget_after(run_dir: Path, step: int, stage: str = "pretrain") -> None:
    """Leave ``stage`` as a job that died right after checkpoint ``step`` would have left it."""
    stage_dir = run_dir / stage
    for path in stage_dir.glob("step_*"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    shutil.rmtree(stage_dir / "final")
    (stage_dir / "summary.json").unlink()


@pytest.fixture(scope="session")
def single_worker(ray_cluster, tmp_path_factory) -> Path:
    """The reference every layout must reproduce: one worker, no sharding; it scores one lm-eval task when it ends
    and measures its matmul peak."""
    return launch_in_process(tmp_path_factory.mktemp("single"), "single", [
        *TINY_PRETRAIN, "cluster.num_workers=1", "parallel.zero_stage=0", "stages.0.eval_tasks=raylm_pydoc_topic",
        "logging.mfu_peak_tflops=null"])


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
    """Same 5 losses and the same weight updates as ``reference``, within what reduction order explains
    (and, where both trained in bf16, what bf16's rounding explains).

    Updates (final minus initial weights) are compared as a whole per tensor: Adam divides each gradient by
    its own running norm, so one element whose gradient is rounding noise may move by up to the learning
    rate either way, while a wrong shard or a missing all-reduce changes the whole update.
    """
    from safetensors.torch import load_file

    from numerics import bf16_training_rel, training_rel
    from raylm.configs.loader import from_yaml_file, resolve_stage
    from raylm.trainer.run_dir import stage_summary
    from raylm.trainer.worker import build_dense_model

    cfg = resolve_stage(from_yaml_file(reference / "config.yaml"), 0)
    expected, got = losses(reference), losses(run_dir)
    assert len(got) == len(expected) == 5
    precision = stage_summary(reference, "pretrain")["precision"]
    assert stage_summary(run_dir, "pretrain")["precision"] == precision, f"{label} did not train in the reference's {precision}"
    tokens = cfg.train.global_batch_size * cfg.model.max_seq_len
    rel = bf16_training_rel(cfg.model, tokens) if precision == "bf16" else training_rel(cfg.model, tokens, len(expected))
    for step, (a, b) in enumerate(zip(expected, got), start=1):
        assert abs(a - b) <= rel * abs(a), f"step {step}: 1 worker {a} vs {label} {b} (tolerance {rel:.2g} relative)"
    # The global gradient norm each step clipped by: every layout counts each weight once (a tensor-parallel or
    # pipeline layout that counted a replicated weight on every rank would be off by far more).
    for step, (a, b) in enumerate(zip(losses(reference, key="grad_norm"), losses(run_dir, key="grad_norm")), start=1):
        assert abs(a - b) <= rel * a, f"step {step}: gradient norm {a} on 1 worker vs {b} on {label}"
    initial = build_dense_model(cfg, None).state_dict()
    ref_weights = load_file(str(reference / "pretrain" / "final" / "model.safetensors"))
    weights = load_file(str(run_dir / "pretrain" / "final" / "model.safetensors"))
    assert ref_weights.keys() == weights.keys()
    for name in ref_weights:
        update = ref_weights[name] - initial[name]
        difference = (weights[name] - ref_weights[name]).norm().item()
        assert difference <= rel * update.norm().item(), f"{label}: {name} update differs by {difference:.3g} of {update.norm():.3g}"
