"""2 Ray workers under each ZeRO stage train exactly like 1 worker (fp32, same global batch)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import TINY_PRETRAIN, launch_in_process, losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_worker(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return launch_in_process(tmp, "single", [*TINY_PRETRAIN, "cluster.num_workers=1", "parallel.zero_stage=0"])


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_two_workers_match_one_worker(single_worker, tmp_path, zero_stage):
    run_dir = launch_in_process(tmp_path, f"zero{zero_stage}", [*TINY_PRETRAIN, "cluster.num_workers=2", f"parallel.zero_stage={zero_stage}"])
    reference, sharded = losses(single_worker), losses(run_dir)
    assert len(sharded) == len(reference) == 5
    for step, (a, b) in enumerate(zip(reference, sharded), start=1):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: 1 worker {a} vs 2 workers ZeRO-{zero_stage} {b}"
    assert reference[-1] < reference[0]  # it learns

    ref_weights = load_file(str(single_worker / "pretrain" / "final" / "model.safetensors"))
    weights = load_file(str(run_dir / "pretrain" / "final" / "model.safetensors"))
    assert ref_weights.keys() == weights.keys()
    for name in ref_weights:
        assert (ref_weights[name] - weights[name]).abs().max().item() < 1e-5, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"][0]["layout"]["zero_stage"] == zero_stage
