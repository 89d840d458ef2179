"""Real object stores on 127.0.0.1 (moto's S3 server, gcp-storage-emulator's GCS JSON API), and a Ray worker node that
cannot see the driver's disk."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List

import psutil

from ports import free_port
from raylm.environment import environment

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "raylm-test", "AWS_SECRET_ACCESS_KEY": "raylm-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server() -> Iterator[str]:
    """Yields ``http://127.0.0.1:PORT`` of a running S3 server; credentials for it are in this process's environment."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    with environment(CREDENTIALS):
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def new_bucket(endpoint: str) -> str:
    """A fresh bucket; its ``s3://`` URI with the endpoint."""
    import pyarrow.fs

    name = f"raylm-{uuid.uuid4().hex[:8]}"
    pyarrow.fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}/runs?endpoint_override={endpoint}"


GCS_PROJECT = "raylm-test"


# gcp-storage-emulator's HTTP server answers one connection at a time, and the GCS client keeps a download's connection
# open while it reads another file: with several transfers in flight (raylm makes four) both would wait forever.
GCS_SERVER_SCRIPT = """
import http.server, sys
http.server.HTTPServer = http.server.ThreadingHTTPServer
from gcp_storage_emulator.server import create_server
create_server("127.0.0.1", int(sys.argv[1]), in_memory=True).run()
"""


@contextmanager
def gcs_server() -> Iterator[str]:
    """Yields ``127.0.0.1:PORT`` of a running GCS server (its own process). This process's environment gets what a
    machine outside Google's metadata service uses: ``GOOGLE_APPLICATION_CREDENTIALS``, a service account key (made
    here, a real RSA key that signs the JWT each request carries; the server accepts any) and ``GOOGLE_CLOUD_PROJECT``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    with tempfile.TemporaryDirectory(prefix="raylm-gcs-") as keys:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
        account = Path(keys) / "service-account.json"
        account.write_text(json.dumps({"type": "service_account", "project_id": GCS_PROJECT, "private_key_id": "1", "private_key": pem,
                                       "client_email": f"raylm@{GCS_PROJECT}.iam.gserviceaccount.com", "client_id": "1",
                                       "token_uri": "https://oauth2.googleapis.com/token"}))
        port = free_port()
        with open(Path(keys) / "server.log", "w") as log:
            server = subprocess.Popen([sys.executable, "-c", GCS_SERVER_SCRIPT, str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            with environment({"GOOGLE_APPLICATION_CREDENTIALS": str(account), "GOOGLE_CLOUD_PROJECT": GCS_PROJECT}):
                _wait_until_listening(port, server, Path(keys) / "server.log")
                yield f"127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)


def _wait_until_listening(port: int, server: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, f"the GCS server exited: {log.read_text()[-2000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"the GCS server did not listen on {port} in {timeout_s} s"
            time.sleep(0.1)


def new_gcs_bucket(endpoint: str) -> str:
    """A fresh bucket; its ``gs://`` URI with the endpoint (plain HTTP)."""
    import pyarrow.fs

    name = f"raylm-{uuid.uuid4().hex[:8]}"
    pyarrow.fs.GcsFileSystem(endpoint_override=endpoint, scheme="http", project_id=GCS_PROJECT).create_dir(name)
    return f"gs://{name}/runs?endpoint_override={endpoint}&scheme=http"


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
