"""2 Ray workers under each ZeRO stage train exactly like 1 worker (fp32, same global batch).

ZeRO-2 (the default stage) on 2 training workers is checked by test_elastic's spare-worker run.
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY_PRETRAIN, assert_same_training, launch_in_process, losses

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero_stage", [0, 1, 3])
def test_two_workers_match_one_worker(single_worker, tmp_path, zero_stage):
    run_dir = launch_in_process(tmp_path, f"zero{zero_stage}", [*TINY_PRETRAIN, "cluster.num_workers=2", f"parallel.zero_stage={zero_stage}"])
    assert_same_training(single_worker, run_dir, f"2 workers ZeRO-{zero_stage}")
    reference = losses(single_worker)
    assert reference[-1] < reference[0]  # it learns
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"][0]["layout"] == {"tp": 1, "pp": 1, "dp": 2, "zero_stage": zero_stage}
