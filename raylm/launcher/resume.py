"""Which settings may change when a run is resumed."""

from __future__ import annotations

import re
from typing import Dict, Iterable, List

from omegaconf import OmegaConf

from raylm.configs.loader import apply_overrides, to_run_config
from raylm.configs.schema import RunConfig
from raylm.configs.validate import validate
from raylm.errors import UserError

# Changing anything else would change the model or the data order. The
# layout (parallel.*, workers, precision) may change: a checkpoint written with
# another layout is resumed from its layout-free copy.
SAFE_ON_RESUME = (
    "parallel.",
    "cluster.",
    "train.precision",
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.ckpt_every",
    "train.keep_last",
    "train.async_checkpoint",
    "train.sample_tokens",
    "logging.",
    "fault.",
    "eval_tasks",
)


def is_safe(key: str) -> bool:
    section_key = re.sub(r"^stages\.[^.]+\.", "", key)  # a stage by index or by name
    return any(section_key == safe or (safe.endswith(".") and section_key.startswith(safe)) for safe in SAFE_ON_RESUME)


def with_resume_overrides(run: RunConfig, overrides: Iterable[str]) -> RunConfig:
    overrides = list(overrides)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item} must look like key=value (e.g. --set train.max_steps=200)")
        if not is_safe(key):
            raise UserError(
                f"--set {key} cannot change on resume (it changes the model or the data order); "
                f"safe keys: {', '.join(k + '*' if k.endswith('.') else k for k in SAFE_ON_RESUME)}; "
                "for anything else start a new run with stages.0.init_from"
            )
    cfg = apply_overrides(OmegaConf.structured(run), overrides)
    updated = to_run_config(cfg)
    validate(updated)
    return updated


def _flat(node, prefix: str = "") -> Dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
        return {k: v for i, value in enumerate(node) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: node}


def differing_keys(saved: RunConfig, new: RunConfig) -> List[str]:
    """Dotted keys whose values differ between two configs (stages by position)."""
    a, b = (_flat(OmegaConf.to_container(OmegaConf.structured(run))) for run in (saved, new))
    return sorted(key for key in a.keys() | b.keys() if key != "name" and a.get(key, "<absent>") != b.get(key, "<absent>"))


def relaunch_config(saved: RunConfig, new: RunConfig) -> RunConfig:
    """The config a relaunch of an existing run continues with: the new one, if it changes only safe keys."""
    unsafe = [key for key in differing_keys(saved, new) if not is_safe(key)]
    if unsafe:
        shown = ", ".join(unsafe[:6]) + (f" and {len(unsafe) - 6} more" if len(unsafe) > 6 else "")
        raise UserError(
            f"run '{saved.name}' exists with another config ({shown} differ; they change the model or the data order); "
            "relaunch with the config it was started with, or pick another --name"
        )
    return new
