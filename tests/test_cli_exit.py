"""The `raylm` process leaves its objects to the operating system at exit instead of collecting them one by one."""

from __future__ import annotations

import subprocess
import sys

# A handler registered before `main` runs after everything `main` and what it starts register (atexit is LIFO):
# by then the objects alive must be frozen, so that the interpreter's final collection skips them.
SCRIPT = """
import atexit, gc
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))
from raylm.launcher.cli import main
main(["config", "show", "tiny"])
main(["config", "show", "tiny"])
"""


def test_the_objects_alive_at_exit_are_frozen_after_every_other_exit_handler():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("frozen at exit: True"), done.stdout[-500:]
