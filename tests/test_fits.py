"""Which stages of a run share one worker group (one Ray Train fit)."""

from __future__ import annotations

from dataclasses import replace

from raylm.configs.loader import load_config
from raylm.launcher.stages import fits


def test_consecutive_stages_with_the_same_workers_share_a_fit():
    run = load_config("tiny", [])
    assert fits(run, [0, 1]) == [[0, 1]]
    assert fits(run, [1]) == [[1]]


def test_another_worker_count_or_restart_budget_starts_a_new_fit():
    assert fits(load_config("tiny", ["stages.1.cluster.num_workers=1"]), [0, 1]) == [[0], [1]]
    assert fits(load_config("tiny", ["stages.1.cluster.cpus_per_worker=2"]), [0, 1]) == [[0], [1]]


def test_only_neighbours_share_a_fit():
    run = load_config("tiny", [])
    run.stages = [*run.stages, replace(run.stages[1], name="again")]
    assert fits(run, [0, 2]) == [[0], [2]]
    assert fits(run, [0, 1, 2]) == [[0, 1, 2]]
