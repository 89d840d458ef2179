"""A rank's log file under ``<run>/<stage>/logs/``: its stdout and stderr (DeepSpeed's and raylm's), and, on a
run in object storage, how the log reaches the store although nobody can read a worker's disk afterwards.

A rank ships its log to the store every ``SHIP_EVERY_S`` while it works and once when it stops, so a SIGKILL
(which skips every ``finally``) loses at most that interval of lines. A rank that starts a stage continues
the stored log when it is longer than this machine's copy: after a restart on another machine the log still
holds every attempt, in order.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from raylm import storage
from raylm.launcher.periodic import Periodic
from raylm.trainer.layout import LOGS_DIR, rank_log_name

SHIP_EVERY_S = 30.0


def log_rel(stage: str, rank: int) -> str:
    return f"{stage}/{LOGS_DIR}/{rank_log_name(rank)}"


def continue_stored_log(run_dir: Path, rel: str) -> None:
    """On a run in object storage: take the stored copy of the log when it is longer than this machine's
    (logs only grow, so the longer one holds the other's lines)."""
    store = storage.store_of(run_dir)
    if store is None:
        return
    import pyarrow.fs

    stored = store.fs.get_file_info(store.path(rel))
    local = run_dir / rel
    if stored.type == pyarrow.fs.FileType.File and stored.size > (local.stat().st_size if local.exists() else 0):
        store.download(rel, local)


def redirect_output(run_dir: Path, rel: str) -> None:
    """This process's stdout and stderr, appended to ``run_dir/rel`` from here on."""
    local = run_dir / rel
    local.parent.mkdir(parents=True, exist_ok=True)
    continue_stored_log(run_dir, rel)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(local, "a", buffering=1) as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)


class LogShipper(Periodic):
    """Uploads ``run_dir/rel`` to the run's store every ``every_s`` while in use and once on exit, failed or not;
    nothing on a run without a store."""

    def __init__(self, run_dir: Path, rel: str, every_s: float = SHIP_EVERY_S):
        super().__init__(self.ship, every_s, "raylm-log-shipper")
        self.run_dir = run_dir
        self.rel = rel
        self._shipped_size = -1

    def ship(self) -> None:
        """Upload the log if it grew since the last upload (a failed upload is retried next time)."""
        sys.stdout.flush()
        sys.stderr.flush()
        local = self.run_dir / self.rel
        size = local.stat().st_size if local.exists() else -1
        if size == self._shipped_size:
            return
        try:
            storage.push(self.run_dir, self.rel)
        except OSError as err:
            print(f"[raylm] warning: could not upload {self.rel} ({err}); trying again in {self.every_s:g} s", flush=True)
            return
        self._shipped_size = size
