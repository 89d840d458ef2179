"""The per-rank session under Ray Train: checkpoints travel through ``ray.train.report``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import List

import ray.train

from raylm.trainer.checkpoint import MANIFEST, registered_by_ray, step_dir_name, step_dirs
from raylm.trainer.session import newest_first_unique


class RaySession:
    """Each rank stages its own files in a private temp dir and reports it.

    Ray Train merges every worker's reported directory into one checkpoint
    directory in the stage's storage (``runs/<name>/<stage>/step_N``); a rank
    that wrote nothing reports no checkpoint but still calls ``report``
    (it is a barrier).
    """

    shared_staging = False

    def __init__(self, stage_dir: Path, keep_last: int):
        self.stage_dir = stage_dir
        self.keep_last = keep_last

    def resume_candidates(self) -> List[Path]:
        """Newest step first: Ray's latest registered checkpoint can be older than a complete
        one written after the driver died (its controller never registered it)."""
        latest = ray.train.get_checkpoint()
        latest_path = Path(latest.path) if latest is not None else None
        return newest_first_unique([*step_dirs(self.stage_dir), latest_path])

    def staging_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"raylm-{step_dir_name(step)}-"))

    def commit(self, step: int, staging: Path, metrics: dict) -> None:
        has_files = any(staging.iterdir())
        checkpoint = ray.train.Checkpoint.from_directory(str(staging)) if has_files else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=step_dir_name(step))
        shutil.rmtree(staging, ignore_errors=True)
        if ray.train.get_context().get_world_rank() == 0:
            self._prune_unregistered()

    def _prune_unregistered(self) -> None:
        """Ray Train deletes the checkpoints it registered beyond ``keep_last``; one that was complete on disk
        when its worker group failed is never registered, so never deleted. Older than the newest
        ``keep_last`` complete ones and unknown to Ray, it goes here."""
        registered = registered_by_ray(self.stage_dir)
        if registered is None:
            return
        complete = [path for path in step_dirs(self.stage_dir) if (path / MANIFEST).is_file()]
        for old in complete[self.keep_last :]:
            if old.name not in registered:
                shutil.rmtree(old, ignore_errors=True)

    def close(self, step: int) -> None:
        """One last report: it releases the ranks an elastic restart left without work (they wait in ``report``)."""
        ray.train.report({"step": step, "finished": 1}, checkpoint=None)
