"""A stage's timeline from the driver's clock and its records (issue 12: know where the time goes)."""

from __future__ import annotations

from raylm.launcher.timeline import stage_timeline


def _records(began: float, restart: bool = False) -> list:
    setup = {"process_group": 0.5, "data": 0.25, "model": 0.25}
    records = [{"kind": "start", "time": began + 8.0, "entered": began + 6.0, "setup_s": setup, "step": 0}]
    records += [{"kind": "train", "time": began + 9.0 + step, "step": step} for step in range(1, 4)]
    if restart:
        records += [{"kind": "start", "time": began + 20.0, "entered": began + 19.0, "setup_s": setup, "step": 2},
                    {"kind": "train", "time": began + 21.0, "step": 3}]
    return [*records, {"kind": "end", "time": records[-1]["time"] + 1.5, "step": 3, "finish_s": {"save_final": 1.0}}]


def test_the_phases_add_up_to_the_stage_wall_time():
    began = 1000.0
    timeline = stage_timeline([{"kind": "train", "time": began - 50, "step": 9}, *_records(began)], 3.0, began, began + 15.5)
    assert timeline == {
        "driver_data": 3.0, "workers_up": 6.0, "rank_setup": 2.0, "rank_setup_phases": {"process_group": 0.5, "data": 0.25, "model": 0.25},
        "first_step": 2.0, "steps": 2.0, "finish": 1.5, "finish_phases": {"save_final": 1.0}, "teardown": 2.0, "restarts": 0,
    }
    phases = ("workers_up", "rank_setup", "first_step", "steps", "finish", "teardown")
    assert sum(timeline[p] for p in phases) == 15.5  # fit() from start to end


def test_a_restart_counts_and_the_first_attempt_is_broken_down():
    timeline = stage_timeline(_records(0.0, restart=True), 1.0, 0.0, 30.0)
    assert timeline["restarts"] == 1 and timeline["workers_up"] == 6.0 and timeline["steps"] == 11.0


def test_a_fit_that_logged_no_end_has_no_timeline():
    assert stage_timeline(_records(0.0)[:-1], 1.0, 0.0, 30.0) == {}
