"""2 ranks under each ZeRO stage train exactly like 1 worker (fp32, same global batch): on gloo, the per-rank code
Ray runs, every stage in one set of processes.

ZeRO-2 (the default stage) on 2 Ray workers is checked by test_elastic's spare-worker run.
"""

from __future__ import annotations

import pytest

from conftest import TINY_PRETRAIN, assert_same_training, losses
from gloo_spawn import run_on_gloo, train_runs
from raylm.trainer.run_dir import stage_summary

pytestmark = pytest.mark.slow

ZERO_STAGES = [0, 1, 3]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    run_on_gloo(train_runs, 2, root, {f"zero{stage}": [*TINY_PRETRAIN, "cluster.num_workers=2", f"parallel.zero_stage={stage}"]
                                      for stage in ZERO_STAGES})
    return root


@pytest.mark.parametrize("zero_stage", ZERO_STAGES)
def test_two_workers_match_one_worker(single_worker, two_ranks, zero_stage):
    run_dir = two_ranks / f"zero{zero_stage}"
    assert_same_training(single_worker, run_dir, f"2 workers ZeRO-{zero_stage}")
    reference = losses(single_worker)
    assert reference[-1] < reference[0]  # it learns
    assert stage_summary(run_dir, "pretrain")["layout"] == {"tp": 1, "pp": 1, "dp": 2, "zero_stage": zero_stage}
