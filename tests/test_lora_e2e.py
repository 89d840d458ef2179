"""`raylm launch` pretrain -> LoRA sft on Ray, then `raylm export --format hf`: transformers runs the merged export, and
PEFT runs the stage's adapter on the export of its base, both with raylm's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_PRETRAIN
from numerics import assert_close
from raylm.launcher.cli import main
from raylm.launcher.inference import load_stage
from raylm.models.lora import ADAPTER_DIR
from test_lora import same_logits_rel
from test_model import random_tokens

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LORA_SFT = ("stages=[{name: pretrain, kind: pretrain}, {name: sft, kind: sft, data: {source: 'builtin:pydoc-sft'}, "
            "lora: {rank: 4, alpha: 8, targets: [wq, wk, wv, wo, w1, w3, w2]}}]")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("lora-e2e")
    result = subprocess.run(
        [sys.executable, "-m", "raylm.launcher.cli", "launch", "--name", "lora", *TINY_PRETRAIN, LORA_SFT,
         "cluster.num_workers=1", "data.tokenizer=byte", "model.tie_embeddings=false"],
        cwd=cwd, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd / "runs" / "lora"


def _export(run_dir: Path, stage: str, out: Path) -> Path:
    assert main(["export", str(run_dir), "--stage", stage, "--format", "hf", "--out", str(out)]) == 0
    return out


def test_peft_and_transformers_compute_the_lora_stage(lora_run, tmp_path):
    import peft
    import transformers

    stage = load_stage(lora_run, "sft", device=torch.device("cpu"))
    tokens = random_tokens(2, 32, vocab=stage.model_cfg.vocab_size)
    with torch.no_grad():
        expected = stage.model(tokens)
        base = transformers.AutoModelForCausalLM.from_pretrained(_export(lora_run, "pretrain", tmp_path / "base"))
        base_logits = base(tokens).logits
        adapted = peft.PeftModel.from_pretrained(base, lora_run / "sft" / "final" / ADAPTER_DIR).eval()
        rel = same_logits_rel(stage.model)
        assert_close(adapted(tokens).logits, expected, "PEFT (pretrain export + sft adapter) vs raylm sft logits", rel)
        merged = transformers.AutoModelForCausalLM.from_pretrained(_export(lora_run, "sft", tmp_path / "sft")).eval()
        assert_close(merged(tokens).logits, expected, "transformers (sft export) vs raylm sft logits", rel)
    # The stage changed the model: logits equal to the base's would make the comparisons above vacuous.
    assert (expected - base_logits).abs().max() > 100 * rel * expected.abs().max()


def test_lora_stage_trains_a_small_fraction_of_the_weights(lora_run):
    pretrain, sft = json.loads((lora_run / "summary.json").read_text())["stages"]
    assert sft["trainable_params"] < pretrain["trainable_params"] / 10
    assert sft["optimizer_state_mb"] < pretrain["optimizer_state_mb"] / 10
