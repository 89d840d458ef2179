"""Where a stage's wall time went, from the driver's clock and the records its ranks sent."""

from __future__ import annotations

from typing import Dict, List, Optional


def stage_timeline(records: List[dict], prepare_s: float, fit_began: float, fit_ended: float,
                   began: Optional[float] = None) -> Dict[str, object]:
    """Seconds per phase of the stage's first attempt (a restart's own start-up shows in its start record):

    ``driver_data`` tokenizer and data on the driver; ``workers_up`` from ``began`` (the fit's start, or where
    the stage before it in the same fit ended) until the per-rank function began the stage: Ray Train's
    controller and worker group for a fit's first stage; ``rank_setup`` rank 0's phases from there to its start
    record; ``first_step`` to the first logged step; ``steps`` to the last one; ``finish`` the last step to the end record (final eval and
    checkpoint, gathered and saved weights, sample; ``finish_phases`` splits the part after the loop);
    ``teardown`` from there until ``fit_ended``: for a fit's last stage when ``fit()`` returned (last report, Ray's
    poll, the worker group's shutdown), for the others their own end (the worker group goes on).
    Empty when the stage logged no start or end in this fit.
    """
    mine = [r for r in records if r.get("time", 0) >= fit_began]
    starts = [r for r in mine if r.get("kind") == "start" and "entered" in r]
    end = next((r for r in reversed(mine) if r.get("kind") == "end"), None)
    if not starts or end is None:
        return {}
    start = starts[0]
    train = [r for r in mine if r.get("kind") == "train"]
    first, last = (train[0], train[-1]) if train else (end, end)
    return {
        "driver_data": round(prepare_s, 3),
        "workers_up": round(start["entered"] - (fit_began if began is None else began), 3),
        "rank_setup": round(start["time"] - start["entered"], 3),
        "rank_setup_phases": start.get("setup_s", {}),
        "first_step": round(first["time"] - start["time"], 3),
        "steps": round(last["time"] - first["time"], 3),
        "finish": round(end["time"] - last["time"], 3),
        "finish_phases": end.get("finish_s", {}),
        "teardown": round(fit_ended - end["time"], 3),
        "restarts": len(starts) - 1,
    }
