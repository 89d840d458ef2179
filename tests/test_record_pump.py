"""The driver's record pump against a real relay actor: replayed records fill what a dead driver never wrote."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from raylm.configs.loader import load_config
from raylm.trainer.metrics import MetricsFile, read_records
from conftest import TINY_PRETRAIN


def _train(step: int, loss: float) -> dict:
    return {"stage": "pretrain", "step": step, "kind": "train", "loss": loss, "tokens_per_s": 1.0, "mfu": 0.0}


def test_replayed_records_fill_the_gap_a_dead_driver_left_and_nothing_twice(ray_cluster, tmp_path: Path):
    from raylm.cluster.relay import start_relay, stop_relay
    from raylm.launcher.record_pump import RecordPump

    cfg = load_config("tiny", TINY_PRETRAIN)
    # What a first driver wrote before it was killed: the start and steps 1-2 (steps 3-4 and the step-4 checkpoint
    # event were still in its relay).
    first = MetricsFile(tmp_path / "metrics.jsonl")
    for record in ({"stage": "pretrain", "step": 0, "kind": "start", "world_size": 2, "tp": 1, "pp": 1, "dp": 2, "zero_stage": 0},
                   _train(1, 6.0), _train(2, 5.9)):
        first.write(record)

    relay = start_relay()
    shown = io.StringIO()
    pump = RecordPump(relay, tmp_path, "run", [("pretrain", cfg)], Console(file=shown, force_terminal=False))
    try:
        kept = [_train(1, 6.0), _train(2, 5.9), _train(3, 5.8), _train(4, 5.7),
                {"stage": "pretrain", "step": 4, "kind": "event", "event": "checkpoint"}]
        for record in kept:
            relay.put.remote({**record, "replayed": True})
        relay.put.remote({"stage": "pretrain", "step": 4, "kind": "start", "world_size": 2, "tp": 1, "pp": 1, "dp": 2, "zero_stage": 0})
        relay.put.remote(_train(5, 5.6))
        pump.pump()
    finally:
        stop_relay(relay)
        pump.finish_all()

    records = read_records(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records if r["kind"] == "train"] == [("train", s) for s in (1, 2, 3, 4, 5)]
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [4]
    assert not any("replayed" in r for r in records)
    restart = next(r for r in records if r.get("event") == "restart")
    # Counted from what the run knows at the restart, the replayed steps included.
    assert restart["step"] == 4 and restart["last_logged_step"] == 4 and restart["steps_lost"] == 0
