"""The metrics relay: an actor on the driver's node that holds rank 0's records until the driver takes them.

Workers may die at any moment; what they handed to the relay stays with the
driver, which writes metrics.jsonl and logs to W&B itself. No worker needs
the run's disk or the W&B key.
"""

from __future__ import annotations

from typing import Any, Dict, List

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0, max_restarts=0)
class MetricsRelay:
    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []

    def put(self, record: Dict[str, Any]) -> None:
        self.records.append(record)

    def drain(self) -> List[Dict[str, Any]]:
        taken, self.records = self.records, []
        return taken


def start_relay():
    """A relay on this (the driver's) node."""
    here = ray.get_runtime_context().get_node_id()
    return MetricsRelay.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


def drain(relay) -> List[Dict[str, Any]]:
    return ray.get(relay.drain.remote())


def stop_relay(relay) -> None:
    ray.kill(relay)
