"""Recovery after a killed worker, and checkpoint save throughput, in one run.

1. Start a run from scratch and time launch -> first training step (the
   baseline a restart is compared with).
2. SIGKILL one worker mid-run; time kill -> first step after the restart, and
   count the logged steps that had to be redone (work lost).
3. Checkpoint save throughput (bytes of a complete checkpoint / seconds its
   save took, from the run's own ``checkpoint`` events: every file written,
   hashed and fsynced, the manifest committed, the checkpoint reported) against
   the raw sequential write speed of the same disk (a file of the same size
   written and fsynced in this process, once the run's writes are flushed; the
   median of three).
4. The training stall of an asynchronous checkpoint (``train.async_checkpoint``): a
   second run, the same but for that setting and the kill; the median of its
   checkpoints' ``stall_s`` (training-thread seconds: the host snapshot and the
   commit) over the median synchronous save of the first run. The checkpoint at
   the last step is left out of both: there the stage waits for it to end.

    .venv/bin/python benchmarks/recovery.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import cpu_model, median_rate, pretrain_overrides, run_on_ray, write_result  # noqa: E402
from faults import latest_step, signal_worker  # noqa: E402  (the tests' failure injectors)

# fp32: 'auto' may pick bf16 on one run and not the next (it measures the CPU), and the checkpoint's size with it.
STEPS = 40
RUN = [*pretrain_overrides(STEPS, workers=2, zero=2, log_every=1), "train.ckpt_every=10", "fault.max_failures=2", "train.precision=fp32"]


def records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def raw_write_speed(directory: Path, size: int) -> float:
    """Bytes/s of a sequential write of ``size`` bytes, fsynced. The disk is made quiet first (``os.sync``), so a
    probe times the disk, not the writeback of files the run left unsynced."""
    block = os.urandom(1 << 20)
    path = directory / "raw-write-probe.bin"
    size = -(-size // len(block)) * len(block)

    def write(_attempt: int) -> None:
        with open(path, "wb") as handle:
            for _ in range(size // len(block)):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        path.unlink()

    os.sync()
    return median_rate(write, size)


def saves_before_the_end(run_dir: Path):
    """The run's checkpoint events but the last step's (the stage waits for that one to finish)."""
    return [r for r in records(run_dir) if r.get("event") == "checkpoint" and r["step"] < STEPS]


def main() -> None:
    import threading

    from rich.console import Console

    from raylm.cluster.connect import start_or_connect
    from raylm.configs.loader import load_config
    from raylm.trainer import run_dir as rundir
    from raylm.launcher.stages import run_all

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="raylm-recovery-"))
    info = start_or_connect(None)

    run = load_config("tiny", [f"runs_dir={root}", "name=recovery", *RUN])
    run_dir = rundir.create(run, "recovery")
    killed: dict = {}

    def kill_mid_run() -> None:
        while latest_step(run_dir) < 25:
            time.sleep(0.02)
        killed["time"] = time.time()
        killed["step"] = latest_step(run_dir)
        signal_worker(run_dir / "pretrain", signal.SIGKILL)

    threading.Thread(target=kill_mid_run, daemon=True).start()
    launched = time.time()
    run_all(run_dir, run, info, Console(quiet=True))

    recs = [r for r in records(run_dir) if r.get("stage") == "pretrain"]
    first_step = next(r["time"] for r in recs if r["kind"] == "train")
    restart = next(r for r in recs if r.get("event") == "restart")
    first_after = next(r["time"] for r in recs if r["kind"] == "train" and r["time"] > restart["time"])
    saves = [r for r in recs if r.get("event") == "checkpoint"]
    save_bytes = sum(r["bytes"] for r in saves)
    save_seconds = sum(r["seconds"] for r in saves)
    raw = raw_write_speed(run_dir, max(save_bytes // len(saves), 1 << 20))
    run_on_ray(root, "async", [*RUN, "train.async_checkpoint=true"], info)
    sync_save_s = statistics.median(r["seconds"] for r in saves_before_the_end(run_dir))
    async_saves = saves_before_the_end(root / "async")
    async_stall_s = statistics.median(r["stall_s"] for r in async_saves)
    result = {
        "cpu": cpu_model(),
        "start_to_first_step_s": first_step - launched,
        "kill_to_first_step_after_restart_s": first_after - killed["time"],
        "recovery_over_cold_start": (first_after - killed["time"]) / (first_step - launched),
        "killed_at_step": killed["step"],
        "resumed_at_step": restart["step"],
        "steps_lost": restart["steps_lost"],
        "checkpoint_mb": save_bytes / len(saves) / 1e6,
        "checkpoint_save_mb_per_s": save_bytes / save_seconds / 1e6,
        "raw_sequential_write_mb_per_s": raw / 1e6,
        "save_over_raw_write": (save_bytes / save_seconds) / raw,
        "sync_save_s": sync_save_s,
        "async_stall_s": async_stall_s,
        "async_save_to_commit_s": statistics.median(r["seconds"] for r in async_saves),
        "async_stall_over_sync_save": async_stall_s / sync_save_s,
    }
    write_result(args.out, "recovery", result)


if __name__ == "__main__":
    main()
