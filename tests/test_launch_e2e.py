"""`raylm launch` end to end through the CLI: pretrain -> sft on an embedded cluster."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_here
from numerics import assert_close, longest_reduction, model_depth, worst_case

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """The embedded default, shortened: both stages in one worker group."""
    cwd = tmp_path_factory.mktemp("e2e")
    result = subprocess.run(
        [
            sys.executable, "-m", "raylm.launcher.cli", "launch", "--name", "e2e",
            "train.max_steps=12", "train.eval_every=6", "train.ckpt_every=6", "stages.1.train.max_steps=6",
            "stages.1.train.log_every=1", "model.vocab_size=1024",
            "train.precision=fp32", "cluster.use_gpu=false",
        ],
        cwd=cwd, capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (cwd / "stdout.txt").write_text(result.stdout)
    return cwd / "runs" / "e2e"


def _records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_layout(default_run):
    for path in ("config.yaml", "summary.json", "metrics.jsonl", "tokenizer/tokenizer.json", "wandb"):
        assert (default_run / path).exists(), path
    for stage in ("pretrain", "sft"):
        final = default_run / stage / "final"
        assert (final / "model.safetensors").is_file() and (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
        assert (default_run / stage / "loss.png").is_file()
        assert (default_run / stage / "logs" / "rank_000.log").is_file()
    assert sorted(p.name for p in (default_run / "pretrain").glob("step_*")) == ["step_0000006", "step_0000012"]


def test_one_worker_group_runs_both_stages_without_a_restart(default_run):
    """The same worker processes run pretrain, then sft (each stage's rank log starts with its pid), and no attempt failed."""
    stdout = (default_run.parent.parent / "stdout.txt").read_text()
    assert "one worker group runs pretrain, sft in turn" in stdout
    for rank in ("000", "001"):
        first_lines = [(default_run / stage / "logs" / f"rank_{rank}.log").read_text().splitlines()[0] for stage in ("pretrain", "sft")]
        pids = {line.split(" pid ")[1].split()[0] for line in first_lines}
        assert len(pids) == 1, first_lines
    for log in default_run.glob("*/logs/rank_*.log"):
        assert "Traceback" not in log.read_text(), log


def test_the_console_first_says_which_cluster_and_why(default_run):
    stdout = (default_run.parent.parent / "stdout.txt").read_text()
    assert stdout.splitlines()[0].startswith("cluster: embedded local Ray (no --address, no RAY_ADDRESS); 1 node(s)")


def test_metrics_and_summary(default_run):
    records = _records(default_run)
    train = [r for r in records if r["stage"] == "pretrain" and r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 12]
    sft_steps = [r["step"] for r in records if r["stage"] == "sft" and r["kind"] == "train"]
    assert sft_steps == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb"} <= set(r) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert any(r["kind"] == "eval" and r["stage"] == "pretrain" for r in records)
    summary = json.loads((default_run / "summary.json").read_text())
    pretrain, sft = summary["stages"]
    assert pretrain["layout"]["dp"] == 2 and sft["layout"]["dp"] == 2
    # Where each stage's time went, from Ray Train's worker start to its shutdown.
    for stage in (pretrain, sft):
        timeline = stage["timeline_s"]
        assert {"process_group", "data", "model", "deepspeed_initialize", "mfu_peak", "resume"} <= set(timeline["rank_setup_phases"])
        assert {"gather_weights", "save_final", "sample"} <= set(timeline["finish_phases"]) and timeline["restarts"] == 0
        assert all(timeline[phase] >= 0 for phase in ("workers_up", "rank_setup", "first_step", "steps", "finish", "teardown"))
    # Better than a uniform guess over the 1024-token vocabulary after 12 steps, and reported consistently.
    assert pretrain["eval_loss"] < math.log(1024) and pretrain["perplexity"] == pytest.approx(math.exp(pretrain["eval_loss"]))
    assert pretrain["tokens_per_s"] > 0
    assert sft["sample"].startswith("<|user|>")
    stdout = (default_run.parent.parent / "stdout.txt").read_text()
    assert "perplexity" in stdout and str(default_run) in stdout


def test_wandb_offline_runs_one_per_stage(default_run):
    offline = sorted(p.name for p in (default_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    ids = {(default_run / s / "wandb_id").read_text() for s in ("pretrain", "sft")}
    assert all(any(i in name for name in offline) for i in ids)


def test_launch_refuses_an_existing_run_name(default_run):
    result = subprocess.run(
        [sys.executable, "-m", "raylm.launcher.cli", "launch", "--name", "e2e"],
        cwd=default_run.parent.parent, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "already exists" in result.stderr and "raylm resume" in result.stderr


def test_sft_starts_from_exactly_the_pretrained_weights(default_run):
    """The first sft loss (before any update) equals an offline computation on pretrain's final weights."""
    import torch

    from raylm.configs.loader import resolve_stage
    from raylm.data import prepare_dataset
    from raylm.data.sampler import SampleOrder
    from raylm.launcher.inference import load_stage
    from raylm.models.loss import cross_entropy_loss

    pretrain = load_stage(default_run, "pretrain")
    cfg = resolve_stage(pretrain.run, 1)
    train, _, _ = prepare_dataset("sft", cfg.data, cfg.model, default_run / "data" / "sft", cfg.train.seed, tokenizer=pretrain.tokenizer)
    order = SampleOrder(train.num_samples, cfg.train.seed)
    micro, accum = cfg.parallel.micro_batch_size, cfg.train.global_batch_size // cfg.parallel.micro_batch_size
    with torch.no_grad():
        micro_losses = []
        for step in range(accum):
            inputs, targets = train.batch(order.micro_batch_indices(0, cfg.train.global_batch_size, 0, 1, micro, step))
            micro_losses.append(cross_entropy_loss(pretrain.model(torch.from_numpy(inputs)), torch.from_numpy(targets)).item())
    offline = sum(micro_losses) / accum
    first = next(r for r in _records(default_run) if r["stage"] == "sft" and r["kind"] == "train")
    assert first["step"] == 1
    # The same forward pass on the engine, with its own thread count and kernels: the sums, reordered.
    rel = worst_case(longest_reduction(cfg.model, micro * cfg.model.max_seq_len)) * model_depth(cfg.model)
    assert abs(first["loss"] - offline) <= rel * offline


def test_generate_eval_and_export_from_the_cli(default_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.launcher.inference import load_stage

    from raylm.launcher.inference import generate_text

    prompt = "What is a lambda?"
    code, generated, err = cli_here(capsys, "generate", str(default_run), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0, err
    # The sft stage's greedy answer, exactly as raylm computes it in process (the chat template hides the prompt).
    greedy = "".join(generate_text(load_stage(default_run), prompt, max_new_tokens=8, temperature=0, top_k=None, top_p=None, seed=0))
    assert generated == greedy + "\n"

    code, evaluated, err = cli_here(capsys, "eval", str(default_run), "--stage", "pretrain")
    assert code == 0, err
    result = json.loads(evaluated)
    assert result["stage"] == "pretrain" and result["sequences"] > 0
    assert result["loss"] < math.log(1024) and result["perplexity"] == pytest.approx(math.exp(result["loss"]))

    out = tmp_path / "hf"
    code, _, err = cli_here(capsys, "export", str(default_run), "--format", "hf", "--out", str(out))
    assert code == 0, err
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    sft = load_stage(default_run)
    text = "Explain the Python topic 'lambda'."
    assert hf_tokenizer.encode(text, add_special_tokens=False) == sft.tokenizer.encode(text)
    tokens = torch.tensor([sft.tokenizer.encode(text)])
    with torch.no_grad():
        rel = worst_case(longest_reduction(sft.model_cfg, tokens.numel())) * model_depth(sft.model_cfg)
        assert_close(hf_model(tokens).logits, sft.model(tokens), "transformers vs raylm logits", rel)
    code, _, err = cli_here(capsys, "export", str(default_run), "--out", str(out))
    assert code == 2 and "not empty" in err


def test_resume_never_reruns_a_finished_stage(default_run, capsys):
    """Nor does it start or reach a Ray cluster: there is nothing to run."""
    before = (default_run / "metrics.jsonl").read_text()
    code, out, err = cli_here(capsys, "resume", str(default_run))
    assert code == 0, err[-2000:]
    assert out.count("already finished, skipping") == 2 and "cluster:" not in out
    assert (default_run / "metrics.jsonl").read_text() == before
