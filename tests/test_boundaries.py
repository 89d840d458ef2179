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


CONTROLLER_CHECK = """
import pickle, sys
from raylm.cluster.backend import WorkersOnlyConfig
blob = pickle.dumps(WorkersOnlyConfig(backend="gloo"))
for name in [m for m in sys.modules if m == "raylm" or m.startswith("raylm.")]:
    del sys.modules[name]
config = pickle.loads(blob)
assert config.backend_cls.share_cuda_visible_devices
print(" ".join(sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "raylm.trainer", "raylm.launcher")))))
"""


def test_ray_trains_controller_unpickles_the_backend_config_without_torch():
    """The controller process trains nothing: the config raylm hands it must not make it import torch (~3 CPU-s)."""
    result = subprocess.run([sys.executable, "-c", CONTROLLER_CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"imported to unpickle the backend config: {result.stdout.strip()}"
