"""`raylm submit / logs / stop` against a real Ray head (dashboard on 127.0.0.1, token authentication on),
and a relaunch with --resume-if-exists that continues the stopped run, the run kept in object storage (a moto S3
server): the job's driver finds the bucket's credentials in its node's environment."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import TINY_PRETRAIN
from faults import wait_for
from object_store import CREDENTIALS, new_bucket, s3_server
from ports import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def bucket():
    """A bucket's ``s3://`` URI; the server's credentials are also in the head node's environment."""
    with s3_server() as endpoint:
        yield new_bucket(endpoint)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head started the way a cluster admin would (``ray start --head``), on loopback, with token auth;
    its processes form one process group that the fixture ends (never ``ray stop``: other clusters run here)."""
    home = tmp_path_factory.mktemp("head")
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
    token = home / "auth_token"
    token.write_text("raylm-test-token-" + os.urandom(8).hex())
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the node's address is 127.0.0.1
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `raylm` for the job's driver
        "WANDB_MODE": "disabled",
        **CREDENTIALS,
    }
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(runtime_env), "--num-cpus", "4", "--temp-dir", str(home / "ray")],
        env=env, stdout=open(home / "ray_start.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    client_env = {**env, "RAY_ADDRESS": address}
    deadline = time.time() + 120
    while not _jobs_api_answers(address, client_env):
        assert process.poll() is None, (home / "ray_start.log").read_text()[-3000:]
        assert time.time() < deadline, "the Ray head's dashboard did not answer within 120 s"
        time.sleep(0.2)
    yield address, client_env
    # No clean stop: nothing here needs one (it took 30 s on 2 cores), and the group is the head's processes alone.
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _jobs_api(address: str, env: dict, path: str, timeout: float):
    """What the head's Jobs REST API answers at ``path``, asked with the token in this process (a `ray job` or
    `raylm logs` process per look is a second of CPU)."""
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{address}/api/jobs/{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _jobs_api_answers(address: str, env: dict) -> bool:
    """Whether the head's Jobs API lists jobs yet."""
    try:
        _jobs_api(address, env, "", timeout=5)
        return True
    except OSError:  # refused while the dashboard starts; an HTTP error until its Jobs module is up
        return False


def raylm(*args: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raylm.launcher.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_a_submitted_run_finishes_and_a_stopped_one_continues_on_relaunch(head, bucket, tmp_path):
    from raylm.storage import Store
    from raylm.trainer.checkpoint import MANIFEST
    from raylm.trainer.stored_checkpoints import stored_steps

    address, env = head
    overrides = [o for o in TINY_PRETRAIN if not o.startswith("logging.wandb")] + [f"runs_dir={bucket}", "logging.wandb.mode=disabled"]

    # Without the token the cluster refuses the client; the error says how to pass it the Ray way.
    tokenless = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    refused = raylm("submit", "tiny", "--address", address, *overrides, env=tokenless, cwd=tmp_path)
    assert refused.returncode == 2 and "RAY_AUTH_MODE=token" in refused.stderr and "Traceback" not in refused.stderr

    # A long job, stopped mid-stage once it has a complete checkpoint, then continued by resubmitting the same command.
    long_run = ["tiny", "--name", "stopped", "--resume-if-exists", *overrides, "train.max_steps=40", "train.ckpt_every=4", "train.log_every=1"]
    first = _submit(env, tmp_path, *long_run[:1], "--address", address, *long_run[1:])
    run = Store(bucket).child("stopped")
    wait_for(lambda: any(run.is_file(f"pretrain/{name}/{MANIFEST}") for name in stored_steps(run, "pretrain")),
             "the long job's first complete checkpoint in the bucket", timeout=400, poll_s=0.5)
    stopped = raylm("stop", first, env=env, cwd=tmp_path)
    assert stopped.returncode == 0 and "stopping" in stopped.stdout, stopped.stderr
    wait_for(lambda: _job_status(address, env, first) == "STOPPED", "the job to stop", timeout=400, poll_s=0.5)
    assert f"job {first} is STOPPED" in raylm("logs", first, env=env, cwd=tmp_path).stderr
    assert not run.is_dir("pretrain/final")

    # The relaunch finishes: its logs end with the summary, its results are in the bucket.
    second = _submit(env, tmp_path, *long_run)  # the address from RAY_ADDRESS
    followed = raylm("logs", second, "--follow", env=env, cwd=tmp_path)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-2000:]
    assert f"job {second} is SUCCEEDED" in followed.stderr, followed.stdout[-3000:]
    assert "cluster: 127.0.0.1:" in followed.stdout and "(from RAY_ADDRESS)" in followed.stdout
    assert "perplexity" in followed.stdout and "s3://" in followed.stdout
    records = [json.loads(line) for line in run.read_bytes("metrics.jsonl").decode().splitlines()]
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 4
    assert json.loads(run.read_bytes("summary.json"))["stages"][0]["steps"] == 40
    assert run.is_file("pretrain/final/model.safetensors")

    # A relaunch with another model is refused before anything runs, naming the key.
    local = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    changed = raylm("launch", *long_run, "model.n_layer=2", env=local, cwd=tmp_path)
    assert changed.returncode == 2 and "model.n_layer" in changed.stderr and "Traceback" not in changed.stderr
    # The dashboard address is not a cluster address for a launch: the error says what to use instead.
    misdirected = raylm("launch", "tiny", *overrides, env=env, cwd=tmp_path)
    assert misdirected.returncode == 2 and "raylm submit" in misdirected.stderr


def _job_status(address: str, env: dict, job: str) -> str:
    return _jobs_api(address, env, job, timeout=30)["status"]


def _submit(env: dict, cwd: Path, *args: str) -> str:
    """The job id ``raylm submit`` prints."""
    submitted = raylm("submit", *args, env=env, cwd=cwd)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"as Ray job (\S+);", submitted.stdout).group(1)
    assert f"raylm logs {job}" in submitted.stdout
    return job
