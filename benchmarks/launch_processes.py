"""Where a launch's CPU goes, process by process, on the embedded cluster: Ray Train's actors, the workers, Ray.

    python benchmarks/launch_processes.py [--launches 3] [--out DIR]

On a machine with few cores a launch is CPU-bound, so every process a launch starts costs wall time. Runs
``--launches`` pairs of one-stage launches (2 workers, 5 steps) on one embedded cluster, alternating Ray Train's
preemption watcher on (Ray's default) and off (raylm's default on an embedded cluster); the first launch warms the
cluster and is not counted. Each launch's CPU seconds are summed per process title (``ray::TrainController``, ...)
from a 0.1 s sampling of every process on the machine, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, pretrain_overrides, run_on_ray, write_result  # noqa: E402

WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


class CpuByProcess(threading.Thread):
    """The latest CPU seconds of every process on the machine, sampled every 0.1 s (a process that ends keeps its
    last sample), under its latest title."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: Dict[Tuple[int, float], Tuple[str, float]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.wait(0.1):
            for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times", "create_time"]):
                info = proc.info
                if info["cpu_times"] is None:
                    continue
                key = (info["pid"], info["create_time"])
                # Ray retitles a worker once it holds an actor; an ending process loses its command line.
                title = os.path.basename(info["cmdline"][0].split(" ")[0]) if info["cmdline"] else self.seen.get(key, (info["name"],))[0]
                self.seen[key] = (title, sum(info["cpu_times"][:2]))

    def since(self, before: Dict[Tuple[int, float], Tuple[str, float]]) -> Dict[str, float]:
        by_title: Dict[str, float] = defaultdict(float)
        for key, (title, cpu) in dict(self.seen).items():
            by_title[title] += cpu - before.get(key, (title, 0.0))[1]
        return {title: round(cpu, 2) for title, cpu in by_title.items() if cpu >= 0.05}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=3, help="launches with the watcher on, and as many with it off")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from raylm.cluster.connect import shutdown, start_or_connect

    info = start_or_connect(None)
    sampler = CpuByProcess()
    sampler.start()
    overrides = pretrain_overrides(steps=5, workers=2, zero=2)
    results: Dict[str, list] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as root:
        run_on_ray(Path(root), "warm", overrides, info)
        for index in range(2 * args.launches):
            watcher = ("on", "off")[index % 2]
            os.environ[WATCHER] = "1" if watcher == "on" else "0"  # Ray Train hands the driver's setting to its controller
            time.sleep(0.5)
            before, began = dict(sampler.seen), time.perf_counter()
            run_on_ray(Path(root), f"{watcher}{index}", overrides, info)
            wall = time.perf_counter() - began
            time.sleep(0.5)
            by_title = sampler.since(before)
            results[watcher].append({"wall_s": round(wall, 2), "cpu_s": round(sum(by_title.values()), 2), "by_process": by_title})
    sampler.done.set()
    shutdown()
    median = lambda watcher, key: statistics.median(r[key] for r in results[watcher])
    write_result(args.out, "launch_processes", {
        "cpu": cpu_model(), "cores": os.cpu_count(), "launches_each": args.launches,
        "cpu_s_per_launch": {w: median(w, "cpu_s") for w in results}, "wall_s_per_launch": {w: median(w, "wall_s") for w in results},
        "cpu_ratio_off_vs_on": round(median("off", "cpu_s") / median("on", "cpu_s"), 3),
        "wall_ratio_off_vs_on": round(median("off", "wall_s") / median("on", "wall_s"), 3),
        "launches": results,
    })


if __name__ == "__main__":
    main()
