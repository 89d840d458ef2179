"""The recipes in examples/ run real raylm command lines: each parses and its config loads and validates."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from raylm.configs.loader import load_config
from raylm.launcher.cli import _split_config_and_overrides, build_parser

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _check_launch(command: str) -> None:
    words = shlex.split(command)
    assert words[:2] == ["raylm", "launch"], command
    args = build_parser().parse_args(words[1:])
    assert args.resume_if_exists and args.name, "a supervisor's retry must continue the same run"
    config, overrides = _split_config_and_overrides(args)
    run = load_config(config, [*overrides, f"name={args.name}"])
    assert Path(run.runs_dir).is_absolute()


def test_kuberay_rayjob_retries_into_the_same_run():
    job = yaml.safe_load((EXAMPLES / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    _check_launch(job["spec"]["entrypoint"])
    # Every pod mounts the run directory's volume.
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for template in templates:
        mounts = {m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert "/mnt/runs" in mounts


def test_slurm_script_requeues_into_the_same_run():
    script = (EXAMPLES / "slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "RAY_AUTH_MODE=token" in script
    launch = re.search(r"^raylm launch .*?(?<!\\)$", script.replace("\\\n", " "), re.M).group(0)
    _check_launch(launch.replace('"$head_ip:$port"', "10.0.0.1:6379").replace('"$RUNS_DIR"', "/shared/raylm-runs"))
