"""Distill stages on real DeepSpeed engines (2 gloo ranks, no Ray), with a teacher directory of another shape than
the student: ZeRO-3 (the student partitioned, the teacher whole on each rank) trains as ZeRO-0 does, and bf16
(the teacher cast to bf16) trains and reports its loss parts."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_SETTINGS, finished_run, losses, read_metrics
from gloo_spawn import run_on_gloo, train_stage_on_rank
from numerics import training_rel
from raylm.configs.loader import load_config, resolve_stage

pytestmark = pytest.mark.slow

STEPS = 3
LAYOUTS = {"zero0": ["parallel.zero_stage=0"], "zero3": ["parallel.zero_stage=3"],
           "bf16-zero2": ["parallel.zero_stage=2", "train.precision=bf16"]}


def _overrides(teacher: Path) -> list:
    """A student of half the teacher's width and depth (d_model 64, 2 layers against 128 and 4), from fresh weights."""
    return [*TINY_SETTINGS, f"train.max_steps={STEPS}", "cluster.num_workers=2", "model.d_model=64", "model.n_layer=2",
            "data.tokenizer=byte", f"stages=[{{name: student, kind: distill, teacher: {teacher}}}]"]


def _train_each_layout(rank: int, world_size: int, tmp: Path, teacher: Path) -> None:
    for name, layout in LAYOUTS.items():
        train_stage_on_rank(tmp / name, load_config("tiny", [*_overrides(teacher), *layout]), rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill-layouts")
    teacher = finished_run(root / "elsewhere") / "pretrain" / "final"
    run_on_gloo(_train_each_layout, 2, root, teacher)
    return root


def test_zero3_trains_the_student_as_zero0_does(runs):
    cfg = resolve_stage(load_config("tiny", _overrides(Path("."))[:-1]), 0)
    rel = training_rel(cfg.model, cfg.train.global_batch_size * cfg.model.max_seq_len, STEPS)
    expected, got = losses(runs / "zero0", "student"), losses(runs / "zero3", "student")
    assert len(expected) == len(got) == STEPS
    for step, (a, b) in enumerate(zip(expected, got), start=1):
        assert abs(a - b) <= rel * abs(a), f"step {step}: ZeRO-0 {a} vs ZeRO-3 {b}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_logs_its_loss_as_the_mix_of_its_parts(runs, layout):
    records = read_metrics(runs / layout, "student")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert r["kl"] > 0 and r["loss"] == pytest.approx(0.5 * 2.0**2 * r["kl"] + 0.5 * r["ce"], rel=1e-5), r
