"""A checkpoint written by one layout resumes on another, optimizer state included, and trains on as one worker does."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_same_training, forget_after, read_metrics
from gloo_spawn import resume_on_rank, run_on_gloo

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "source, then",
    [
        ("tp2pp2_run", ["cluster.num_workers=2", "parallel.tp=1", "parallel.pp=1", "parallel.zero_stage=3"]),
        ("spare_worker_run", ["cluster.num_workers=4", "cluster.min_workers=null", "parallel.tp=2", "parallel.zero_stage=1"]),
    ],
    ids=["tp2pp2-zero1-to-dp2-zero3", "dp2-zero2-to-tp2dp2-zero1"],
)
def test_resume_on_another_layout_trains_as_one_worker(single_worker, request, tmp_path, source, then):
    run_dir = tmp_path / "relayout"
    shutil.copytree(request.getfixturevalue(source), run_dir)
    forget_after(run_dir, 3)
    # The resume's ranks on gloo (the per-rank code Ray runs; no worker group to start).
    run_on_gloo(resume_on_rank, int(next(o for o in then if o.startswith("cluster.num_workers=")).split("=")[1]), run_dir, then)

    resharded = [r for r in read_metrics(run_dir, kind="event") if r.get("event") == "resharded"]
    assert len(resharded) == 1 and resharded[0]["step"] == 3
    # Steps 4 and 5 ran on the new layout from the old one's weights, Adam moments and schedule.
    assert_same_training(single_worker, run_dir, f"{source} then {then}")
    layout = json.loads((run_dir / "pretrain" / "summary.json").read_text())["layout"]
    assert (layout["tp"], layout["pp"]) == ((2, 1) if "parallel.tp=2" in then else (1, 1))
