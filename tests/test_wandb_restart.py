"""README: each restart is logged to W&B with the step it resumed from, and every metric is plotted
against ``trainer/step``, so a rewind to a checkpoint never hits W&B's monotonic-step rule; the driver
owns the W&B run, so a killed worker loses nothing of it.

One small run (20 steps, a checkpoint every 8, 2 workers) whose rank 1 is SIGKILLed once checkpoint 8 has
committed and the driver has logged a later step; what W&B recorded is read back from the offline run files.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import TINY_PRETRAIN, launch_in_process
from faults import committed_step, latest_step, wait_for, when_step_reached, worker_pids
from wandb_records import read_run

pytestmark = pytest.mark.slow

RESTARTED = [
    *(o for o in TINY_PRETRAIN if not o.startswith("logging.wandb")), "logging.wandb.mode=offline",
    "train.max_steps=20", "train.ckpt_every=8", "fault.max_failures=1", "cluster.num_workers=2",
    "train.precision=fp32", "cluster.use_gpu=false",
]


@pytest.mark.timeout(600)
def test_a_restart_reaches_wandb_and_every_metric_is_plotted_against_trainer_step(ray_cluster, tmp_path):
    run_dir = tmp_path / "restarted"
    # Step 0: the trigger's thread starts the kill at once (it waits for the ranks itself) and keeps its error.
    killer = when_step_reached(run_dir, 0, lambda: _kill_rank_1_after_a_step_logged_past(run_dir, 8))
    launch_in_process(tmp_path, "restarted", RESTARTED)
    killer.join(timeout=60)
    assert not killer.is_alive() and killer.error is None, killer.error
    check_wandb_after_one_restart(run_dir)


def _settled_latest_step(run_dir: Path, quiet_s: float = 1.0) -> int:
    """The driver's latest logged step once it has not changed for ``quiet_s``."""
    step, since = latest_step(run_dir), time.time()
    while time.time() - since < quiet_s:
        time.sleep(0.05)
        now = latest_step(run_dir)
        if now != step:
            step, since = now, time.time()
    return step


def _kill_rank_1_after_a_step_logged_past(run_dir: Path, checkpoint: int) -> None:
    """SIGKILL rank 1 once ``checkpoint`` has committed and the driver has logged a later step. The driver's records
    can trail the ranks by the rest of the stage on a loaded machine, so the ranks are frozen (SIGSTOP) while the
    records catch up; frozen before their first step past the checkpoint, they go on a moment and are frozen again."""
    stage = run_dir / "pretrain"
    wait_for(lambda: committed_step(run_dir) >= checkpoint, f"checkpoint {checkpoint}", timeout=600)
    while True:
        ranks = worker_pids(stage)
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        if _settled_latest_step(run_dir) > checkpoint:
            os.kill(ranks[1], signal.SIGKILL)
            os.kill(ranks[0], signal.SIGCONT)
            return
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.25)  # a step or two of this model on a quiet machine; the stage has 11 more


def check_wandb_after_one_restart(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (restart,) = [r for r in records if r.get("event") == "restart"]
    max_steps = next(r["max_steps"] for r in records if r.get("kind") == "start")
    checkpoints = [r["step"] for r in records[: records.index(restart)] if r.get("event") == "checkpoint"]
    assert checkpoints and restart["step"] == max(checkpoints)
    assert restart["last_logged_step"] > restart["step"]

    # The driver owns the stage's W&B run, so the worker restart neither starts another nor loses what was logged.
    run_id = (run_dir / "pretrain" / "wandb_id").read_text()
    (offline,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert offline.name.endswith(f"-{run_id}")
    wandb_run = read_run(offline)
    logged = {key for row in wandb_run.history for key in row if not key.startswith("_")} - {"trainer/step"}
    assert {key: wandb_run.step_metric(key) for key in logged} == {key: "trainer/step" for key in logged}
    assert {"train/loss", "event/steps_lost", "start/world_size", "end/final_loss"} <= logged

    # The restart row: the step it resumed from and the logged steps lost, as in metrics.jsonl.
    (row,) = [r for r in wandb_run.history if "event/steps_lost" in r]
    assert row["trainer/step"] == restart["step"]
    assert row["event/steps_lost"] == restart["steps_lost"] == restart["last_logged_step"] - restart["step"]
    assert row["event/last_logged_step"] == restart["last_logged_step"]

    # Every step the killed group logged is there, and after the rewind every step is logged again, below
    # the step W&B had already seen: exactly what metrics.jsonl holds, in its order.
    logged_losses = [(r["trainer/step"], r["train/loss"]) for r in wandb_run.history if "train/loss" in r]
    assert logged_losses == [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    assert [step for step, _ in logged_losses] == [*range(1, restart["last_logged_step"] + 1), *range(restart["step"] + 1, max_steps + 1)]
