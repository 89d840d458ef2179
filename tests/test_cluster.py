"""The embedded cluster stays on loopback; TP groups never span nodes."""

import pytest

from raylm.cluster.placement import check_tp_placement, tp_groups_split_across_nodes
from raylm.errors import UserError
from raylm.parallelism.topology import Topology


@pytest.mark.slow
def test_embedded_cluster_lives_on_loopback(ray_cluster):
    import ray

    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}

    @ray.remote(num_cpus=0)
    def worker_ip():
        return ray.util.get_node_ip_address()

    assert ray.get(worker_ip.remote()) == "127.0.0.1"


def test_tp_groups_on_one_node_pass():
    groups = Topology.for_world(2, 1, 4).all_tp_groups()
    check_tp_placement(["a", "a", "b", "b"], groups)


def test_tp_group_across_nodes_is_refused():
    groups = Topology.for_world(2, 1, 4).all_tp_groups()
    assert tp_groups_split_across_nodes(["a", "b", "b", "b"], groups) == [[0, 1]]
    with pytest.raises(UserError, match="span several nodes"):
        check_tp_placement(["a", "b", "b", "b"], groups)


CLUSTER_SCRIPT = """
import sys, time
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


@pytest.mark.slow
def test_launch_on_a_two_node_cluster_keeps_tp_groups_on_one_node(tmp_path):
    """``raylm launch --address`` on a real 2-node cluster (two raylets on this machine)."""
    import os
    import re
    import subprocess
    import sys

    from conftest import TINY_PRETRAIN

    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        address = cluster.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        result = subprocess.run(
            [sys.executable, "-m", "raylm.launcher.cli", "launch", "--name", "two-nodes", "--address", address,
             *TINY_PRETRAIN, "train.max_steps=2", "cluster.num_workers=4", "parallel.tp=2"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        logs = tmp_path / "runs" / "two-nodes" / "pretrain" / "logs"
        node_of_rank = [re.search(r"node (\w+)", (logs / f"rank_{r:03d}.log").read_text()).group(1) for r in range(4)]
        assert len(set(node_of_rank)) == 2, "the 4 workers should use both nodes"
        assert node_of_rank[0] == node_of_rank[1] and node_of_rank[2] == node_of_rank[3]
    finally:
        cluster.communicate("", timeout=120)
