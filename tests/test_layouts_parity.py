"""Every 3D layout on 4 ranks trains the same model as one worker: tp2 x pp2 through Ray, the others on 4 gloo
ranks (the per-rank code Ray runs, all layouts in one set of processes)."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_PRETRAIN, assert_same_training
from gloo_spawn import run_on_gloo, train_runs
from raylm.trainer.run_dir import stage_summary

pytestmark = pytest.mark.slow

LAYOUTS = {
    # Recomputing activations must not change a single loss: checked on the plain and the pipeline path.
    "tp2-dp2-zero2-recompute": ["parallel.tp=2", "parallel.zero_stage=2", "parallel.activation_checkpointing=true"],
    "tp2-dp2-zero3": ["parallel.tp=2", "parallel.zero_stage=3"],
    "pp2-dp2-zero1-recompute": ["parallel.pp=2", "parallel.zero_stage=1", "parallel.activation_checkpointing=true"],
    # Without ZeRO raylm clips by its own norm: the tied embedding, on both pipeline ends, counts once.
    "pp2-dp2-zero0": ["parallel.pp=2", "parallel.zero_stage=0"],
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    run_on_gloo(train_runs, 4, root, {name: [*TINY_PRETRAIN, "cluster.num_workers=4", *layout] for name, layout in LAYOUTS.items()})
    return root


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_worker(single_worker, layouts, name):
    run_dir = layouts / name
    assert_same_training(single_worker, run_dir, name)
    layout = stage_summary(run_dir, "pretrain")["layout"]
    tp = 2 if "tp2" in name else 1
    pp = 2 if "pp2" in name else 1
    assert layout["tp"] == tp and layout["pp"] == pp and layout["dp"] == 4 // (tp * pp)


def test_tp2_pp2_matches_one_worker(single_worker, tp2pp2_run):
    assert_same_training(single_worker, tp2pp2_run, "tp2-pp2-zero1")
    layout = json.loads((tp2pp2_run / "summary.json").read_text())["stages"][0]["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"]) == (2, 2, 1)


def test_untied_pipeline_with_recompute_matches_one_worker(tmp_path):
    """Recomputation covers only the blocks: the embedding, fed integer tokens, stays in autograd on stage 0. The
    reference has an untied output head too (the 1.3b preset's kind). Without ZeRO the pipeline clips by raylm's
    count of the gradient norm (DeepSpeed's left out every stage but the first: 1.23 where one worker has 1.63)."""
    untied = [*TINY_PRETRAIN, "model.tie_embeddings=false"]
    run_on_gloo(train_runs, 1, tmp_path, {"untied": [*untied, "cluster.num_workers=1", "parallel.zero_stage=0"]})
    run_on_gloo(train_runs, 2, tmp_path, {
        "untied-pp2": [*untied, "cluster.num_workers=2", "parallel.pp=2", "parallel.zero_stage=1", "parallel.activation_checkpointing=true"],
        "untied-pp2-zero0": [*untied, "cluster.num_workers=2", "parallel.pp=2", "parallel.zero_stage=0"]})
    assert_same_training(tmp_path / "untied", tmp_path / "untied-pp2", "untied pp2 with recompute")
    assert_same_training(tmp_path / "untied", tmp_path / "untied-pp2-zero0", "untied pp2 ZeRO-0")
