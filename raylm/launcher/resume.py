"""Which settings may change when a run is resumed."""

from __future__ import annotations

import re
from typing import Iterable

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
    "train.sample_tokens",
    "logging.",
    "fault.",
)


def is_safe(key: str) -> bool:
    section_key = re.sub(r"^stages\.\d+\.", "", key)
    return any(section_key == safe or (safe.endswith(".") and section_key.startswith(safe)) for safe in SAFE_ON_RESUME)


def with_resume_overrides(run: RunConfig, overrides: Iterable[str]) -> RunConfig:
    overrides = list(overrides)
    for item in overrides:
        key = item.partition("=")[0]
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
