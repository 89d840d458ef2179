"""Training state that any layout can load: fp32 master weights, Adam moments and the schedule.

DeepSpeed's own checkpoint holds each rank's flat ZeRO partitions, which only
the layout that wrote them can read (ZeRO-1/2 refuse another data-parallel
size; tensor and pipeline shards are ours). Next to it every checkpoint gets a
``layout_free/`` directory:

- ``stage_PPP.safetensors``, one per pipeline stage, written by that stage's
  (dp 0, tp 0) rank: ``param/<name>``, ``exp_avg/<name>`` and
  ``exp_avg_sq/<name>`` for every trainable weight, gathered over ZeRO's
  data-parallel partitions and the tensor-parallel shards, under the dense
  raylm names (a tied output head is stored once, as the embedding);
- ``optimizer.json``: Adam's step count and the learning-rate scheduler state.

Loading slices each dense tensor for the new tensor rank and hands it to the
new ZeRO partitioning through DeepSpeed's fragment API, so training continues
as if the layout had never changed (same math, other summation order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from raylm.models.weights import TIED_HEAD
from raylm.parallelism.apply import ParallelModel
from raylm.parallelism.reshard import gather_tp_tensor, tp_shard_of

LAYOUT_FREE_DIR = "layout_free"
OPTIMIZER_FILE = "optimizer.json"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
PARAM = "param"


def trainable_by_name(par: ParallelModel) -> Dict[str, nn.Parameter]:
    """This rank's trainable weights under their dense names, one name per weight (a tied head maps to the embedding)."""
    named = par.module.state_dict(keep_vars=True) if par.pp == 1 else par.dense.state_dict(keep_vars=True)
    held = par.stage_names if par.pp > 1 else None
    names_of: Dict[int, list] = {}
    params: Dict[int, nn.Parameter] = {}
    for name, tensor in named.items():
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad and (held is None or name in held):
            names_of.setdefault(id(tensor), []).append(name)
            params[id(tensor)] = tensor
    out: Dict[str, nn.Parameter] = {}
    for key, names in names_of.items():
        preferred = [n for n in names if n != TIED_HEAD] or names
        out[preferred[0]] = params[key]
    return out


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW whose ``state`` holds the moments (behind DeepSpeed's ZeRO/bf16 wrapper, if any)."""
    wrapped = engine.optimizer
    return wrapped.optimizer if hasattr(wrapped, "optimizer") and isinstance(wrapped.optimizer, torch.optim.Optimizer) else wrapped


def _full_local(engine, param: nn.Parameter, key: Optional[str]) -> torch.Tensor:
    """This tensor rank's whole fp32 ``param`` (key None) or optimizer state ``key``; a collective over dp under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        return value.detach()
    # No ZeRO partitioning and no mixed precision: the module's parameter is what AdamW updates.
    return param.detach() if key is None else _inner_optimizer(engine).state[param][key].detach()


def adam_step(engine) -> int:
    steps = {int(state["step"]) for state in _inner_optimizer(engine).state.values() if "step" in state}
    if len(steps) != 1:
        raise RuntimeError(f"optimizer state holds step counts {sorted(steps)}; expected exactly one")
    return steps.pop()


def save_layout_free(engine, par: ParallelModel, out_dir: Path) -> None:
    """Write this rank's part of ``layout_free/`` (only one rank per pipeline stage writes); a collective."""
    groups = par.groups
    writer = groups.dp_rank == 0 and groups.tp_rank == 0
    _link_fragments(engine)
    tensors: Dict[str, torch.Tensor] = {}
    for name, param in trainable_by_name(par).items():
        for key in (None, *ADAM_MOMENTS):
            dense = gather_tp_tensor(_full_local(engine, param, key).float(), name, groups.tp_group)
            if writer:
                tensors[f"{key or PARAM}/{name}"] = dense.to("cpu", copy=True).contiguous()
    step = adam_step(engine)
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out_dir / f"stage_{groups.pp_rank:03d}.safetensors"), metadata={"format": "raylm-layout-free"})
    if dist.get_rank() == 0:
        meta = {"adam_step": step, "scheduler": engine.lr_scheduler.state_dict()}
        (out_dir / OPTIMIZER_FILE).write_text(json.dumps(meta, indent=1))


def read_layout_free_weights(src_dir: Path) -> Dict[str, torch.Tensor]:
    """The dense fp32 master weights of a layout-free checkpoint (every stage file merged)."""
    weights: Dict[str, torch.Tensor] = {}
    prefix = f"{PARAM}/"
    for path in sorted(src_dir.glob("stage_*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    weights[key[len(prefix):]] = handle.get_tensor(key)
    return weights


def _create_adam_state(engine, step: int) -> None:
    """AdamW creates its state at the first step; make it now (zeros, ``step`` taken) so it can be filled."""
    inner = _inner_optimizer(engine)
    # ZeRO-3 hands AdamW its flat fp32 partitions only for the duration of a step.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [p for g in inner.param_groups for p in g["params"]]
    for flat in flats:
        state = inner.state[flat]
        state["step"] = torch.tensor(float(step))
        for key in ADAM_MOMENTS:
            state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    _link_fragments(engine)


def _link_fragments(engine) -> None:
    """Point every weight at its fragment of the flat Adam state (ZeRO-1/2 and DeepSpeed's bf16 optimizer).

    DeepSpeed 0.19.8 links them once, right after the *first* param group's
    first step, so the weights of every later group (our no-decay group) stay
    linked to an empty state; linking again once all state exists fixes that.
    """
    wrapped = engine.optimizer
    if hasattr(wrapped, "_lazy_init_hp_params_optimizer_state"):
        wrapped._hp_optimizer_states_linked = False
        wrapped._lazy_init_hp_params_optimizer_state()


def _set_zero3_partition(param: nn.Parameter, value: torch.Tensor, key: Optional[str]) -> None:
    """ZeRO-3: copy this rank's (padded) partition of ``value`` into the fp32 weight or state ``key``."""
    optimizer = param._z3_optimizer
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    partition = partition.data  # the fp32 weight is a leaf that requires grad
    size = partition.numel()
    start = size * optimizer._get_param_partition_rank(param)
    flat = value.flatten()
    present = max(0, min(size, flat.numel() - start))
    partition.zero_()
    partition[:present].copy_(flat[start : start + present])


def _set_full_local(engine, param: nn.Parameter, value: torch.Tensor, key: Optional[str]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(param, "ds_id"):
        _set_zero3_partition(param, value, key)
    elif hasattr(param, "_hp_mapping"):
        if key is None:
            safe_set_full_fp32_param(param, value.to(param.device))
        else:
            safe_set_full_optimizer_state(param, value.to(param.device), key)
    elif key is None:
        param.data.copy_(value)
    else:
        _inner_optimizer(engine).state[param][key].copy_(value)


def load_layout_free(engine, par: ParallelModel, src_dir: Path) -> int:
    """Fill a fresh engine's fp32 weights, Adam moments and schedule from ``src_dir``; returns Adam's step.

    The module's (low-precision) weights must already hold the same values
    (built from ``read_layout_free_weights``): ZeRO keeps them apart from its
    fp32 copy, which is what this sets.
    """
    meta = json.loads((src_dir / OPTIMIZER_FILE).read_text())
    step = int(meta["adam_step"])
    _create_adam_state(engine, step)
    handles = [safe_open(str(path), framework="pt") for path in sorted(src_dir.glob("stage_*.safetensors"))]
    file_of = {key: handle for handle in handles for key in handle.keys()}
    tp_rank, tp = par.groups.tp_rank, par.tp
    for name, param in trainable_by_name(par).items():
        for key in (None, *ADAM_MOMENTS):
            stored = f"{key or PARAM}/{name}"
            if stored not in file_of:
                raise ValueError(f"{src_dir} has no {stored}; it was written for another model")
            _set_full_local(engine, param, tp_shard_of(file_of[stored].get_tensor(stored), name, tp_rank, tp), key)
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    return step
