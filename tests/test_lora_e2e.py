"""A LoRA sft stage trained on Ray, then `raylm export --format hf`: transformers runs the stage's merged
export, and PEFT runs the stage's adapter on the export of the stage's base, both with raylm's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_PRETRAIN, finished_run, launch_in_process
from numerics import assert_close
from raylm.launcher.cli import main
from raylm.launcher.inference import load_stage
from raylm.models.lora import ADAPTER_DIR
from test_lora import same_logits_rel
from test_model import random_tokens

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory) -> Path:
    """``base``: a finished stage made without training (the LoRA stage's initial weights); ``lora``: a LoRA stage
    trained from it on Ray by what ``raylm launch`` runs."""
    root = tmp_path_factory.mktemp("lora-e2e")
    base = finished_run(root, "base", kind="sft")
    lora_sft = (f"stages=[{{name: sft, kind: sft, init_from: '{base / 'sft' / 'final'}', data: {{source: 'builtin:pydoc-sft'}}, "
                "lora: {rank: 4, alpha: 8, targets: [wq, wk, wv, wo, w1, w3, w2]}}]")
    launch_in_process(root, "lora", [*TINY_PRETRAIN, lora_sft, "cluster.num_workers=1", "data.tokenizer=byte"])
    return root


def _export(run_dir: Path, out: Path) -> Path:
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    return out


def test_peft_and_transformers_compute_the_lora_stage(runs, tmp_path):
    import peft
    import transformers

    stage = load_stage(runs / "lora", device=torch.device("cpu"))
    tokens = random_tokens(2, 32, vocab=stage.model_cfg.vocab_size)
    with torch.no_grad():
        expected = stage.model(tokens)
        base = transformers.AutoModelForCausalLM.from_pretrained(_export(runs / "base", tmp_path / "base"))
        base_logits = base(tokens).logits
        adapted = peft.PeftModel.from_pretrained(base, runs / "lora" / "sft" / "final" / ADAPTER_DIR).eval()
        rel = same_logits_rel(stage.model)
        assert_close(adapted(tokens).logits, expected, "PEFT (base export + adapter) vs raylm LoRA stage logits", rel)
        merged = transformers.AutoModelForCausalLM.from_pretrained(_export(runs / "lora", tmp_path / "merged")).eval()
        assert_close(merged(tokens).logits, expected, "transformers (LoRA stage export) vs raylm LoRA stage logits", rel)
    # The stage changed the model: logits equal to the base's would make the comparisons above vacuous.
    assert (expected - base_logits).abs().max() > 100 * rel * expected.abs().max()


def test_lora_stage_reports_its_adapters_and_their_adam_moments(runs):
    from raylm.models.llama import Llama
    from raylm.models.lora import add_lora

    run = load_stage(runs / "lora", device=torch.device("cpu")).run
    adapted = Llama(run.model)
    add_lora(adapted, run.stages[0].lora, seed=0)
    adapters = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    summary = json.loads((runs / "lora" / "sft" / "summary.json").read_text())
    assert summary["trainable_params"] == adapters
    # One worker holds both fp32 moments of every adapter (ZeRO may pad its flat partition a little).
    assert summary["optimizer_state_mb"] == pytest.approx(2 * 4 * adapters / 2**20, rel=0.01)
