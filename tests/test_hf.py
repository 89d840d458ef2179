"""The Hugging Face adapter: transformers' LlamaForCausalLM computes what raylm computes, and exports round-trip."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import transformers

from numerics import assert_close, longest_reduction, model_depth, worst_case
from raylm.errors import UserError
from raylm.models.hf import from_hf_state_dict, hf_config, load_hf_dir, model_config_from_hf, save_hf, to_hf_state_dict
from raylm.models.llama import Llama
from raylm.models.shapes import ffn_hidden_size
from test_model import random_tokens, tiny_config

SHAPES = {
    "tied-gqa": dict(tie_embeddings=True, n_kv_head=2),
    "untied-gqa": dict(tie_embeddings=False, n_kv_head=2),
    "untied-mha": dict(tie_embeddings=False, n_kv_head=4, rope_theta=500000.0, norm_eps=1e-6),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def same_logits_rel(model: Llama) -> float:
    """transformers computes the same model with other kernels and op orders (eager attention, its own RoPE)."""
    return worst_case(longest_reduction(model.cfg, 32)) * model_depth(model.cfg)


def raylm_model(**changes) -> Llama:
    torch.manual_seed(0)
    model = Llama(tiny_config(**changes)).eval()
    # Norm weights of ones would hide a mix-up of the two norms of a block.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("changes", SHAPES.values(), ids=SHAPES.keys())
def test_transformers_llama_gives_the_same_logits(changes):
    model = raylm_model(**changes)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(model.cfg))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert unexpected == [] and set(missing) <= ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == model.cfg.tie_embeddings
    tokens = random_tokens(2, 32)
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = model(tokens)
    assert_close(actual, expected, "raylm vs transformers logits", same_logits_rel(model))


@pytest.mark.parametrize("changes", SHAPES.values(), ids=SHAPES.keys())
def test_export_and_import_round_trip_exactly(tmp_path, changes):
    model = raylm_model(**changes)
    save_hf(model.state_dict(), model.cfg, tmp_path)
    cfg, state = load_hf_dir(tmp_path)
    # The import spells out the derived SwiGLU width.
    assert cfg == dataclasses.replace(model.cfg, ffn_hidden=ffn_hidden_size(model.cfg))
    original = model.state_dict()
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name
    assert (state["output.weight"] is state["tok_embeddings.weight"]) == cfg.tie_embeddings
    restored = Llama(cfg)
    restored.load_state_dict(state)
    tokens = random_tokens(1, 10)
    assert torch.equal(restored(tokens), model(tokens))


@pytest.mark.parametrize("changes", SHAPES.values(), ids=SHAPES.keys())
def test_auto_model_loads_the_export_offline(tmp_path, changes):
    model = raylm_model(**changes)
    save_hf(model.state_dict(), model.cfg, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(hf, transformers.LlamaForCausalLM)
    tokens = random_tokens(1, 16)
    with torch.no_grad():
        assert_close(hf(tokens).logits, model(tokens), "transformers vs raylm logits", same_logits_rel(model))


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    sentences = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps", "the fox is quick and brown"] * 5
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer


def test_auto_tokenizer_loads_the_exported_tokenizer(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer_path = tmp_path / "source" / "tokenizer.json"
    tokenizer_path.parent.mkdir()
    tokenizer.save(str(tokenizer_path))
    model = raylm_model(vocab_size=tokenizer.get_vocab_size())
    out = tmp_path / "export"
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    save_hf(model.state_dict(), model.cfg, out, tokenizer_json_path=tokenizer_path, special_tokens=special)

    loaded = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox jumps, quickly!"
    assert loaded(text)["input_ids"] == tokenizer.encode(text).ids
    assert loaded.decode(tokenizer.encode(text).ids) == text
    assert loaded.eos_token_id == 0 and loaded.pad_token_id == 1
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 0 and config["pad_token_id"] == 1 and config["bos_token_id"] is None
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 0, "pad_token_id": 1}


def test_sharded_checkpoints_load(tmp_path):
    model = raylm_model(tie_embeddings=False)
    hf_sd = to_hf_state_dict(model.state_dict())
    names = sorted(hf_sd)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    from safetensors.torch import save_file

    for file_name, part in halves.items():
        save_file({n: hf_sd[n].contiguous() for n in part}, str(tmp_path / file_name))
    weight_map = {n: f for f, part in halves.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model.cfg)))
    cfg, state = load_hf_dir(tmp_path)
    assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())


def test_missing_files_and_unsupported_configs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(tiny_config())))
    with pytest.raises(UserError, match="model.safetensors"):
        load_hf_dir(tmp_path)
    base = hf_config(tiny_config())
    with pytest.raises(UserError, match="model_type='gpt2'"):
        model_config_from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(UserError, match="rope"):
        model_config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(UserError, match="attention_bias"):
        model_config_from_hf({**base, "attention_bias": True})
    state = to_hf_state_dict(raylm_model(tie_embeddings=False).state_dict())
    del state["lm_head.weight"]
    with pytest.raises(UserError, match="lm_head.weight"):
        from_hf_state_dict(state, tiny_config(tie_embeddings=False))


def test_hf_module_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, raylm.models.hf, raylm.models.llama; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ}).returncode == 0
