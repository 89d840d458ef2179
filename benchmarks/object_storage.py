"""Runs in object storage against a local S3 server (moto's), in one run:

1. Checkpoint save throughput (the run's own ``checkpoint`` events: every
   file written and hashed, uploaded by its rank, the manifest last, the
   checkpoint reported to Ray Train) against a raw ``pyarrow.fs.copy_files``
   upload of as many bytes to the same bucket.
2. Checkpoint restore throughput after a SIGKILLed worker (the
   ``fetched_checkpoint`` events: each rank's own files, sha256-checked) against
   a raw ``copy_files`` download of the same checkpoint directory.
3. Bytes each stage's ranks downloaded of the run's inputs (``fetched`` events;
   the workers keep their own node cache, apart from the driver's): at the first
   start, after the restart, and for the second stage.

    .venv/bin/python benchmarks/object_storage.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import cpu_model, MODEL, median_rate, write_result  # noqa: E402
from object_store import new_bucket, s3_server  # noqa: E402  (the tests' S3 server)

RUN = [
    *MODEL, "train.max_steps=16", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=6", "train.global_batch_size=16",
    "train.sample_tokens=0", "parallel.micro_batch_size=4", "parallel.zero_stage=2", "cluster.num_workers=2", "fault.max_failures=2",
    "logging.wandb.mode=disabled", "logging.progress=false", "train.precision=fp32",  # as benchmarks/recovery.py
    "stages=[{name: pretrain, kind: pretrain}, {name: sft, kind: sft, data: {source: 'builtin:pydoc-sft'}, train: {max_steps: 4}}]",
]


def _raw_upload(store, size: int) -> float:
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "probe"
        probe.mkdir()
        (probe / "blob.bin").write_bytes(os.urandom(size))
        return median_rate(lambda attempt: pyarrow.fs.copy_files(
            str(probe), store.path(f"raw-probe-{attempt}"), source_filesystem=pyarrow.fs.LocalFileSystem(),
            destination_filesystem=store.fs, use_threads=True), size)


def _raw_download(store, rel: str) -> float:
    import pyarrow.fs

    def download(_attempt: int) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            pyarrow.fs.copy_files(store.path(rel), scratch, source_filesystem=store.fs, destination_filesystem=pyarrow.fs.LocalFileSystem(),
                                  use_threads=True)

    return median_rate(download, sum(store.files(rel).values()))


def main() -> None:
    from rich.console import Console

    from raylm.cluster.connect import start_or_connect
    from raylm.configs.loader import load_config
    from raylm.launcher.stages import prepare_data, run_all
    from raylm.storage import Store
    from raylm.trainer import run_dir as rundir
    from raylm.trainer.stored_checkpoints import stored_steps
    from faults import latest_step, worker_pids

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with s3_server() as endpoint:
        runs = new_bucket(endpoint)
        # The workers' node and the driver keep separate caches, as two machines would (Ray's processes take
        # the environment the cluster starts with).
        node_cache = os.environ["RAYLM_CACHE"] = tempfile.mkdtemp(prefix="raylm-node-cache-")
        info = start_or_connect(None)
        os.environ["RAYLM_CACHE"] = tempfile.mkdtemp(prefix="raylm-driver-cache-")
        run = load_config("tiny", [f"runs_dir={runs}", "name=bench", *RUN])
        run_dir = rundir.create(run, "bench")
        prepare_data(run_dir, run, Console(quiet=True))

        # The workers' logs (with their pids) are in their node's view of the run.
        node_view = Path(node_cache) / run_dir.relative_to(os.environ["RAYLM_CACHE"])

        def kill_mid_run() -> None:
            while latest_step(run_dir) < 9:
                time.sleep(0.02)
            os.kill(worker_pids(node_view / "pretrain")[-1], signal.SIGKILL)

        threading.Thread(target=kill_mid_run, daemon=True).start()
        run_all(run_dir, run, info, Console(quiet=True))

        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        store = Store(runs).child("bench")
        saves = [r for r in records if r.get("event") == "checkpoint" and r["stage"] == "pretrain"]
        save_rate = sum(r["bytes"] for r in saves) / sum(r["seconds"] for r in saves)
        restores = [r for r in records if r.get("event") == "fetched_checkpoint"]
        restore_rate = sum(r["bytes"] for r in restores) / max(r["seconds"] for r in restores)
        restart = next(r for r in records if r.get("event") == "restart")
        # The restored step may be pruned by now (train.keep_last): the raw download reads a kept one of the same size.
        checkpoint = f"pretrain/{stored_steps(store, 'pretrain')[0]}"
        raw_up = _raw_upload(Store(runs), int(sum(r["bytes"] for r in saves) / len(saves)))
        raw_down = _raw_download(store, checkpoint)
        fetched = [r for r in records if r.get("event") == "fetched"]

        def downloaded(stage: str, after_restart: bool) -> int:
            return sum(r["bytes"] for r in fetched if r["stage"] == stage and (r["time"] > restart["time"]) == after_restart)

        result = {
            "cpu": cpu_model(),
            "checkpoint_mb": sum(r["bytes"] for r in saves) / len(saves) / 1e6,
            "checkpoint_save_mb_per_s": save_rate / 1e6,
            "raw_upload_mb_per_s": raw_up / 1e6,
            "save_over_raw_upload": save_rate / raw_up,
            "restore_mb_per_s": restore_rate / 1e6,
            "raw_download_mb_per_s": raw_down / 1e6,
            "restore_over_raw_download": restore_rate / raw_down,
            "restore_mb_fetched": sum(r["bytes"] for r in restores) / 1e6,
            "checkpoint_mb_in_store": sum(store.files(checkpoint).values()) / 1e6,
            "pretrain_inputs_mb_first_start": downloaded("pretrain", False) / 1e6,
            "pretrain_inputs_mb_after_restart": downloaded("pretrain", True) / 1e6,
            "sft_inputs_mb": downloaded("sft", True) / 1e6,
        }
        write_result(args.out, "object_storage", result)


if __name__ == "__main__":
    main()
