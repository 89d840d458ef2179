"""A rank whose peer froze is ended by its heartbeat, with raylm's one line, before its collective times out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from raylm.configs.schema import FaultConfig
from raylm.trainer.watchdog import HANG_EXIT_CODE

HANG_TIMEOUT_S = 1.0

# Rank 0 beats and enters an all-reduce at once (the worst case: a forward pass right before the backward's
# gradient reduce); rank 1 joins the group, then never reaches the collective, like a SIGSTOPped peer.
RANK = """
import sys, time, torch, torch.distributed as dist
from raylm.configs.schema import FaultConfig
from raylm.trainer.watchdog import HangWatchdog
rank, store_path, timeout_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
# The rendezvous waits as long as either rank's start-up takes; the group under test waits as raylm's do.
dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
group = dist.new_group([0, 1], timeout=FaultConfig(hang_timeout_s=timeout_s).collective_timeout())
if rank == 1:
    time.sleep(60)
with HangWatchdog(timeout_s, "rank 0 of stage pretrain") as watchdog:
    time.sleep(timeout_s / 20)  # a step's beat comes at any moment, not in time with the watchdog's own clock
    watchdog.beat()
    dist.all_reduce(torch.ones(1), group=group)
"""


def test_collectives_wait_a_grace_past_the_hang_timeout():
    assert FaultConfig(hang_timeout_s=600).collective_timeout().total_seconds() == 660
    assert FaultConfig(hang_timeout_s=2).collective_timeout().total_seconds() == 3


def test_the_heartbeat_ends_a_rank_stuck_with_a_frozen_peer_before_gloo_does(tmp_path: Path):
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(tmp_path / "store"), str(HANG_TIMEOUT_S)],
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        _, stderr = ranks[0].communicate(timeout=60)
    finally:
        ranks[1].kill()
        ranks[1].wait()
    assert ranks[0].returncode == HANG_EXIT_CODE, stderr
    assert stderr.strip().splitlines()[-1].startswith(
        "[raylm] rank 0 of stage pretrain: no progress for 1 s (fault.hang_timeout_s=1); exiting"), stderr
