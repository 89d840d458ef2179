"""Elastic stages (cluster.min_workers): spare workers wait, a lost node shrinks the run, a new one grows it back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_PRETRAIN, assert_same_training, read_metrics
from faults import latest_step, worker_nodes
from numerics import training_rel
from raylm.configs.loader import from_yaml_file, resolve_stage

pytestmark = pytest.mark.slow


def test_spare_workers_wait_and_the_rest_trains_as_one_worker(single_worker, spare_worker_run):
    """Ray starts 3 workers; 16 sequences of micro-batch 4 split over 2 replicas, not 3, so rank 2 waits
    (through the checkpoint at step 3 and the end)."""
    assert_same_training(single_worker, spare_worker_run, "3 workers of which 2 train")
    assert [r["world_size"] for r in read_metrics(spare_worker_run, kind="start")] == [2]
    layout = json.loads((spare_worker_run / "summary.json").read_text())["stages"][0]["layout"]
    assert layout == {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 2}
    spare_log = (spare_worker_run / "pretrain" / "logs" / "rank_002.log").read_text()
    assert "3 workers started; 2 train" in spare_log and "waits for the stage to finish" in spare_log


# Two 2-CPU worker nodes (the head has no CPUs); "remove" and "add" on stdin change them. First, an elastic policy as
# raylm's runs make it sizes a worker group on them, with a third node and once it has gone: the sizes, as JSON.
CLUSTER_SCRIPT = """
import json, sys, time
from types import SimpleNamespace
import ray
from ray.cluster_utils import Cluster
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import get_or_create_autoscaling_coordinator
from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy
from ray.train.v2.api.config import ScalingConfig
from raylm.cluster.scaling import for_raylm

cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "include_dashboard": False,
    "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
})
nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
cluster.wait_for_nodes()

cluster.connect()
# Up before the policy's first request, which waits 5 s for it (a new process importing Ray Data).
ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote())
policy = for_raylm(create_scaling_policy(ScalingConfig(num_workers=(1, 8))), embedded=False)
policy.after_controller_start(SimpleNamespace(run_id="fresh-view"))

def workers():
    time.sleep(policy.GET_RESERVED_RESOURCES_INTERVAL_S)  # past the policy's own one-second cache
    return policy.make_decision_for_non_running_worker_group().num_workers

sizes = [workers()]
third = cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
sizes.append(workers())
cluster.remove_node(third)
while sum(node["Alive"] for node in ray.nodes()) > 3:
    time.sleep(0.1)
sizes.append(workers())
policy._cancel_resource_request()
ray.shutdown()
print(json.dumps(sizes), flush=True)

print(cluster.address, flush=True)
for line in sys.stdin:
    if line.strip() == "remove":
        cluster.remove_node(nodes.pop())
    elif line.strip() == "add":
        nodes.append(cluster.add_node(num_cpus=2))
        cluster.wait_for_nodes()
    print("done", flush=True)
cluster.shutdown()
"""


def _wait_for(condition, launch: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert launch.poll() is None, f"the run ended while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _checkpoints_since_start(run_dir: Path, start: int) -> bool:
    """Whether the stage's ``start``-th (re)start has written a checkpoint."""
    records = read_metrics(run_dir, kind="start") + read_metrics(run_dir, kind="event")
    began = [r["time"] for r in records if r["kind"] == "start"]
    return len(began) >= start and any(r.get("event") == "checkpoint" and r["time"] > began[start - 1] for r in records)


def test_lost_node_shrinks_the_run_and_an_added_one_grows_it_back(tmp_path):
    """tp2 on two 2-CPU nodes: 4 workers (dp2), then 2 (dp1) after a node is removed, then 4 again once one is added;
    tensor-parallel pairs stay on one node throughout (``raylm launch --address`` on a real multi-node cluster).

    raylm's elastic policy sizes the group from the nodes as they are now: Ray's saw them as its coordinator did up to
    20 s before (checked first, on the same cluster: 4, 6 and 4 workers on 2, 3 and 2 nodes; Ray's said 4, 4, 4), so
    the restart after the loss kept trying for 4 workers and the growth came late."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def tell(command: str) -> None:
        cluster.stdin.write(command + "\n")
        cluster.stdin.flush()
        assert cluster.stdout.readline().strip() == "done"

    run_dir = tmp_path / "runs" / "elastic"
    try:
        sizes = cluster.stdout.readline().strip()
        assert sizes and json.loads(sizes) == [4, 6, 4], sizes
        address = cluster.stdout.readline().strip()
        with open(tmp_path / "launch.log", "w") as log:
            launch = subprocess.Popen(
                [sys.executable, "-m", "raylm.launcher.cli", "launch", "--name", "elastic", "--address", address, *TINY_PRETRAIN,
                 "train.max_steps=45", "train.ckpt_every=4", "cluster.num_workers=4", "cluster.min_workers=2", "parallel.tp=2",
                 "cluster.elastic_check_s=2", "cluster.placement_timeout_s=5", "fault.max_failures=6"],
                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
            starts = lambda: [r["world_size"] for r in read_metrics(run_dir, kind="start")] if (run_dir / "metrics.jsonl").exists() else []
            _wait_for(lambda: latest_step(run_dir) >= 6, launch, "step 6")
            tell("remove")  # for good, as far as the run can tell: it goes on with one tp pair
            _wait_for(lambda: len(starts()) >= 2, launch, "the restart on two workers")
            # Let the smaller group write a checkpoint before the cluster grows, so the growth reshards too.
            _wait_for(lambda: _checkpoints_since_start(run_dir, 2), launch, "a checkpoint on two workers")
            tell("add")
            assert launch.wait(timeout=600) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=120)

    assert starts() == [4, 2, 4]
    events = read_metrics(run_dir, kind="event")
    resharded = [(r["from_layout"].split(" zero")[0], r["to_layout"].split(" zero")[0]) for r in events if r["event"] == "resharded"]
    assert resharded == [("tp=2 pp=1 dp=2", "tp=2 pp=1 dp=1"), ("tp=2 pp=1 dp=1", "tp=2 pp=1 dp=2")]
    nodes = worker_nodes(run_dir / "pretrain")
    assert len(nodes) == 4 and nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2], nodes
    train = read_metrics(run_dir)
    # Same global batch throughout: every step adds 16 sequences of 64 tokens.
    assert all(r["tokens"] == r["step"] * 16 * 64 for r in train)
    assert max(r["step"] for r in train) == 45
    # Steps redone after each restart repeat the losses logged before it (same data, same optimizer state), and
    # however far a group got past its last checkpoint before it was stopped, the run says how many it redid.
    losses_of_step = {}
    for r in train:
        losses_of_step.setdefault(r["step"], []).append(r["loss"])
    restarts = [r for r in events if r["event"] == "restart"]
    assert sum(len(l) - 1 for l in losses_of_step.values()) == sum(r["steps_lost"] for r in restarts)
    cfg = resolve_stage(from_yaml_file(run_dir / "config.yaml"), 0)
    # A redone step follows at most ckpt_every steps that ran with another data-parallel reduction order.
    rel = training_rel(cfg.model, 16 * 64, cfg.train.ckpt_every)
    for step, logged in losses_of_step.items():
        assert all(abs(loss - logged[0]) <= rel * abs(logged[0]) for loss in logged), (step, logged)
    summary = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    assert (summary["layout"]["tp"], summary["layout"]["dp"]) == (2, 2)
