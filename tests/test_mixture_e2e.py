"""A two-source mixture launched end to end: it trains, reports its samples per source, and resumes on
another worker count reading the same samples."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest

from conftest import TINY_PRETRAIN, assert_same_training, forget_after, launch_in_process, resume_in_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

def test_a_mixture_trains_reports_its_sources_and_resumes_on_two_workers(ray_cluster, tmp_path):
    web = tmp_path / "web.jsonl"
    words = "the river stone carries light over a quiet field while slow clouds gather near old walls".split()
    rng = random.Random(0)
    web.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n" for _ in range(200)))
    mixture = f"data.sources=[{{path: 'builtin:pydoc', weight: 0.7}}, {{path: '{web}', weight: 0.3}}]"
    one_worker = launch_in_process(tmp_path, "mix", [*TINY_PRETRAIN, mixture, "cluster.num_workers=1", "parallel.zero_stage=0", "train.ckpt_every=3"])

    # 5 steps of 16 samples: 56 and 24 exactly (every prefix is within half a sample of its share).
    summary = json.loads((one_worker / "pretrain" / "summary.json").read_text())
    assert summary["consumed_samples"] == 80
    assert summary["consumed_by_source"] == {"builtin:pydoc": 56, str(web): 24}
    assert math.isfinite(summary["eval_loss"])  # the held-out split is a blend too
    state = json.loads((one_worker / "pretrain" / "step_0000003" / "manifest.json").read_text())["state"]
    assert state["consumed_samples"] == 48
    assert state["consumed_by_source"] == {"builtin:pydoc": 34, str(web): 14}  # 33.6 and 14.4, rounded by the blend

    resumed = tmp_path / "resumed"
    shutil.copytree(one_worker, resumed)
    forget_after(resumed, 3)
    resume_in_process(resumed, ["cluster.num_workers=2"])
    # Steps 4 and 5 on two data-parallel ranks read the samples one rank read: the same losses and updates.
    assert_same_training(one_worker, resumed, "a mixture resumed on 2 workers")
    assert json.loads((resumed / "pretrain" / "summary.json").read_text())["consumed_by_source"] == summary["consumed_by_source"]
