"""Connect to an existing Ray cluster or start an embedded local one."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional, Tuple

from raylm.errors import UserError, first_line

# Ray's own getter returns the machine's routable address unless told that
# clusters are off; an embedded cluster then lives on 127.0.0.1 only.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


ENV_ADDRESS = "RAY_ADDRESS"
"""Ray's own variable; Ray sets it for a Ray Job's driver."""


@dataclass
class ClusterInfo:
    address: str
    embedded: bool
    nodes: int
    cpus: float
    gpus: float
    chosen_by: Optional[str] = None
    """The setting that named the cluster ('--address', 'cluster.address', RAY_ADDRESS); None when embedded."""

    def origin(self) -> str:
        """Which cluster and how it was chosen, for the console's first line."""
        if self.embedded:
            return f"embedded local Ray (no --address, no {ENV_ADDRESS})"
        return f"{self.address} (from {self.chosen_by})" if self.chosen_by else self.address


def choose_address(address: Optional[str], chosen_by: str = "cluster.address") -> Tuple[Optional[str], Optional[str]]:
    """(address, the setting that gave it) by Ray's conventions: the address given, else
    RAY_ADDRESS, else (None, None), which means an embedded local cluster."""
    if address:
        return address, chosen_by
    if os.environ.get(ENV_ADDRESS):
        return os.environ[ENV_ADDRESS], ENV_ADDRESS
    return None, None


def _ray_env_defaults() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray Train would also copy every print of a worker into its logger: each line twice in the rank logs.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's controller sees a finished or failed worker group at its next poll of the workers, every 2 s by
    # default: on average 1 s more per stage. A poll is one small call per worker; a slow one is awaited in the next.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # An embedded cluster's raylet would start every worker at nice 15, below the driver and Ray's own processes:
    # on a CPU node each of their wake-ups (the driver's record pump, W&B, Ray's polls) then preempts the ranks.
    # torchrun's ranks run at the shell's priority; so do these. (A cluster started elsewhere keeps its setting.)
    os.environ.setdefault("RAY_worker_niceness", "0")


def start_or_connect(
    address: Optional[str], local_cpus: Optional[int] = None, log_to_driver: bool = False, chosen_by: str = "cluster.address"
) -> ClusterInfo:
    """``address`` None starts a local cluster bound to 127.0.0.1 without a dashboard.

    ``chosen_by`` names the setting the address came from, in errors and in ``ClusterInfo.origin``.
    """
    _ray_env_defaults()
    if address is None or _is_loopback(address):
        # Read once, when Ray is first imported: set it before that.
        os.environ[_LOOPBACK_ENV] = "0"
    import ray

    if ray.is_initialized():
        return describe(embedded=False)
    if address is None:
        # Ray Train would start a watcher per worker group that polls for node drains (an autoscaler's or a cloud's
        # notice); nothing drains the one node this process starts. Set before ray.init: the raylet inherits it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray 2.60 turns token authentication on for a new local cluster and says so in a warning at every launch;
        # the embedded cluster keeps it (RAY_AUTH_MODE=disabled opts out, as in Ray), without the notice.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            address="local",  # never attach to some other cluster found on this machine
            num_cpus=local_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=log_to_driver,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
        return describe(embedded=True)
    probe(address, chosen_by)
    try:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise _unreachable(address, chosen_by, first_line(err)) from None
    info = describe(embedded=False)
    info.chosen_by = chosen_by
    return info


def _setting(address: str, chosen_by: str) -> str:
    """How the user wrote the address: ``--address H:6379`` or ``cluster.address='H:6379'``."""
    return f"{chosen_by} {address}" if chosen_by.startswith("--") else f"{chosen_by}={address!r}"


def _unreachable(address: str, chosen_by: str, why: str) -> UserError:
    leave_out = f"unset {ENV_ADDRESS}" if chosen_by == ENV_ADDRESS else "leave the address out"
    return UserError(
        f"cannot connect to the Ray cluster at {_setting(address, chosen_by)} ({why}); start it with 'ray start --head' "
        f"or {leave_out} to run on an embedded local cluster"
    )


def _host_port(address: str) -> Optional[tuple]:
    """(host, port) of a 'host:port' or 'ray://host:port' address; None for 'auto'."""
    bare = address.split("://", 1)[-1]
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _is_loopback(address: str) -> bool:
    target = _host_port(address)
    return target is not None and (target[0] in ("localhost", "::1") or target[0].startswith("127."))


def probe(address: Optional[str], chosen_by: str = "cluster.address", timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes: Ray itself retries an unreachable GCS for a long time.
    A launch calls it before preparing data, so a wrong address costs nothing; None (embedded) passes."""
    if address is None:
        return
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"{_setting(address, chosen_by)} is a Ray dashboard (Jobs) address; run there with 'raylm submit --address {address}', "
            "or give the cluster's GCS address (host:6379)"
        )
    target = _host_port(address)
    if target is None:
        if address != "auto":
            raise UserError(f"{_setting(address, chosen_by)} is not 'auto', 'host:port' or 'ray://host:port'")
        return
    try:
        socket.create_connection(target, timeout=timeout_s).close()
    except OSError as err:
        raise _unreachable(address, chosen_by, err.strerror or str(err)) from None


def describe(embedded: bool) -> ClusterInfo:
    import ray

    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(
        address=ray.get_runtime_context().gcs_address,
        embedded=embedded,
        nodes=len(nodes),
        cpus=resources.get("CPU", 0.0),
        gpus=resources.get("GPU", 0.0),
    )


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def wants_gpu(use_gpu: str, info: ClusterInfo) -> bool:
    if use_gpu == "true":
        if info.gpus == 0:
            raise UserError("cluster.use_gpu='true' but the Ray cluster has no GPUs; set cluster.use_gpu=auto or false")
        return True
    return use_gpu == "auto" and info.gpus > 0


def check_capacity(num_workers: int, cpus_per_worker: int, use_gpu: bool, info: ClusterInfo, key: str = "cluster.num_workers") -> None:
    """Refuse a stage the cluster can never place, instead of waiting forever (``key`` names the worker count)."""
    if use_gpu and num_workers > info.gpus:
        raise UserError(f"{key}={num_workers} needs {num_workers} GPUs but the cluster has {info.gpus:g}; lower {key}")
    needed = num_workers * cpus_per_worker
    # The Ray Train controller takes no CPU, so workers may use every one.
    if not use_gpu and needed > info.cpus:
        raise UserError(
            f"{key}={num_workers} x cluster.cpus_per_worker={cpus_per_worker} needs {needed} CPUs but the cluster has {info.cpus:g}; "
            "lower them or set cluster.local_cpus"
        )
