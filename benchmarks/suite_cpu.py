"""A pytest plugin: each test's wall seconds and the whole machine's busy and idle CPU-seconds over it (setup, call
and teardown), one JSON line per test in $SUITE_CPU_LOG, then a summary of the tests that left the most idle.

On a 2-core machine the suite is CPU-bound but for what waits (timers, single-threaded phases): the idle column
says where running work side by side could pay, the busy one where doing less would.

    SUITE_CPU_LOG=/tmp/suite_cpu.jsonl PYTHONPATH=benchmarks .venv/bin/python -m pytest -p suite_cpu -q
"""

from __future__ import annotations

import json
import os
import time

import pytest


def _busy_and_idle_ticks():
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal, idle + iowait


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    busy, idle = _busy_and_idle_ticks()
    began = time.time()
    yield
    busy_after, idle_after = _busy_and_idle_ticks()
    record = {"test": item.nodeid, "wall": round(time.time() - began, 2), "busy": (busy_after - busy) / TICKS_PER_S,
              "idle": (idle_after - idle) / TICKS_PER_S}
    with open(os.environ["SUITE_CPU_LOG"], "a") as log:
        log.write(json.dumps(record) + "\n")


def pytest_terminal_summary(terminalreporter):
    with open(os.environ["SUITE_CPU_LOG"]) as log:
        records = [json.loads(line) for line in log]
    total = {key: sum(r[key] for r in records) for key in ("wall", "busy", "idle")}
    terminalreporter.write_line(f"suite_cpu: {len(records)} tests, {total['wall']:.0f} s wall, {total['busy']:.0f} CPU-s busy, "
                                f"{total['idle']:.0f} CPU-s idle")
    for r in sorted(records, key=lambda r: -r["idle"])[:15]:
        terminalreporter.write_line(f"  {r['wall']:7.1f} s  busy {r['busy']:6.1f}  idle {r['idle']:6.1f}  {r['test']}")
