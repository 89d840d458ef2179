"""The embedded cluster stays on loopback; TP groups never span nodes (on a real multi-node cluster: test_elastic)."""

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
