"""The per-rank runtime (raylm/trainer) never imports Ray or the driver: the path says where code runs."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import raylm.trainer

CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "raylm.launcher", "raylm.cluster")))
print(" ".join(leaked))
"""


def test_trainer_modules_import_neither_ray_nor_the_driver():
    modules = [f"raylm.trainer.{info.name}" for info in pkgutil.iter_modules(raylm.trainer.__path__)]
    assert "raylm.trainer.worker" in modules and "raylm.trainer.torchrun_main" in modules
    result = subprocess.run([sys.executable, "-c", CHECK, *modules], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"imported by the per-rank runtime: {result.stdout.strip()}"
