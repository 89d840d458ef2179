"""A real S3 server on 127.0.0.1 (moto's), and a Ray worker node that cannot see the driver's disk."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List

import psutil

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "raylm-test", "AWS_SECRET_ACCESS_KEY": "raylm-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server() -> Iterator[str]:
    """Yields ``http://127.0.0.1:PORT`` of a running S3 server; credentials for it are in this process's environment."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def new_bucket(endpoint: str) -> str:
    """A fresh bucket; its ``s3://`` URI with the endpoint."""
    import pyarrow.fs

    name = f"raylm-{uuid.uuid4().hex[:8]}"
    pyarrow.fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}/runs?endpoint_override={endpoint}"


# A head node with no CPUs (driver, Ray Train's controller and the relay live there, no worker does).
HEAD_SCRIPT = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


class TwoNodeCluster:
    """A head node, and one worker node in its own mount namespace with an empty tmpfs over ``hidden``:
    whatever the driver writes below ``hidden`` does not exist there."""

    def __init__(self, hidden: Path, env: Dict[str, str], log: Path, worker_cpus: int = 2):
        self.env = env
        self.head = subprocess.Popen([sys.executable, "-c", HEAD_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.address = self.head.stdout.readline().strip()
        ray = Path(sys.executable).with_name("ray")
        command = f"mount -t tmpfs raylm-node-disk {hidden} && exec {ray} start --address {self.address} --num-cpus {worker_cpus} --block"
        with open(log, "w") as out:
            self.worker = subprocess.Popen(["unshare", "-m", "sh", "-c", command], env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        self.log = log
        self._wait_for_nodes(2)

    def _wait_for_nodes(self, count: int) -> None:
        script = ("import ray, time; ray.init(address=%r, logging_level='ERROR'); d = time.time() + 300\n"
                  "while len([n for n in ray.nodes() if n['Alive']]) < %d:\n"
                  "    assert time.time() < d, 'the worker node did not join'; time.sleep(0.2)\n") % (self.address, count)
        waiting = subprocess.Popen([sys.executable, "-c", script], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while waiting.poll() is None:
            if self.worker.poll() is not None:
                waiting.kill()
                raise AssertionError(f"the worker node's 'ray start' exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)
        assert waiting.returncode == 0, f"{waiting.stdout.read()[-2000:]}\nworker node: {self.log.read_text()[-2000:]}"

    def training_workers(self) -> List[psutil.Process]:
        """Ray Train's worker processes on the worker node."""
        found = []
        for process in psutil.Process(self.worker.pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.NoSuchProcess:
                continue
        return found

    def close(self) -> None:
        """Ends the processes this cluster started, and only those."""
        try:
            os.killpg(self.worker.pid, signal.SIGTERM)
            self.worker.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.worker.pid, signal.SIGKILL)
        self.head.stdin.close()
        self.head.wait(timeout=120)
