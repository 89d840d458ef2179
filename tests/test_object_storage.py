"""Runs in object storage with no shared disk: a real S3 server (moto) on 127.0.0.1, a worker node whose view
of the driver's scratch directory is an empty tmpfs (its own mount namespace), launches in CLI subprocesses.

One run goes pretrain -> sft in the bucket, its checkpoints saved asynchronously; a second, pretrain only, has a worker SIGKILLed mid-stage, resumes
from the bucket's checkpoint and must end with weights bitwise equal to the first run's pretrain stage. Then
``status``, ``generate``, ``eval`` and ``export`` work on the run from a fresh directory with an empty cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from conftest import TINY_PRETRAIN, cli_here, one_line_error
from faults import wait_for
from object_store import TwoNodeCluster, new_bucket, s3_server
from ports import free_port

pytestmark = pytest.mark.slow

S3_RUN = [o for o in TINY_PRETRAIN if not o.startswith("stages=")] + [
    "train.max_steps=8", "train.ckpt_every=4", "cluster.num_workers=2", "fault.max_failures=1", "logging.wandb.mode=offline",
]
TWO_STAGES = "stages=[{name: pretrain, kind: pretrain}, {name: sft, kind: sft, data: {source: 'builtin:pydoc-sft'}, train: {max_steps: 4}}]"


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as url:
        yield url


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("driver-disk")


@pytest.fixture(scope="module")
def env(scratch) -> dict:
    """What the driver and both nodes run with: the S3 credentials, and a node-local cache under the hidden scratch."""
    # Without the embedded cluster's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (set in this process when the session's
    # cluster started), which would keep 'ray start' from joining a worker node.
    inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    return {**inherited, "RAYLM_CACHE": str(scratch / "cache"), "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def cluster(endpoint, scratch, env, tmp_path_factory):
    nodes = TwoNodeCluster(scratch, env, tmp_path_factory.mktemp("worker-node") / "ray-start.log")
    yield nodes
    nodes.close()


def _launch(args: List[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "raylm.launcher.cli", *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _records(view: Path) -> List[dict]:
    path = view / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _view(runs_uri: str, name: str, env: dict) -> Path:
    from raylm.storage import Store, view_of

    saved = os.environ.get("RAYLM_CACHE")
    os.environ["RAYLM_CACHE"] = env["RAYLM_CACHE"]
    try:
        return view_of(Store(runs_uri).child(name))
    finally:
        os.environ.pop("RAYLM_CACHE") if saved is None else os.environ.update(RAYLM_CACHE=saved)


@pytest.mark.timeout(900)
def test_a_run_in_s3_trains_resumes_and_is_served_from_the_bucket(cluster, endpoint, scratch, env, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from raylm.storage import Store

    runs = new_bucket(endpoint)
    common = ["launch", "--address", cluster.address, *S3_RUN, f"runs_dir={runs}"]

    # An uninterrupted pretrain -> sft run, keeping only its newest checkpoint; its saves upload, commit and prune
    # on the ranks' writer threads (asynchronous checkpoints).
    whole = _launch([*common, "--name", "whole", TWO_STAGES, "train.keep_last=1", "train.async_checkpoint=true"], env, scratch, tmp_path / "whole.log")
    assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    store = Store(runs)
    files = store.files("whole")
    for needed in ("config.yaml", "metrics.jsonl", "summary.json", "tokenizer/tokenizer.json", "pretrain/final/model.safetensors",
                   "pretrain/summary.json", "sft/final/model.safetensors", "sft/summary.json", "pretrain/logs/rank_000.log",
                   "pretrain/logs/rank_001.log", "pretrain/step_0000008/manifest.json"):
        assert needed in files, needed
    assert not any(name.startswith("pretrain/step_0000004/") for name in files)  # pruned from the bucket
    assert any(name.startswith("wandb/offline-run-") and name.endswith(".wandb") for name in files)
    fetched = [r for r in _records(_view(runs, "whole", env)) if r.get("event") == "fetched"]
    contents = {tree: json.loads(store.read_bytes(f"whole/{tree}/.contents.json"))
                for tree in ("tokenizer", "data/pretrain", "pretrain/final", "data/sft")}

    def new_bytes(trees, known_trees=()):
        """Bytes of the files of ``trees`` whose content is in none of ``known_trees``, each content once."""
        known = {sha for tree in known_trees for _, sha in contents[tree].values()}
        unique = {sha: size for tree in trees for size, sha in contents[tree].values() if sha not in known}
        return sum(unique.values())

    # Both ranks share one node, which downloads each input file once whichever rank gets to it first; the
    # second stage downloads only what the node does not hold yet: not the tokenizer they share, nor the
    # weights it starts from (rank 0 wrote them on this node; the cache adopts them by their sha256).
    pretrain = [r["bytes"] for r in fetched if r["stage"] == "pretrain"]
    sft = [r["bytes"] for r in fetched if r["stage"] == "sft"]
    assert len(pretrain) == len(sft) == 2
    assert sum(pretrain) == new_bytes(["tokenizer", "data/pretrain"])
    assert sum(sft) == new_bytes(["data/sft"], ["tokenizer", "data/pretrain", "pretrain/final"]) > 0

    # The same pretraining, a worker SIGKILLed after step 5: the stage resumes from the bucket's step 4.
    view = _view(runs, "killed", env)
    killed = _launch([*common, "--name", "killed"], env, scratch, tmp_path / "killed.log")
    wait_for(lambda: any(r.get("kind") == "train" and r["step"] >= 5 for r in _records(view)) or killed.poll() is not None, "step 5")
    victims = cluster.training_workers()
    assert len(victims) == 2, victims
    victims[1].send_signal(signal.SIGKILL)
    assert killed.wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    records = _records(view)
    (restart,) = [r for r in records if r.get("event") == "restart"]
    assert restart["step"] == 4
    restored = [r for r in records if r.get("event") == "fetched_checkpoint"]
    # Each rank downloads only its own files: its ZeRO shard and RNG state (rank 0 also the stage's records); the
    # shared model states once per node, by whichever rank comes first.
    beyond_own = {r["rank"]: r["files"] - (3 if r["rank"] == 0 else 2) for r in restored if r["files"]}
    assert sorted(beyond_own.values()) == [0, 1], restored
    # Both ranks share the node, so it needs both ZeRO shards; never the layout-free copy (no resharding here).
    checkpoint = store.files("killed/pretrain/step_0000004")
    needed = sum(size for name, size in checkpoint.items() if name.startswith(("deepspeed/", "rng_rank", "records.jsonl")))
    assert sum(r["bytes"] for r in restored) == needed < sum(checkpoint.values()) * 0.6
    assert all(r["bytes"] == 0 for r in records if r.get("event") == "fetched" and r["time"] > restart["time"])

    local = tmp_path / "fresh"
    local.mkdir()
    for name in ("whole/pretrain/final/model.safetensors", "killed/pretrain/final/model.safetensors"):
        store.download(name, local / name)
    expected, got = (load_file(str(local / name)) for name in ("whole/pretrain/final/model.safetensors", "killed/pretrain/final/model.safetensors"))
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)

    # The run is served from the bucket alone, on a machine that has never seen it (the CLI in this process: these
    # commands' subject is the bucket, not the process).
    monkeypatch.chdir(local)
    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path / "empty-cache"))
    run_uri = f"{runs.partition('?')[0]}/whole?{runs.partition('?')[2]}"
    code, out, err = cli_here(capsys, "status", run_uri)
    assert code == 0 and "finished" in out and "sft" in out, out + err
    code, out, err = cli_here(capsys, "generate", run_uri, "--prompt", "The", "--max-new-tokens", "4")
    assert code == 0 and out.strip(), err
    code, out, err = cli_here(capsys, "eval", run_uri, "--stage", "pretrain", "--max-batches", "2")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["stage"] == "pretrain", err
    code, out, err = cli_here(capsys, "export", run_uri, "--format", "hf", "--out", str(local / "hf"))
    assert code == 0, err
    assert (local / "hf" / "model.safetensors").is_file() and (local / "hf" / "tokenizer_config.json").is_file()


def test_a_store_that_cannot_hold_the_run_is_refused_before_anything_starts(endpoint, capsys, tmp_path, monkeypatch):
    from raylm.storage import Store

    monkeypatch.chdir(tmp_path)
    runs = new_bucket(endpoint)
    base = ["launch", *TINY_PRETRAIN, "--name", "refused"]
    missing = one_line_error(capsys, *base, f"runs_dir=s3://no-such-bucket/runs?endpoint_override={endpoint}")
    assert "runs_dir=s3://no-such-bucket/runs: cannot write there (the bucket does not exist; create it first)" in missing
    unreachable = one_line_error(capsys, *base, "runs_dir=s3://bucket/runs?endpoint_override=http://127.0.0.1:9")
    assert "runs_dir=s3://bucket/runs: cannot write there (the endpoint cannot be reached" in unreachable
    # Reading a run (resume, status, generate ...) or a runs directory there is refused the same way.
    for command in (["resume", "s3://bucket/runs/x?endpoint_override=http://127.0.0.1:9"],
                    ["status", "--runs-dir", "s3://bucket/runs?endpoint_override=http://127.0.0.1:9"]):
        assert "=s3://bucket/runs" in (line := one_line_error(capsys, *command)) and "cannot read there (the endpoint cannot be reached" in line
    assert "runs_dir=s3://: names no bucket; use s3://BUCKET/PREFIX" in one_line_error(capsys, *base, "runs_dir=s3://")
    assert "runs_dir=ftp://host/runs: raylm stores runs on a local or shared path, s3:// or gs://" in one_line_error(
        capsys, *base, "runs_dir=ftp://host/runs")
    assert "credentials do not belong in a URI" in one_line_error(capsys, *base, f"runs_dir={runs}&access_key=y&secret_key=x")
    unknown = one_line_error(capsys, *base, f"runs_dir={runs}&timeout=5")
    assert "Unexpected query parameter in S3 URI: 'timeout'" in unknown
    # A run already in the bucket is never overwritten.
    store = Store(runs)
    store.write_bytes("refused/config.yaml", b"name: refused\n")
    taken = one_line_error(capsys, *base, f"runs_dir={runs}")
    assert f"run 'refused' already exists in {store.display()}; continue it with 'raylm resume {store.display('refused')}'" in taken
    assert store.files() == {"refused/config.yaml": 14} and not any(tmp_path.iterdir())
    assert "no run at" in one_line_error(capsys, "status", store.display("nothing") + "?" + runs.partition("?")[2])


@pytest.fixture(scope="module")
def checking_endpoint(tmp_path_factory):
    """An S3 server (moto's, in its own process) that checks credentials after its first two requests: the probe that
    it is up (one request answered) and the one that makes the bucket."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                  stderr=subprocess.STDOUT, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "2"})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        wait_for(lambda: server.poll() is None and _answers(endpoint), "the S3 server", timeout=60)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y").create_bucket(Bucket="locked")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(endpoint: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(endpoint, timeout=1)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def test_credentials_the_store_refuses_or_that_are_missing_are_named(checking_endpoint, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = f"runs_dir=s3://locked/runs?endpoint_override={checking_endpoint}"
    base = ["launch", *TINY_PRETRAIN, "--name", "refused", runs]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    refused = one_line_error(capsys, *base)
    assert "runs_dir=s3://locked/runs: cannot write there (the store refused this machine's credentials; export AWS_ACCESS_KEY_ID" in refused
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials either
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    missing = one_line_error(capsys, *base)
    assert "this machine has no AWS credentials: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in missing
    assert not any(tmp_path.iterdir())
