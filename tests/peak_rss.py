"""A process's peak resident set size since a reset, from /proc (Linux); no imports beyond the standard library,
so a measured child process starts light. Used by ``tests/host_memory.py`` and ``test_data_prepare``."""

from __future__ import annotations


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024  # kB


def start_measuring() -> float:
    """Reset the peak resident set size to the current one (Linux clear_refs 5); returns the current one in MiB.

    Not ``ru_maxrss``: it survives ``execve``, so a spawned rank would start from its parent's size.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_mib("VmRSS")


def peak_since(start: float) -> float:
    """MiB the resident set grew by at its peak since ``start_measuring`` returned ``start``."""
    return _status_mib("VmHWM") - start
