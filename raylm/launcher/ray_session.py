"""The per-rank session under Ray Train: checkpoints travel through ``ray.train.report``, metrics
through the driver's relay, and on a run in object storage everything else through the store."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

import ray.train
import torch.distributed as dist

from raylm import storage
from raylm.trainer.checkpoint import MANIFEST, step_dir_name, step_dirs, verify
from raylm.trainer.session import fresh_checkpoint_dir, newest_first_unique, prune_checkpoints
from raylm.trainer.stored_checkpoints import fetch_stored, stored_steps, verify_stored


class RaySession:
    """On a disk every rank sees, ranks write their files straight into the checkpoint directory in Ray Train's
    storage (``<run>/<stage>/step_N``) and report it, Ray told not to upload it: each byte is written once.

    On object storage each rank writes its own files into a private temp dir and uploads each into the bucket's
    checkpoint directory as soon as it is complete, rank 0's manifest last; every rank then reports that
    directory. Rank 0's metrics records go to the driver's relay actor: the driver writes metrics.jsonl and owns
    the W&B run, so neither is lost with a worker.
    """

    owns_metrics = False

    def __init__(self, stage_dir: Path, keep_last: int, relay):
        self.stage_dir = stage_dir
        self.keep_last = keep_last
        self.relay = relay
        self.store: Optional[storage.Store] = storage.store_of(stage_dir.parent)
        self.stage = stage_dir.name
        self._uploads: Optional[storage.Uploads] = None
        self._uploading_to = ""
        """Where the files of the checkpoint being written go in the bucket."""

    def record(self, record: dict) -> None:
        self.relay.put.remote(record)  # in order, without waiting: actor calls from one caller run in sequence

    def resume_candidates(self) -> List[Path]:
        """Newest step first: Ray's latest registered checkpoint can be older than a complete
        one written after the driver died (its controller never registered it)."""
        latest = ray.train.get_checkpoint()
        # The fit's latest checkpoint may be an earlier stage's: the fit runs every stage of a worker group.
        latest_path = self.stage_dir / Path(latest.path).name if latest is not None and Path(latest.path).parent.name == self.stage else None
        if self.store is None:
            return newest_first_unique([*step_dirs(self.stage_dir), latest_path])
        return newest_first_unique([*(self.stage_dir / name for name in stored_steps(self.store, self.stage)), latest_path])

    def verify(self, checkpoint: Path) -> Optional[str]:
        if self.store is None:
            return verify(checkpoint)
        return verify_stored(self.store, f"{self.stage}/{checkpoint.name}")

    def fetch(self, checkpoint: Path, wanted: Callable[[str], bool]) -> None:
        if self.store is None:
            return
        began = time.perf_counter()
        count, fetched = fetch_stored(self.store, f"{self.stage}/{checkpoint.name}", checkpoint, wanted)
        seconds = time.perf_counter() - began
        rank = ray.train.get_context().get_world_rank()
        print(f"[raylm] rank {rank} fetched {count} file(s), {fetched / 2**20:.1f} MiB, of checkpoint "
              f"{self.store.display(self.stage)}/{checkpoint.name}", flush=True)
        self.relay.put.remote({"stage": self.stage, "step": 0, "kind": "event", "event": "fetched_checkpoint",
                               "checkpoint": checkpoint.name, "rank": rank, "files": count, "bytes": fetched,
                               "seconds": seconds})

    def publish(self, run_dir: Path, rel: str) -> None:
        """A directory goes up with its contents file (other machines fetch it by content), a file as it is."""
        if (run_dir / rel).is_dir():
            storage.push_tree(run_dir, rel)
        else:
            storage.push(run_dir, rel)

    def checkpoint_dir(self, step: int) -> Path:
        if self.store is None:
            return fresh_checkpoint_dir(self.stage_dir, step)
        self._uploads = storage.Uploads(self.store)
        self._uploading_to = f"{self.stage}/{step_dir_name(step)}"
        return Path(tempfile.mkdtemp(prefix=f"raylm-{step_dir_name(step)}-"))

    def written(self, directory: Path, rel: str) -> None:
        """To a bucket, each file goes up as soon as it is complete, while the rank writes the next."""
        if self.store is not None:
            self._uploads.start(directory / rel, f"{self._uploading_to}/{rel}")

    def commit(self, step: int, directory: Path, metrics: dict, group: Optional[dist.ProcessGroup]) -> None:
        """Register the checkpoint where it already lies, Ray told not to copy it: on a disk the ranks wrote it in
        place; to a bucket they upload it themselves first (``_upload``)."""
        rel = f"{self.stage}/{step_dir_name(step)}"  # the fit's directory is the run's
        if self.store is None:
            checkpoint = ray.train.Checkpoint.from_directory(str(directory))
        else:
            self._upload(directory, rel, group)
            checkpoint = ray.train.Checkpoint(path=self.store.path(rel), filesystem=self.store.fs)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=rel, checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)

    def _upload(self, staging: Path, rel: str, group: Optional[dist.ProcessGroup]) -> None:
        """Every rank's files into ``rel`` of the bucket, then (after a barrier) rank 0's manifest: the checkpoint
        never looks complete before it is. Each file went up as soon as it was written (``written``: every file but
        the manifest goes through raylm's ledger, DeepSpeed's recovery scripts are not written); several go up at
        once, where Ray's own upload sends one file, one part at a time (its guard against an Arrow deadlock fixed
        in Arrow 19)."""
        self._uploads.wait()
        dist.barrier(group=group)
        if (staging / MANIFEST).is_file():
            self.store.upload(staging / MANIFEST, f"{rel}/{MANIFEST}")
        shutil.rmtree(staging, ignore_errors=True)

    def prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; every rank's files of the last one are in storage once
        ``report`` returns. (Ray Train keeps every checkpoint it registered: see ``raylm.launcher.trainer``.)"""
        if self.store is None:
            prune_checkpoints(self.stage_dir, self.keep_last)
            return
        complete = [name for name in stored_steps(self.store, self.stage) if self.store.is_file(f"{self.stage}/{name}/{MANIFEST}")]
        for old in complete[self.keep_last :]:
            self.store.delete_file(f"{self.stage}/{old}/{MANIFEST}")  # manifest first, as on a disk
            self.store.delete_dir(f"{self.stage}/{old}")

    def close(self, step: int) -> None:
        """One last report: it releases the ranks an elastic restart left without work (they wait in ``report``)."""
        ray.train.report({"step": step, "finished": 1}, checkpoint=None)
