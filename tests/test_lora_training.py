"""LoRA stages on real DeepSpeed engines (2 gloo ranks, no Ray): ZeRO 0, 1 and 2 (1 and 2 under bf16) train only the adapters,
checkpoint only them and their optimizer state, resume exactly, and end with the base's dense weights plus the update;
also with activation checkpointing, whose wrapper renames the parameters DeepSpeed sees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import CHECKPOINT_AT_3, forget_after, losses, read_metrics
from gloo_spawn import run_on_gloo
from numerics import assert_close, training_rel, worst_case
from raylm.configs.loader import load_config, resolve_stage
from raylm.errors import UserError
from raylm.parallelism.layout_free import layout_free_locations
from raylm.models.lora import ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_WEIGHTS_FILE, peft_name
from raylm.trainer import run_dir as rundir
from raylm.trainer.session import LocalSession
from raylm.trainer.worker import StageTrainer, build_dense_model, build_stage_model

pytestmark = pytest.mark.slow

LORA_PRETRAIN = [*CHECKPOINT_AT_3, "data.tokenizer=byte", "cluster.num_workers=2",
                 "stages=[{name: pretrain, kind: pretrain, lora: {rank: 4, alpha: 8, targets: [wq, wv, w2]}}]"]
# Dropout draws from the RNG states a same-layout resume restores; another layout draws other masks (README),
# so zero2, which the resumes on other layouts continue, runs without it.
DROPOUT = "stages.0.lora.dropout=0.1"
# Each run's directory name -> its layout; every one is also resumed at step 3 on its own layout.
LAYOUTS = {"zero0": ["parallel.zero_stage=0", DROPOUT], "zero1": ["parallel.zero_stage=1", DROPOUT], "zero2": ["parallel.zero_stage=2"],
           "bf16-zero1": ["parallel.zero_stage=1", "train.precision=bf16", DROPOUT],  # DeepSpeed's BF16_Optimizer (bf16 ZeRO-0 too)
           "bf16-zero2": ["parallel.zero_stage=2", "train.precision=bf16", DROPOUT],
           "zero1-recompute": ["parallel.zero_stage=1", "parallel.activation_checkpointing=true", DROPOUT]}


def _train(run_dir: Path, overrides: list, rank: int) -> None:
    """Write the run's config (rank 0) and train its one stage on this rank, resuming from its newest checkpoint."""
    run = load_config("tiny", [*LORA_PRETRAIN, *overrides])
    if rank == 0:
        run.name = run_dir.name
        run_dir.mkdir(exist_ok=True)
        rundir.save_config(run_dir, run)
    dist.barrier()
    StageTrainer(run_dir, 0, lambda stage_dir, cfg: LocalSession(stage_dir, cfg.train.keep_last), torch.device("cpu")).run_loop()


def _train_and_resume(rank: int, world_size: int, tmp: Path) -> None:
    for name, layout in LAYOUTS.items():
        run_dir, resumed = tmp / name, tmp / f"{name}-resumed"
        _train(run_dir, layout, rank)
        if rank == 0:
            shutil.copytree(run_dir, resumed)
            forget_after(resumed, 3)
        dist.barrier()
        _train(resumed, layout, rank)
    # Another layout resumes through the layout-free copy, which holds the adapters alone.
    resharded = tmp / "zero2-as-zero1"
    if rank == 0:
        shutil.copytree(tmp / "zero2", resharded)
        forget_after(resharded, 3)
    dist.barrier()
    _train(resharded, ["parallel.zero_stage=1"], rank)
    # Checkpoints of other LoRA settings are refused, never loaded into adapters of another shape.
    other = tmp / "zero0-other-lora"
    if rank == 0:
        shutil.copytree(tmp / "zero0", other)
    dist.barrier()
    with pytest.raises(UserError, match=r"written with stages.0.lora=\{'rank': 4, .*this stage has \{'rank': 2, "):
        _train(other, [*LAYOUTS["zero0"], "stages.0.lora.rank=2"], rank)


def _resume_on_one_rank(rank: int, world_size: int, tmp: Path) -> None:
    """The 2-rank ZeRO-2 run's step 3 continued by one rank, as after an elastic shrink."""
    shrunk = tmp / "zero2-on-one-rank"
    shutil.copytree(tmp / "zero2", shrunk)
    forget_after(shrunk, 3)
    _train(shrunk, ["parallel.zero_stage=2", "cluster.num_workers=1"], rank)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    run_on_gloo(_train_and_resume, 2, root)
    run_on_gloo(_resume_on_one_rank, 1, root)
    return root


def _final(run_dir: Path):
    return load_file(str(run_dir / "pretrain" / "final" / "model.safetensors"))


def _cfg():
    return resolve_stage(load_config("tiny", LORA_PRETRAIN), 0)


def _cfg_lora():
    return load_config("tiny", LORA_PRETRAIN).stages[0].lora


def _base(run_dir: Path):
    """The stage's initial weights: a first stage's seeded init."""
    return build_dense_model(_cfg(), None).state_dict()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", LAYOUTS)
def test_lora_trains_the_adapters_alone_and_writes_dense_weights(lora_runs, name):
    run_dir = lora_runs / name
    final, base = _final(run_dir), _base(run_dir)
    adapter = run_dir / "pretrain" / "final" / ADAPTER_DIR
    assert (adapter / ADAPTER_CONFIG_FILE).is_file()
    adapters = load_file(str(adapter / ADAPTER_WEIGHTS_FILE))
    assert len(adapters) == 4 * 3 * 2  # 4 blocks x 3 projections x (A, B)
    lora = _cfg_lora()
    targets = (".attention.wq.", ".attention.wv.", ".feed_forward.w2.")
    for name, weight in final.items():
        if any(t in name for t in targets):
            a, b = (adapters[peft_name(name.replace(".weight", f".lora_{ab}.weight"))] for ab in "AB")
            assert b.abs().max() > 0, f"{name}: B never trained"
            # The unrounded base (also under bf16) plus the adapters' update.
            assert_close(weight, base[name] + lora.alpha / lora.rank * (b @ a), name, worst_case(lora.rank + 1))
        else:
            assert torch.equal(weight, base[name]), f"{name} is frozen but changed"
    assert len(losses(run_dir)) == 5
    adapted = build_stage_model(_cfg(), _cfg_lora(), None)
    expected = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert read_metrics(run_dir, kind="end")[0]["trainable_params"] == expected


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", LAYOUTS)
def test_lora_checkpoints_hold_adapters_and_their_optimizer_state_only(lora_runs, name):
    step = lora_runs / name / "pretrain" / "step_0000003"
    layout_free = {key for kind in ("param", "exp_avg", "exp_avg_sq") for key in layout_free_locations(step / "layout_free", kind)}
    assert layout_free and all(".lora_" in key for key in layout_free), sorted(layout_free)[:4]
    module = torch.load(step / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all(".lora_" in key for key in module), sorted(module)[:4]
    # Adam's moments (and ZeRO's flat fp32 copies) of the adapters only: the whole checkpoint is a fraction of the frozen base.
    base_bytes = sum(t.numel() * t.element_size() for t in _base(step).values())
    checkpoint_bytes = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
    assert checkpoint_bytes < base_bytes / 4, (checkpoint_bytes, base_bytes)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", LAYOUTS)
def test_lora_resume_repeats_the_uninterrupted_run(lora_runs, name):
    run_dir, resumed = lora_runs / name, lora_runs / f"{name}-resumed"
    assert [r["step"] for r in read_metrics(resumed, kind="event") if r.get("event") == "resumed"] == [3]
    assert losses(resumed) == losses(run_dir)
    expected, got = _final(run_dir), _final(resumed)
    assert all(torch.equal(got[name], weight) for name, weight in expected.items())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("resumed", ["zero2-as-zero1", "zero2-on-one-rank"])
def test_lora_resumes_on_another_layout(lora_runs, resumed):
    run_dir, resharded = lora_runs / "zero2", lora_runs / resumed
    assert [r["step"] for r in read_metrics(resharded, kind="event") if r.get("event") == "resharded"] == [3]
    cfg = _cfg()
    rel = training_rel(cfg.model, cfg.train.global_batch_size * cfg.model.max_seq_len, 5)
    for a, b in zip(losses(run_dir), losses(resharded)):
        assert abs(a - b) <= rel * abs(a)
    base, expected, got = _base(run_dir), _final(run_dir), _final(resharded)
    for name, weight in expected.items():
        update = weight - base[name]
        assert (got[name] - weight).norm() <= rel * update.norm(), name
