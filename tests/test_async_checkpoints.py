"""Asynchronous checkpoints (``train.async_checkpoint``) on 2 gloo ranks with real DeepSpeed engines: the same
files, byte for byte, as synchronous ones of the same training (the layout-free copy gathered on the writer
thread included), a resume from one continues exactly (pp2 with the embedding tied across its two stages too, and
from a pp2 checkpoint as raylm wrote it before DeepSpeed's files held that embedding), and one on another layout
reshards from it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import TINY_PRETRAIN, read_metrics
from gloo_spawn import run_on_gloo, train_saved_stage, train_stage_on_rank
from raylm.configs.loader import load_config
from raylm.trainer import run_dir as rundir
from raylm.trainer.checkpoint import MANIFEST, RECORDS_FILE, step_dir_name

pytestmark = pytest.mark.slow

LAYOUTS = {"zero2": ["parallel.zero_stage=2"], "pp2": ["parallel.pp=2", "parallel.zero_stage=1"],  # the tiny preset ties the embeddings
           "tp2": ["parallel.tp=2", "parallel.zero_stage=1"]}
RUN = [*TINY_PRETRAIN, "cluster.num_workers=2", "train.max_steps=4", "train.ckpt_every=2"]
RESHARD = ("zero2", "tp2")
"""A resume of the first layout's asynchronous run on the second one's."""


def _cut_back(run_dir: Path, copy: Path) -> Path:
    """A copy of ``run_dir`` as a restart after its step-2 checkpoint finds it; returns that checkpoint in the copy."""
    shutil.copytree(run_dir, copy)
    for done in ("final", "summary.json", step_dir_name(4)):
        path = copy / "pretrain" / done
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return copy / "pretrain" / step_dir_name(2)


def _drop_tied_embedding(checkpoint: Path) -> None:
    """Make a pp2 checkpoint what raylm wrote before it ran the tied embedding as a module: DeepSpeed saved it in
    no layer file (layer 0), only the layout-free copy held it."""
    import json

    manifest = json.loads((checkpoint / MANIFEST).read_text())
    for rel in [rel for rel in manifest["files"] if rel.startswith("deepspeed/layer_00-")]:
        (checkpoint / rel).unlink()
        del manifest["files"][rel]
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def _train_each_way(rank: int, world_size: int, root: Path) -> None:
    """Per layout: a run with synchronous checkpoints, the same with asynchronous ones, and a copy of the
    asynchronous run cut back to its step-2 checkpoint and trained again from there (a restart); for pp2, also
    a copy of the synchronous run cut back the same way, its checkpoint made as an older raylm wrote it; then a
    copy of one asynchronous run cut back the same way and trained on another layout (``RESHARD``)."""
    for name, layout in LAYOUTS.items():
        for mode in ("sync", "async"):
            run = load_config("tiny", [*RUN, *layout, f"train.async_checkpoint={mode == 'async'}"])
            train_stage_on_rank(root / f"{name}-{mode}", run, rank)
        resumed = root / f"{name}-resumed"
        if rank == 0:
            _cut_back(root / f"{name}-async", resumed)
        dist.barrier()
        train_saved_stage(resumed)
    legacy = root / "pp2-legacy"
    if rank == 0:
        _drop_tied_embedding(_cut_back(root / "pp2-sync", legacy))
    dist.barrier()
    train_saved_stage(legacy)
    source, then = RESHARD
    resharded = root / f"{source}-to-{then}"
    if rank == 0:
        _cut_back(root / f"{source}-async", resharded)
        run = load_config("tiny", [*RUN, *LAYOUTS[then], "train.async_checkpoint=true"])
        run.name = resharded.name
        rundir.save_config(resharded, run)
    dist.barrier()
    train_saved_stage(resharded)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("async")
    run_on_gloo(_train_each_way, 2, root)
    return root


def _manifest(run_dir: Path, step: int) -> dict:
    import json

    return json.loads((run_dir / "pretrain" / step_dir_name(step) / MANIFEST).read_text())


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_async_checkpoints_hold_the_bytes_sync_ones_do(trained, layout):
    sync, background = trained / f"{layout}-sync", trained / f"{layout}-async"
    for step in (2, 4):
        expected, got = _manifest(sync, step), _manifest(background, step)
        assert got["state"] == expected["state"]
        # rank 0's records differ in their times (and where the previous checkpoint's event falls)
        expected["files"].pop(RECORDS_FILE), got["files"].pop(RECORDS_FILE)
        assert got["files"] == expected["files"]
    saves = [r for r in read_metrics(background, kind="event") if r["event"] == "checkpoint"]
    assert [(r["step"], r["async"]) for r in saves] == [(2, True), (4, True)]
    assert all(0 < r["stall_s"] <= r["seconds"] for r in saves)
    assert [r["async"] for r in read_metrics(sync, kind="event") if r["event"] == "checkpoint"] == [False, False]


def _repeats_the_run(uninterrupted: Path, resumed: Path) -> None:
    """``resumed`` logged steps 3 and 4 with the losses of ``uninterrupted`` and ends with its weights, bitwise."""
    assert [r["step"] for r in read_metrics(resumed, kind="event") if r["event"] == "resumed"] == [2]
    losses = {r["step"]: r["loss"] for r in read_metrics(uninterrupted)}
    redone = [(r["step"], r["loss"]) for r in read_metrics(resumed)][-2:]
    assert redone == [(3, losses[3]), (4, losses[4])]
    expected = load_file(str(uninterrupted / "pretrain" / "final" / "model.safetensors"))
    got = load_file(str(resumed / "pretrain" / "final" / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_resume_from_an_async_checkpoint_repeats_the_run(trained, layout):
    _repeats_the_run(trained / f"{layout}-sync", trained / f"{layout}-resumed")
    if layout == "pp2":
        # DeepSpeed's files hold the tied embedding as the first stage's layer 0, and the last stage's copy is
        # broadcast from it on load. Without it both resumed with the seed's embedding (the masters had the trained one).
        assert list((trained / "pp2-async" / "pretrain" / step_dir_name(2) / "deepspeed").glob("layer_00-*"))


@pytest.mark.timeout(900)
def test_a_pp2_checkpoint_without_the_tied_embedding_resumes_from_its_layout_free_copy(trained):
    legacy = trained / "pp2-legacy"
    resharded = [r for r in read_metrics(legacy, kind="event") if r["event"] == "resharded"]
    assert [(r["step"], r["from_layout"] == r["to_layout"]) for r in resharded] == [(2, True)]
    _repeats_the_run(trained / "pp2-sync", legacy)


@pytest.mark.timeout(900)
def test_another_layout_reshards_an_async_checkpoint(trained):
    source, then = RESHARD
    resharded = trained / f"{source}-to-{then}"
    assert [r["step"] for r in read_metrics(resharded, kind="event") if r["event"] == "resharded"] == [2]
    # Steps 3 and 4 on the new layout from the old one's weights, Adam moments and schedule: the losses of a run
    # trained on the new layout throughout, but for the summation order.
    losses = {r["step"]: r["loss"] for r in read_metrics(trained / f"{then}-sync")}
    redone = [(r["step"], r["loss"]) for r in read_metrics(resharded)][-2:]
    assert redone == [(3, pytest.approx(losses[3], rel=1e-4)), (4, pytest.approx(losses[4], rel=1e-4))]
