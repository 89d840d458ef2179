"""A run on Google Cloud Storage: a real GCS JSON API server (gcp-storage-emulator, its own process) on 127.0.0.1,
credentials from a service account key named by ``GOOGLE_APPLICATION_CREDENTIALS`` (what a machine outside GCP's
metadata service uses), the CLI in subprocesses on an embedded cluster. The S3 run (tests/test_object_storage.py)
covers the storage paths with no shared disk and the restarts; this one shows that a ``gs://`` run trains, checkpoints
and is served from the bucket, and that a GCS store's mistakes get their one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from conftest import TINY_PRETRAIN, one_line_error
from object_store import gcs_server, new_gcs_bucket

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def endpoint():
    with gcs_server() as url:
        yield url


def _cli(args: List[str], cwd: Path, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYLM_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "raylm.launcher.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(600)
def test_a_run_in_gcs_trains_checkpoints_and_is_served_from_the_bucket(endpoint, tmp_path):
    from raylm.storage import Store

    runs = new_gcs_bucket(endpoint)
    launched = _cli(["launch", *TINY_PRETRAIN, "train.max_steps=4", "train.ckpt_every=2", "cluster.num_workers=2", "--name", "g",
                     f"runs_dir={runs}"], tmp_path, tmp_path / "driver-cache", timeout=480)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    files = Store(runs).files("g")
    for needed in ("config.yaml", "metrics.jsonl", "summary.json", "tokenizer/tokenizer.json", "pretrain/final/model.safetensors",
                   "pretrain/summary.json", "pretrain/logs/rank_000.log", "pretrain/logs/rank_001.log",
                   "pretrain/step_0000002/manifest.json", "pretrain/step_0000004/manifest.json"):
        assert needed in files, (needed, sorted(files))
    assert not any(name.startswith(".raylm-probe") for name in Store(runs).files())

    # Served from the bucket alone, by a machine that has never seen the run.
    run_uri = f"{runs.partition('?')[0]}/g?{runs.partition('?')[2]}"
    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    status = _cli(["status", run_uri], fresh, tmp_path / "empty-cache")
    assert status.returncode == 0 and "finished" in status.stdout and "step_0000004" in status.stdout, status.stdout + status.stderr
    generated = _cli(["generate", run_uri, "--prompt", "The", "--max-new-tokens", "4"], fresh, tmp_path / "empty-cache")
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr
    assert not any(fresh.iterdir())


def test_a_gcs_store_that_cannot_hold_the_run_is_named_with_its_fix(endpoint, capsys, tmp_path, monkeypatch):
    from raylm import storage

    monkeypatch.chdir(tmp_path)
    # The probe's own retry limit, shortened: the GCS client's default (15 minutes) would hang every case below.
    monkeypatch.setattr(storage, "PROBE_RETRY_S", 2)
    base = ["launch", *TINY_PRETRAIN, "--name", "refused"]
    server = f"endpoint_override={endpoint}&scheme=http"
    missing = one_line_error(capsys, *base, f"runs_dir=gs://no-such-bucket/runs?{server}")
    assert "runs_dir=gs://no-such-bucket/runs: cannot write there (the bucket does not exist; create it first)" in missing
    unreachable = one_line_error(capsys, *base, "runs_dir=gs://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http")
    assert "runs_dir=gs://bucket/runs: cannot write there (the endpoint cannot be reached" in unreachable
    unknown = one_line_error(capsys, *base, f"runs_dir=gs://bucket/runs?{server}&timeout=5")
    assert "Unexpected query parameter in GCS URI: 'timeout'; fix the URI (gs://bucket/prefix" in unknown
    runs = new_gcs_bucket(endpoint)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud application-default credentials either
    # No key file and no metadata server (nothing answers its address here): the client never sends the request.
    missing_credentials = one_line_error(capsys, *base, f"runs_dir={runs}")
    assert "this machine has no Google Cloud credentials: set GOOGLE_APPLICATION_CREDENTIALS" in missing_credentials
    assert not any(tmp_path.iterdir())
