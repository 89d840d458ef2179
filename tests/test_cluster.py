"""The embedded cluster stays on loopback; TP groups never span nodes (on a real multi-node cluster: test_elastic)."""

import ipaddress
import re
import signal
import threading
import time

import pytest

from conftest import TINY_PRETRAIN, launch_in_process, read_metrics
from raylm.cluster.placement import check_tp_placement, tp_groups_split_across_nodes
from raylm.configs.schema import FaultConfig
from raylm.errors import UserError
from raylm.parallelism.topology import Topology

HANG_TIMEOUT_S = 123  # no default: the process groups must carry exactly its collective timeout


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_embedded_cluster_lives_on_loopback(ray_cluster):
    import ray

    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}

    @ray.remote(num_cpus=0)
    def worker_ip():
        return ray.util.get_node_ip_address()

    assert ray.get(worker_ip.remote()) == "127.0.0.1"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_embedded_cluster_runs_workers_at_the_drivers_priority(ray_cluster):
    """Ray would start them at nice 15, below the driver and Ray's own processes (torchrun's ranks keep the shell's)."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    def niceness():
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # gRPC's dual-stack sockets show 127.0.0.1 as ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def _listening(root) -> set:
    """(pid, ip, port) of every listening TCP socket of ``root`` and its descendants (Ray's processes, the workers)."""
    import psutil

    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            found |= {(proc.pid, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # a process that ended between the listing and the look
    return found


def _titles(root) -> set:
    """(process title, whether torch's library is loaded) of ``root``'s descendants (Ray names an actor's process
    ``ray::<class>``)."""
    import psutil

    found = set()
    for proc in root.children(recursive=True):
        try:
            with open(f"/proc/{proc.pid}/maps") as maps:
                found.add((proc.cmdline()[0], "libtorch" in maps.read()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError, OSError):
            pass
    return found


@pytest.fixture(scope="module")
def watched_run(ray_cluster, tmp_path_factory):
    """A 2-worker run on the embedded cluster, with every socket this process tree listened on while it ran and
    every process title it had."""
    import psutil

    root, seen, titles, done = psutil.Process(), set(), set(), threading.Event()

    def watch():
        while not done.wait(0.2):
            seen.update(_listening(root))
            titles.update(_titles(root))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_dir = launch_in_process(tmp_path_factory.mktemp("watched"), "watched",
                                    [*TINY_PRETRAIN, "train.max_steps=3", f"fault.hang_timeout_s={HANG_TIMEOUT_S}"])
    finally:
        done.set()
        watcher.join()
    return run_dir, seen, titles


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_embedded_run_listens_on_loopback_only(watched_run):
    """The process-group store, gloo's pairs and Ray's servers: nothing reachable from another machine."""
    run_dir, seen, _ = watched_run
    exposed = sorted((ip, port, pid) for pid, ip, port in seen if not _is_loopback(ip))
    assert not exposed, f"listening beyond loopback (ip, port, pid): {exposed}"
    # The watch saw the run's process group, not only what listened before and after it.
    store = re.search(r"process-group store on (\S+):(\d+)", (run_dir / "pretrain" / "logs" / "rank_000.log").read_text())
    assert store is not None
    assert (store.group(1), int(store.group(2))) in {(ip, port) for _, ip, port in seen}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_process_groups_wait_the_collective_timeout(watched_run):
    """Read back from the live groups of a real Ray run: the default group and raylm's tp/dp/pp groups."""
    run_dir, _, _ = watched_run
    (start,) = read_metrics(run_dir, kind="start")
    assert start["pg_timeout_s"] == FaultConfig(hang_timeout_s=HANG_TIMEOUT_S).collective_timeout().total_seconds() > HANG_TIMEOUT_S


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_embedded_cluster_starts_no_preemption_watcher(watched_run):
    """Nothing drains the one node an embedded cluster has: Ray Train's watcher for drains would be a process per
    worker group start polling for nothing."""
    _, _, titles = watched_run
    assert {"ray::TrainController", "ray::RayTrainWorker"} <= {title for title, _ in titles}, titles
    assert not any(title.startswith("ray::PreemptionWatcher") for title, _ in titles), titles


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_finished_fit_puts_back_the_ctrl_c_handler_and_leaves_no_controller(watched_run):
    """Ray Train installs its own Ctrl-C handler for fit(); left installed, it held the controller's handle, so in a
    process that goes on (these tests, a Ray Job's entrypoint) a finished run's controller actor lived on."""
    import psutil

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    deadline = time.time() + 60
    while any(title == "ray::TrainController" for title, _ in _titles(psutil.Process())):
        assert time.time() < deadline, "a finished run's Ray Train controller still runs"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ray_train_starts_no_process_the_run_does_not_use(watched_run):
    """Start-up is CPU every launch pays: no DatasetManager (raylm hands Ray no datasets), no PlacementGroupCleaner
    (it asks the State API, which an embedded cluster, started without a dashboard, lacks), and Ray Train's
    controller, which trains nothing, never loads torch (the workers do)."""
    _, _, titles = watched_run
    assert ("ray::RayTrainWorker", True) in titles, titles
    assert ("ray::TrainController", False) in titles and ("ray::TrainController", True) not in titles, titles
    assert not any(title in ("ray::DatasetManager", "ray::PlacementGroupCleaner") for title, _ in titles), titles


def test_tp_groups_on_one_node_pass():
    groups = Topology.for_world(2, 1, 4).all_tp_groups()
    check_tp_placement(["a", "a", "b", "b"], groups)


def test_tp_group_across_nodes_is_refused():
    groups = Topology.for_world(2, 1, 4).all_tp_groups()
    assert tp_groups_split_across_nodes(["a", "b", "b", "b"], groups) == [[0, 1]]
    with pytest.raises(UserError, match="span several nodes"):
        check_tp_placement(["a", "b", "b", "b"], groups)


@pytest.mark.parametrize("embedded", [False, True])
def test_the_placement_group_cleaner_runs_where_the_state_api_does(embedded):
    """Where Ray's dashboard serves the State API (a cluster given by address, usually) Ray Train's cleaner is kept;
    Ray Data's set-up never is. Fails too if this Ray names its callbacks otherwise (the filter would miss them)."""
    from ray.train import ScalingConfig

    from raylm.cluster.backend import WorkersOnlyConfig
    from raylm.launcher.trainer import _RaylmTrainer

    trainer = _RaylmTrainer(lambda: None, torch_config=WorkersOnlyConfig(), scaling_config=ScalingConfig(num_workers=1),
                            embedded=embedded)
    names = {type(callback).__name__ for callback in trainer._create_default_callbacks()}
    assert {"BackendSetupCallback", "AcceleratorSetupCallback"} <= names and "DatasetsCallback" not in names
    assert ("PlacementGroupCleanerCallback" in names) == (not embedded)


def test_a_fixed_size_run_without_an_autoscaler_asks_none():
    """Ray's fixed-size policy, as Ray Train makes it, is replaced on the embedded cluster by one that creates no
    autoscaling coordinator (a process the controller waits for) and decides as Ray's does; on a cluster given by
    address it stays. An elastic policy, which sizes the group from what the coordinator reserved, asks it to look
    at the nodes first (tests/test_elastic.py runs it)."""
    from ray.train.v2._internal.execution.scaling_policy import ResizeDecision, create_scaling_policy
    from ray.train.v2.api.config import ScalingConfig

    from raylm.cluster.scaling import for_raylm

    fixed = for_raylm(create_scaling_policy(ScalingConfig(num_workers=2)), embedded=True)
    assert type(fixed).__name__ == "_FixedWithoutAutoscaler"
    fixed.after_controller_start(None)
    decision = fixed.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2
    assert fixed._coordinator_client is None
    given = create_scaling_policy(ScalingConfig(num_workers=2))
    assert for_raylm(given, embedded=False) is given
    for embedded in (True, False):
        elastic = for_raylm(create_scaling_policy(ScalingConfig(num_workers=(1, 2))), embedded=embedded)
        assert type(elastic).__name__ == "_ElasticOnCurrentNodes"
