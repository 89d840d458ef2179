"""Real failures: killed, raising and hung workers, a killed driver, a corrupted checkpoint.

Every interrupted run must end with final weights bitwise equal to the
uninterrupted run (fp32, CPU, same layout) and a loss curve that repeats it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_PRETRAIN, cli_here, launch_in_process, losses, read_metrics
from faults import committed_step, latest_step, signal_worker, wait_for, when_step_reached, worker_pids
from gloo_spawn import run_on_gloo, train_runs
from raylm.trainer.checkpoint import MANIFEST, read_state, step_dir_name, step_dirs, verify

pytestmark = pytest.mark.slow

FAULTY = [*TINY_PRETRAIN, "train.max_steps=20", "train.ckpt_every=4", "fault.max_failures=2", "cluster.num_workers=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference, trained by the same per-rank code on gloo (Ray's ranks give the same bits; no worker group to start)."""
    root = tmp_path_factory.mktemp("ref")
    run_on_gloo(train_runs, 2, root, {"ref": FAULTY})
    return root / "ref"


def _events(run_dir: Path, event: str):
    return [r for r in read_metrics(run_dir, kind="event") if r.get("event") == event]


def assert_bitwise_equal_to(reference: Path, run_dir: Path) -> None:
    expected = load_file(str(reference / "pretrain" / "final" / "model.safetensors"))
    got = load_file(str(run_dir / "pretrain" / "final" / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # After each resume the logged losses repeat the uninterrupted ones exactly.
    by_step = {}
    for record in read_metrics(run_dir):
        by_step[record["step"]] = record["loss"]
    assert [by_step[s] for s in sorted(by_step)] == losses(reference)


def _break_storage_until_restart(run_dir: Path, ckpt_every: int) -> None:
    """A transient I/O error on the run directory: the stage's next two checkpoint directories are files until a
    new worker group starts, so making the next one (rank 0, before any rank writes into it) raises."""
    stage = run_dir / "pretrain"
    before = worker_pids(stage)
    blocked, step = [], (latest_step(run_dir) // ckpt_every + 1) * ckpt_every
    while len(blocked) < 2:
        path = stage / step_dir_name(step)
        try:
            path.open("x").close()
            blocked.append(path)
        except FileExistsError:  # the ranks, ahead of the driver's records, are saving it already: block a later one
            pass
        step += ckpt_every
    try:
        wait_for(lambda: worker_pids(stage) != before, "the worker group that replaces the failed one")
    finally:
        for path in blocked:
            path.unlink()


def assert_restarts_resume_from_the_newest_checkpoint(run_dir: Path, ckpt_every: int) -> list:
    """Each restart resumed from the newest checkpoint the failed group had committed, whatever step a fault hit:
    the last one it logged, or the next one if it died between committing and logging it."""
    restarts, newest = [], 0
    for record in read_metrics(run_dir, kind="event"):
        if record["event"] == "checkpoint":
            newest = max(newest, record["step"])
        elif record["event"] == "restart":
            assert record["step"] in (newest, newest + ckpt_every), (record, newest)
            assert record["steps_lost"] == max(0, record["last_logged_step"] - record["step"])
            restarts.append(record)
            newest = record["step"]
    return restarts


def test_killed_raising_and_hung_workers_restart_and_finish_identically(ray_cluster, uninterrupted, tmp_path):
    """A SIGKILLed worker, then a worker that raises, then a SIGSTOPped one, each after the previous restart:
    three restarts, same result."""
    run_dir = tmp_path / "faulty"
    injected = []

    def after_restart(count: int, step: int) -> None:
        wait_for(lambda: len(_events(run_dir, "restart")) >= count and latest_step(run_dir) >= step, f"restart {count} and step {step}")

    def kill_raise_freeze() -> None:
        injected.append(("kill", signal_worker(run_dir / "pretrain", signal.SIGKILL)))
        after_restart(1, 9)
        injected.append(("raise", 0))
        _break_storage_until_restart(run_dir, ckpt_every=4)
        after_restart(2, 13)
        injected.append(("freeze", signal_worker(run_dir / "pretrain", signal.SIGSTOP)))

    injector = when_step_reached(run_dir, 6, kill_raise_freeze)
    launch_in_process(tmp_path, "faulty", [*FAULTY, "fault.hang_timeout_s=10", "fault.max_failures=3"])
    injector.join(timeout=60)
    assert injector.error is None, injector.error
    # Each fault landed while the run still had steps to go (20 steps; the faults come at steps >= 6, 9 and 13).
    assert [what for what, pid in injected if pid is not None] == ["kill", "raise", "freeze"]
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "pretrain" / "logs").glob("rank_*.log"))
    assert re.search(r"NotADirectoryError: .*Not a directory: .*pretrain/step_\d+/", logs)
    restarts = assert_restarts_resume_from_the_newest_checkpoint(run_dir, ckpt_every=4)
    # The kill and the freeze land wherever the ranks are when the driver's records show the trigger step; those
    # lag by up to the driver's 0.5 s drain (several steps of this model), so either may land right after a
    # checkpoint and lose nothing. The raising rank fails writing step 12's checkpoint, four steps past step 8's.
    assert len(restarts) == 3 and restarts[1]["steps_lost"] == 4, restarts
    # The frozen rank's peers stopped at their next collective; their watchdogs, not Ray, ended the group.
    assert re.search(r"no progress for \d+ s \(fault.hang_timeout_s=10\); exiting", logs)
    assert_bitwise_equal_to(uninterrupted, run_dir)
    # train.keep_last=2: the checkpoints each failed group left behind are gone too.
    assert sorted(p.name for p in (run_dir / "pretrain").glob("step_*")) == ["step_0000016", "step_0000020"]


def _stall_a_checkpoint_write(run_dir: Path, steps, rank: int = 1) -> int:
    """Make the last file ``rank`` writes of a checkpoint (its RNG state) a FIFO nobody reads, so that the rank's
    background write of it never ends, like a write to a stalled disk; the first of ``steps`` whose file the test
    gets to before the writer does. Returns that step."""
    for step in steps:
        target = run_dir / "pretrain" / step_dir_name(step) / f"rng_rank{rank:05d}.pt"
        wait_for(lambda: target.parent.is_dir(), f"checkpoint {step}'s directory", poll_s=0.001)
        try:
            os.mkfifo(target)
            return step
        except FileExistsError:  # written already: try the next checkpoint
            continue
    raise AssertionError(f"rank {rank} wrote its RNG state of checkpoints {steps} before the test could stall it")


def test_a_worker_killed_during_an_async_save_resumes_from_the_previous_checkpoint_and_one_killed_in_sft_restarts_sft_alone(
        ray_cluster, uninterrupted, tmp_path):
    """pretrain -> sft in one worker group, pretrain with train.async_checkpoint (one launch, two faults):

    - in pretrain, one rank's write of a checkpoint stalls while training goes on past it; that rank is then
      SIGKILLed. The checkpoint never committed: the restart skips it, resumes from the one before, and pretrain
      ends as the uninterrupted (synchronous) run did;
    - in sft (which keeps no checkpoints), a worker is SIGKILLed: the new group skips the finished pretrain and
      starts sft over from pretrain's final weights, not from the pretrain checkpoint Ray Train registered last."""
    run_dir = tmp_path / "async"
    stalled: dict = {}
    two_stages = [*FAULTY, "train.async_checkpoint=true",
                  "stages=[{name: pretrain, kind: pretrain}, {name: sft, kind: sft, data: {source: 'builtin:pydoc-sft'}, "
                  "train: {max_steps: 12, ckpt_every: 0}}]"]

    def stall_then_kill_then_kill_in_sft() -> None:
        step = stalled["step"] = _stall_a_checkpoint_write(run_dir, (8, 12, 16))
        wait_for(lambda: latest_step(run_dir) >= step + 2, f"training past the stalled checkpoint {step}")
        stalled["committed"] = (run_dir / "pretrain" / step_dir_name(step) / MANIFEST).exists()
        stalled["killed"] = signal_worker(run_dir / "pretrain", signal.SIGKILL)
        wait_for(lambda: latest_step(run_dir, "sft") >= 2, "step 2 of sft")
        stalled["killed_in_sft"] = signal_worker(run_dir / "sft", signal.SIGKILL)

    injector = when_step_reached(run_dir, 1, stall_then_kill_then_kill_in_sft)
    launch_in_process(tmp_path, "async", two_stages)
    injector.join(timeout=60)
    assert injector.error is None, injector.error
    assert stalled["killed"] is not None and not stalled["committed"] and stalled["killed_in_sft"] is not None, stalled
    step = stalled["step"]
    skipped = {event["path"]: event["reason"] for event in _events(run_dir, "skipped_checkpoint")}
    assert skipped[str(run_dir / "pretrain" / step_dir_name(step))].startswith("no manifest"), skipped
    assert [r["step"] for r in _events(run_dir, "restart")] == [step - 4]
    assert all(r["async"] for r in _events(run_dir, "checkpoint"))
    assert_bitwise_equal_to(uninterrupted, run_dir)
    assert sorted(p.name for p in (run_dir / "pretrain").glob("step_*")) == ["step_0000016", "step_0000020"]

    # The sft restart started pretrain no more: its two starts are the first group's and the one after its kill.
    assert len(read_metrics(run_dir, "pretrain", kind="start")) == 2
    restarts = [r for r in read_metrics(run_dir, "sft", kind="event") if r["event"] in ("restart", "skipped_checkpoint")]
    assert [(r["event"], r["step"]) for r in restarts] == [("restart", 0)], restarts
    # Both attempts' first step started from the same weights on the same batch.
    first_losses = [r["loss"] for r in read_metrics(run_dir, "sft") if r["step"] == 1]
    assert len(first_losses) == 2 and first_losses[0] == first_losses[1]
    assert json.loads((run_dir / "summary.json").read_text())["stages"][1]["steps"] == 12


def test_middle_pipeline_stage_is_not_taken_for_hung(tmp_path):
    """pp=3: the middle stage never reads a batch, yet trains on past fault.hang_timeout_s (its watchdog would end
    its process, and the run with it: the ranks run on gloo, with no restart to hide it)."""
    hang_timeout = 10  # the process groups wait a second more: shorter risks startup skew between workers on 2 cores
    run_on_gloo(train_runs, 3, tmp_path, {"pp3": [
        *TINY_PRETRAIN, "model.n_layer=6", "parallel.pp=3", "parallel.zero_stage=1", "cluster.num_workers=3",
        "train.max_steps=100", "train.log_every=10", f"fault.hang_timeout_s={hang_timeout}"]})
    run_dir = tmp_path / "pp3"
    assert losses(run_dir)[-1] < losses(run_dir)[0]
    start, end = read_metrics(run_dir, kind="start")[0], read_metrics(run_dir, kind="end")[0]
    assert end["step"] == 100
    # Only a stage that outlasts the timeout shows the heartbeat works (before the fix rank 1 exited here).
    assert end["time"] - start["time"] > hang_timeout, "training ended before the hang timeout; raise train.max_steps"


def _wait_until_gone(pids, timeout: float = 120) -> None:
    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except OSError:
            return True
        return False

    wait_for(lambda: all(gone(pid) for pid in pids), f"workers {pids} to exit", timeout)


def _raylm(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raylm.launcher.cli", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_driver_resumes_past_a_corrupted_checkpoint(ray_cluster, uninterrupted, tmp_path, capsys, monkeypatch):
    overrides = [o for o in FAULTY if not o.startswith("logging.wandb")] + ["logging.wandb.mode=offline"]
    run_dir = tmp_path / "runs" / "driver"
    driver = _raylm("launch", "--name", "driver", *overrides, cwd=tmp_path)
    # Watched on the ranks' own output: the driver's records, relayed through Ray, can trail the ranks by the whole
    # stage on a loaded machine. The ranks are frozen at once (ten more steps of this tiny model take a second or
    # two), then the driver is given the time to write its first records (its W&B run has started by then) and killed.
    wait_for(lambda: committed_step(run_dir) >= 8 or driver.poll() is not None, "checkpoint 8", timeout=600)
    assert driver.poll() is None, driver.communicate()[1][-2000:]
    workers = worker_pids(run_dir / "pretrain")
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: latest_step(run_dir) >= 1 or driver.poll() is not None, "the driver's first records", timeout=300)
    assert driver.poll() is None, driver.communicate()[1][-2000:]
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    _wait_until_gone(workers)
    assert not (run_dir / "pretrain" / "final").exists()
    # A driver dies with the records it had not written yet (on a loaded machine, several steps' worth): here all
    # after step 2. The resumed rank 0 hands back those up to its checkpoint; the redone steps log the rest.
    metrics = run_dir / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 2]
    metrics.write_text("".join(line + "\n" for line in kept))

    complete = [p for p in step_dirs(run_dir / "pretrain") if verify(p) is None]
    assert len(complete) >= 2
    newest, previous_step = complete[0], read_state(complete[1]).step
    shard = next(p for p in sorted((newest / "deepspeed").iterdir()) if p.stat().st_size > 1000)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    # The dead driver's run is looked at and resumed by the CLI in this process, on the session's cluster.
    monkeypatch.chdir(tmp_path)
    code, out, err = cli_here(capsys, "status", "driver")
    assert code == 0 and "interrupted" in out, out + err
    code, out, err = cli_here(capsys, "resume", "driver", "--set", "train.log_every=1")
    assert code == 0, err[-3000:]
    # Workers frozen mid-save leave a newer step directory without a manifest; it is skipped before the corrupted one.
    skipped = {event["path"]: event["reason"] for event in _events(run_dir, "skipped_checkpoint")}
    assert "sha256" in skipped.pop(str(newest))
    assert all(reason.startswith("no manifest") for reason in skipped.values()), skipped
    assert [r["step"] for r in _events(run_dir, "resumed")] == [previous_step]
    assert_bitwise_equal_to(uninterrupted, run_dir)
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    run_id = (run_dir / "pretrain" / "wandb_id").read_text()
    assert len(wandb_runs) == 2 and all(p.name.endswith(run_id) for p in wandb_runs)
