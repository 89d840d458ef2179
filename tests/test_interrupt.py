"""Ctrl-C (SIGINT) or SIGTERM (kill, a scheduler's preemption) during `raylm launch`: the workers stop, the launch
says how to continue and exits 128 + the signal, and every process it started ends with it."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest

from conftest import TINY_PRETRAIN, cli_here, finished_run
from faults import latest_step, wait_for


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum, said", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_the_run_says_how_to_resume_and_leaves_no_process(tmp_path, capsys, signum, said):
    run_dir = tmp_path / "runs" / "stopped"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        launch = subprocess.Popen(
            [sys.executable, "-m", "raylm.launcher.cli", "launch", "--name", "stopped", *TINY_PRETRAIN, "train.max_steps=100000", "cluster.num_workers=1",
             f"runs_dir={tmp_path / 'runs'}"],
            cwd=tmp_path, stdout=out, stderr=err,
        )
        try:
            wait_for(lambda: latest_step(run_dir) >= 2 or launch.poll() is not None, "step 2")
            assert launch.poll() is None, (tmp_path / "err.txt").read_text()
            started = psutil.Process(launch.pid).children(recursive=True)
            assert any("RayTrainWorker" in " ".join(p.cmdline()) for p in started)
            launch.send_signal(signum)
            assert launch.wait(timeout=120) == 128 + signum
        finally:
            if launch.poll() is None:
                launch.kill()
    assert (tmp_path / "err.txt").read_text().splitlines() == [f"raylm: {said}; continue with 'raylm resume {run_dir}'"]
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    code, status, _ = cli_here(capsys, "status", str(run_dir))
    assert code == 0 and "interrupted" in status


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ctrl_c_in_another_command_ends_it_with_130_and_no_resume_advice(tmp_path):
    """`raylm generate --interactive` waiting for a prompt: nothing there to resume."""
    run_dir = finished_run(tmp_path / "runs")
    generate = subprocess.Popen([sys.executable, "-m", "raylm.launcher.cli", "generate", str(run_dir), "--interactive"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "an empty line or Ctrl-D ends" in generate.stderr.readline()
        generate.send_signal(signal.SIGINT)
        assert generate.wait(timeout=60) == 130
    finally:
        if generate.poll() is None:
            generate.kill()
    assert generate.stderr.read().splitlines() == ["raylm: interrupted"]
