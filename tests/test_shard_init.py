"""Each rank makes only its own weights: the whole model's values, sliced, at about 1/tp or 1/pp of its host memory."""

from __future__ import annotations

import os

import pytest
import torch

from gloo_spawn import run_on_gloo
from host_memory import build_peaks
from raylm.configs.loader import load_config
from raylm.configs.schema import ModelConfig
from raylm.models.hf import save_hf
from raylm.models.llama import Llama
from raylm.models.weights import load_any, read_part, save_consolidated, weight_locations
from raylm.parallelism.materialize import fresh_weights, stored_weights
from raylm.parallelism.plan import split_dim_of
from raylm.parallelism.reshard import tp_shard_of

SMALL = ["model.vocab_size=96", "model.d_model=64", "model.n_layer=4", "model.n_head=4", "model.n_kv_head=2",
         "model.max_seq_len=16", "parallel.zero_stage=1", "cluster.num_workers=2"]


def tiny_config(tie_embeddings: bool = True) -> ModelConfig:
    return ModelConfig(vocab_size=96, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=16, tie_embeddings=tie_embeddings)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fresh_parts_are_slices_of_the_whole_init(tp):
    cfg = tiny_config()
    whole = Llama(cfg, seed=7).state_dict()
    part = fresh_weights(cfg, seed=7)
    for name, _ in Llama(cfg, seed=7).named_parameters():
        for rank in range(tp):
            assert torch.equal(part(name, rank, tp), tp_shard_of(whole[name], name, rank, tp)), (name, rank)
    assert not torch.equal(Llama(cfg, seed=8).state_dict()["layers.0.attention.wq.weight"], whole["layers.0.attention.wq.weight"])


def test_meta_layout_has_the_shapes_and_real_rope_tables():
    cfg = tiny_config()
    with torch.device("meta"):
        layout = Llama(cfg, seed=7)
    plain = Llama(cfg, seed=7)
    assert all(p.is_meta for p in layout.parameters())
    assert {n: p.shape for n, p in layout.named_parameters()} == {n: p.shape for n, p in plain.named_parameters()}
    assert torch.equal(layout.cos, plain.cos) and torch.equal(layout.sin, plain.sin)


@pytest.mark.parametrize("kind", ["raylm", "hugging_face"])
@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_stored_parts_are_slices_of_the_stored_weights(tmp_path, kind, tie_embeddings):
    cfg = tiny_config(tie_embeddings)
    torch.manual_seed(3)
    state = Llama(cfg).state_dict()
    if kind == "raylm":
        save_consolidated(state, cfg, tmp_path)
    else:
        save_hf(state, cfg, tmp_path)
    locations = weight_locations(tmp_path)
    assert locations.keys() == state.keys()
    assert (locations["output.weight"] == locations["tok_embeddings.weight"]) == tie_embeddings
    for name, value in state.items():
        for rank in range(2):
            assert torch.equal(read_part(locations[name], split_dim_of(name), rank, 2), tp_shard_of(value, name, rank, 2)), name
    assert torch.equal(stored_weights(locations, str(tmp_path))("norm.weight", 1, 2), state["norm.weight"])
    with pytest.raises(ValueError, match="lacks layers.9"):
        stored_weights(locations, str(tmp_path))("layers.9.attention.wq.weight", 0, 2)


def _check_layouts(rank: int, world_size: int, init_dir) -> None:
    from raylm.models.llama import Llama as Model
    from raylm.parallelism.apply import build_parallel_model
    from raylm.trainer.device import init_distributed

    os.environ["LOCAL_RANK"] = str(rank)  # what DeepSpeed's PipelineModule reads
    for layout in ("parallel.tp=2", "parallel.pp=2"):
        for init in (None, init_dir):
            run = load_config("tiny", [*SMALL, layout, *(["model.tie_embeddings=false"] if init else [])])
            init_distributed(run, torch.device("cpu"))
            if init is None:
                whole, weights = Model(run.model, run.train.seed).state_dict(), fresh_weights(run.model, run.train.seed)
            else:
                whole, weights = load_any(init)[1], stored_weights(weight_locations(init), str(init))
            with torch.device("meta"):
                model = Model(run.model, run.train.seed)
            par = build_parallel_model(model, run, rank, world_size, weights)
            state = (par.dense if par.pp > 1 else par.module).state_dict()
            held = {name for name, value in state.items() if not value.is_meta}
            if par.pp > 1:
                assert held == par.stage_names and held < state.keys(), (layout, sorted(held))
            else:
                assert held == state.keys()
            for name in held:
                expected = tp_shard_of(whole[name], name, par.groups.tp_rank, par.tp)
                assert torch.equal(state[name], expected), (layout, init, name)


@pytest.mark.slow
def test_tp2_and_pp2_ranks_hold_their_slices_of_the_whole_model(tmp_path):
    """Fresh (tied) and from stored weights (untied) on 2 ranks: every weight a rank holds equals its slice
    of the whole model's, and a pipeline stage holds nothing of the other stage."""
    cfg = load_config("tiny", [*SMALL, "model.tie_embeddings=false"]).model
    torch.manual_seed(99)
    save_consolidated(Llama(cfg).state_dict(), cfg, tmp_path)
    run_on_gloo(_check_layouts, 2, tmp_path)


# Big enough that the weights (201 MiB in fp32) dominate what building a rank costs.
MEASURED = ["model.d_model=1024", "model.n_layer=4", "model.n_head=8", "model.n_kv_head=8", "model.vocab_size=2048",
            "parallel.zero_stage=1"]
LARGEST_MIB = 2752 * 1024 * 4 / 2**20  # a SwiGLU projection


@pytest.mark.slow
def test_tp2_and_pp2_ranks_build_with_about_half_the_host_memory_of_tp1():
    """Peak host memory a rank's build adds (``tests/host_memory.py``; two ranks build dp2, then tp2, then pp2): a
    tp=2 or pp=2 rank holds half of the weights, plus at most the largest full weight (drawn whole, then sliced)."""
    whole, *halves = build_peaks(2, [MEASURED, [*MEASURED, "parallel.tp=2"], [*MEASURED, "parallel.pp=2"]])
    reference = whole[0]
    assert reference["peak_mib"] <= reference["weights_mib"] * 1.02
    for layout, ranks in zip(("tp2", "pp2"), halves):
        for rank in ranks:
            assert rank["weights_mib"] == pytest.approx(reference["weights_mib"] / 2, rel=0.1), layout
            assert rank["peak_mib"] <= rank["weights_mib"] + LARGEST_MIB + 0.02 * reference["peak_mib"], (layout, rank, reference)
            assert rank["peak_mib"] <= 0.6 * reference["peak_mib"], (layout, rank, reference)
