"""Ctrl-C (SIGINT) or SIGTERM (kill, a scheduler's preemption) during `raylm launch`: the workers stop, the launch
says how to continue and exits 128 + the signal, and every process it started ends with it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import TINY_PRETRAIN, cli_here, finished_run
from faults import latest_step, wait_for

SIGNALS = {"interrupted": signal.SIGINT, "terminated": signal.SIGTERM}


def _launch(tmp_path: Path, name: str) -> subprocess.Popen:
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "raylm.launcher.cli", "launch", "--name", name, *TINY_PRETRAIN, "train.max_steps=100000",
             "cluster.num_workers=1", f"runs_dir={tmp_path / 'runs'}"],
            cwd=tmp_path, stdout=out, stderr=err,
        )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_signal_stops_the_run_says_how_to_resume_and_leaves_no_process(tmp_path, capsys):
    """Two launches side by side (each on its own embedded cluster): one gets Ctrl-C, the other SIGTERM."""
    launches = {said: _launch(tmp_path, said) for said in SIGNALS}
    try:
        started = {}
        for said, launch in launches.items():
            run_dir = tmp_path / "runs" / said
            wait_for(lambda: latest_step(run_dir) >= 2 or launch.poll() is not None, f"step 2 of the run to be {said}")
            assert launch.poll() is None, (tmp_path / f"{said}.err").read_text()
            started[said] = psutil.Process(launch.pid).children(recursive=True)
            titles = [" ".join(p.cmdline()) for p in started[said]]
            assert any("RayTrainWorker" in title for title in titles)
            # An embedded cluster has no autoscaler to ask for a fixed-size run's resources (raylm.cluster.scaling).
            assert not any("AutoscalingCoordinator" in title for title in titles), titles
            launch.send_signal(SIGNALS[said])
        for said, launch in launches.items():
            assert launch.wait(timeout=120) == 128 + SIGNALS[said], said
    finally:
        for launch in launches.values():
            if launch.poll() is None:
                launch.kill()
    for said in SIGNALS:
        run_dir = tmp_path / "runs" / said
        assert (tmp_path / f"{said}.err").read_text().splitlines() == [f"raylm: {said}; continue with 'raylm resume {run_dir}'"]
        _, alive = psutil.wait_procs(started[said], timeout=30)
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
