"""LoRA: the adapters' math, their merge, and PEFT reading raylm's adapter onto the Hugging Face export of the base."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_PRETRAIN, one_line_error
from numerics import assert_close, longest_reduction, model_depth, worst_case
from raylm.configs.schema import LoraConfig
from raylm.models.hf import save_hf
from raylm.models.llama import Llama
from raylm.models.lora import (ADAPTER_CONFIG_FILE, LoRALinear, add_lora, adapter_weights, load_adapters, merged_weights,
                               save_peft_adapter)
from test_model import random_tokens, tiny_config, tiny_model

ALL_TARGETS = LoraConfig(rank=4, alpha=8.0, targets=["wq", "wk", "wv", "wo", "w1", "w3", "w2"])


def same_logits_rel(model) -> float:
    """Two correct computations of one model's logits (other kernels, a merged weight instead of a low-rank branch)."""
    return worst_case(longest_reduction(model.cfg, 32)) * model_depth(model.cfg)


def trained_adapters(model) -> None:
    """B starts at zero (the adapted model is the base); give it values, as training would, so a wrong merge shows."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def lora_model(lora: LoraConfig = ALL_TARGETS, **changes):
    model = tiny_model(**changes)
    add_lora(model, lora, seed=3)
    trained_adapters(model)
    return model.eval()


def test_only_adapters_train_and_start_at_the_base_model():
    base = tiny_model()
    model = tiny_model()
    add_lora(model, LoraConfig(rank=4, alpha=8.0, targets=["wq", "w2"]), seed=3)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{path}.lora_{ab}.weight" for i in range(2) for path in ("attention.wq", "feed_forward.w2") for ab in "AB"}
    tokens = random_tokens(2, 16)
    assert torch.equal(model(tokens), base(tokens))  # B = 0
    # The frozen weights keep their names, so the stage's initial weights load as they are.
    assert set(base.state_dict()) <= set(model.state_dict())
    model(tokens).sum().backward()
    assert all(p.grad is None for name, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for name, p in model.named_parameters() if name.endswith("lora_B.weight"))


def test_same_seed_same_adapters_and_a_wrong_set_is_refused():
    first, second = lora_model(), tiny_model()
    add_lora(second, ALL_TARGETS, seed=3)
    a_names = [n for n in adapter_weights(first.state_dict()) if "lora_A" in n]
    assert all(torch.equal(first.state_dict()[n], second.state_dict()[n]) for n in a_names)
    load_adapters(second, adapter_weights(first.state_dict()))
    tokens = random_tokens(1, 8)
    assert torch.equal(first(tokens), second(tokens))
    with pytest.raises(ValueError, match="missing"):
        load_adapters(second, {n: t for n, t in adapter_weights(first.state_dict()).items() if "layers.0." in n})


def test_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=False)
    layer = LoRALinear(base, rank=2, alpha=6.0, dropout=0.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 16)
    expected = x @ base.weight.T + 3.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert_close(layer(x), expected, "LoRA linear", worst_case(16 + 24))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_merged_weights_compute_what_the_adapted_model_computes(tie):
    model = lora_model(tie_embeddings=tie)
    base = tiny_model(tie_embeddings=tie)
    merged = merged_weights(base.state_dict(), adapter_weights(model.state_dict()), ALL_TARGETS)
    dense = tiny_model(tie_embeddings=tie)
    dense.load_state_dict(merged)
    tokens = random_tokens(2, 32)
    with torch.no_grad():
        assert_close(dense(tokens), model(tokens), "merged vs adapted logits", same_logits_rel(model))
        # A merge that dropped the update (or the scale) would give the base's logits.
        assert (dense(tokens) - base(tokens)).abs().max() > 100 * same_logits_rel(model) * base(tokens).abs().max()


@pytest.mark.parametrize("lora", [ALL_TARGETS, LoraConfig(rank=2, alpha=4.0, targets=["wv", "w3"])], ids=["all", "wv-w3"])
def test_peft_loads_the_adapter_onto_the_hf_export_of_the_base(tmp_path, lora):
    peft = pytest.importorskip("peft")
    import transformers

    model = lora_model(lora, tie_embeddings=False)
    base = tiny_model(tie_embeddings=False)
    save_hf(base.state_dict(), base.cfg, tmp_path / "base")
    save_peft_adapter(adapter_weights(model.state_dict()), lora, tmp_path / "adapter")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    hf = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    # Every adapter arrived: PEFT leaves a missing one at its init (B = 0) with only a warning.
    loaded = {name for name, _ in hf.named_parameters() if "lora_" in name}
    assert len(loaded) == len(adapter_weights(model.state_dict()))
    tokens = random_tokens(2, 32)
    with torch.no_grad():
        assert_close(hf(tokens).logits, model(tokens), "PEFT vs raylm LoRA logits", same_logits_rel(model))
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"]) == (lora.rank, lora.alpha)


BAD_LORA = {
    "rank: 0": "stages.1.lora.rank=0 must be > 0",
    "alpha: -1": "stages.1.lora.alpha=-1",
    "dropout: 1.0": "stages.1.lora.dropout=1.0 must be in [0, 1)",
    "targets: [q_proj]": "stages.1.lora.targets has 'q_proj'",
    "targets: []": "stages.1.lora.targets is empty",
    "targets: [wq, wq]": "names a projection twice",
}


@pytest.mark.parametrize("setting", BAD_LORA, ids=list(BAD_LORA))
def test_bad_lora_settings_are_one_line_errors(capsys, tmp_path, setting):
    stages = f"stages=[{{name: pretrain, kind: pretrain}}, {{name: sft, kind: sft, data: {{source: 'builtin:pydoc-sft'}}, lora: {{{setting}}}}}]"
    line = one_line_error(capsys, "config", "show", "tiny", stages)
    assert BAD_LORA[setting] in line and "stage 'sft'" in line


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=3"])
def test_layouts_lora_cannot_run_on_are_refused(capsys, layout):
    stages = "stages=[{name: pretrain, kind: pretrain, lora: {rank: 4}}]"
    zero = "parallel.zero_stage=3" if layout == "parallel.zero_stage=3" else "parallel.zero_stage=1"  # else valid without LoRA
    line = one_line_error(capsys, "config", "show", "tiny", *TINY_PRETRAIN, stages, "cluster.num_workers=2", zero, layout)
    assert "stages.0.lora cannot run with " + layout in line


def test_lora_flops_estimate_counts_what_autograd_runs():
    """Every matmul of a forward and backward, counted by torch (attention's products are not: SDPA runs them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from raylm.models.flops import block_matmul_params, flops_per_token, lora_flops_per_token

    cfg = tiny_config(n_layer=3, d_model=64, vocab_size=97, max_seq_len=32)
    tokens = random_tokens(2, 32)
    attention = 12.0 * cfg.n_layer * cfg.d_model * tokens.size(1)

    def counted(model) -> float:
        with FlopCounterMode(display=False) as counter:
            model(tokens).sum().backward()
        return counter.get_total_flops() / tokens.numel()

    torch.manual_seed(0)
    assert counted(Llama(cfg)) == flops_per_token(cfg, tokens.size(1)) - attention
    adapted = Llama(cfg)
    add_lora(adapted, ALL_TARGETS, seed=0)
    adapters = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    estimate = lora_flops_per_token(cfg, tokens.size(1), adapters) - attention
    # The estimate also counts the input gradients of the first block's wq, wk, wv, which nothing needs.
    assert 0 <= estimate - counted(adapted) <= 2 * block_matmul_params(cfg)


def test_a_lora_key_starts_the_section_from_its_defaults():
    from raylm.configs.loader import load_config

    run = load_config("tiny", ["stages.1.lora.rank=4", "stages.1.lora.targets=[wq, w2]"])
    assert run.stages[1].lora == LoraConfig(rank=4, alpha=16.0, dropout=0.0, targets=["wq", "w2"])
    assert run.stages[0].lora is None
