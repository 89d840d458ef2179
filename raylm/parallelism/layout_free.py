"""Training state that any layout can load: fp32 master weights, Adam moments and the schedule.

DeepSpeed's own checkpoint holds each rank's flat ZeRO partitions, which only
the layout that wrote them can read (ZeRO-1/2 refuse another data-parallel
size; tensor and pipeline shards are ours). Next to it every checkpoint gets a
``layout_free/`` directory:

- ``stage_PPP_param.safetensors``, ``stage_PPP_exp_avg.safetensors`` and
  ``stage_PPP_exp_avg_sq.safetensors`` for each pipeline stage, holding
  ``param/<name>``, ``exp_avg/<name>`` and ``exp_avg_sq/<name>`` for every
  trainable weight, gathered over ZeRO's data-parallel partitions and the
  tensor-parallel shards, under the dense raylm names (a tied output head is
  stored once, as the embedding); a reader finds each name in the files'
  headers (checkpoints written before the split hold all three kinds in one
  ``stage_PPP.safetensors``);
- ``optimizer.json``: Adam's step count and the learning-rate scheduler state.

Loading gives each rank its slice of the ``param/`` weights (they become the
fp32 masters; ``layout_free_locations``), slices each moment for the new tensor rank and hands it to the
new ZeRO partitioning through DeepSpeed's fragment API, so training continues
as if the layout had never changed (same math, other summation order).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open

from raylm.models.weights import Location, read_part
from raylm.parallelism.apply import ParallelModel
from raylm.parallelism.masters import (LocalShares, data_parallel_group, inner_optimizer, link_fragments, local_shares,
                                       set_full_local, trainable_by_name)
from raylm.parallelism.plan import split_dim_of
from raylm.parallelism.reshard import gather_tp_tensor
from raylm.parallelism.topology import CheckpointGroups
from raylm.written_files import WrittenFiles

LAYOUT_FREE_DIR = "layout_free"
OPTIMIZER_FILE = "optimizer.json"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
PARAM = "param"


def adam_step(engine) -> int:
    steps = {int(state["step"]) for state in inner_optimizer(engine).state.values() if "step" in state}
    if len(steps) != 1:
        raise RuntimeError(f"optimizer state holds step counts {sorted(steps)}; expected exactly one")
    return steps.pop()


def save_layout_free(engine, par: ParallelModel, out_dir: Path, written: WrittenFiles,
                     background_groups: Optional[CheckpointGroups] = None) -> None:
    """Write this rank's part of ``layout_free/`` through ``written``; a collective.

    Each kind (``param``, each Adam moment) of a pipeline stage is one file, written by one tensor-rank-0 rank of
    that stage: the last data-parallel rank first, since dp rank 0 also writes DeepSpeed's model states, so that
    the writing is spread over the ranks. Every rank sums and gathers each kind where ``written`` writes
    (``WrittenFiles.write_with``): a background ledger does it on its writer thread from a host snapshot of the
    rank's shares, over ``background_groups`` (which it must then be given), so that the training thread only
    copies the shares.
    """
    groups = par.groups
    link_fragments(engine)
    trainable = trainable_by_name(par)
    dp_group, tp_group = data_parallel_group(trainable), groups.tp_group
    if background_groups is not None:
        if dp_group is not None and dist.get_process_group_ranks(dp_group) != background_groups.dp_ranks:
            raise RuntimeError(f"DeepSpeed splits the weights over ranks {dist.get_process_group_ranks(dp_group)}, "
                               f"not over the data-parallel ranks {background_groups.dp_ranks}")
        dp_group, tp_group = background_groups.dp_group, background_groups.tp_group
    for index, key in enumerate((None, *ADAM_MOMENTS)):
        kind = key or PARAM
        writes = groups.tp_rank == 0 and groups.dp_rank == (par.dp_size - 1 - index) % par.dp_size
        path = out_dir / f"stage_{groups.pp_rank:03d}_{kind}.safetensors" if writes else None
        gather = partial(_gather_kind, kind=kind, path=path, dp_group=dp_group, tp_group=tp_group)
        written.write_with(gather, local_shares(engine, trainable, key))
    step = adam_step(engine)
    if dist.get_rank() == 0:
        meta = {"adam_step": step, "scheduler": engine.lr_scheduler.state_dict()}
        written.write_text(out_dir / OPTIMIZER_FILE, json.dumps(meta, indent=1))


def _gather_kind(written: WrittenFiles, shares: LocalShares, *, kind: str, path: Optional[Path], dp_group, tp_group) -> None:
    """Make one kind's dense tensors from every rank's ``shares`` (collectives over ``dp_group`` and ``tp_group``);
    the rank given a ``path`` writes them there."""
    dense: Dict[str, torch.Tensor] = {}
    for name, value in shares.whole(dp_group).items():
        gathered = gather_tp_tensor(value.float(), name, tp_group)
        if path is not None:  # possibly the live tensor: written below, before the next step changes it
            dense[f"{kind}/{name}"] = gathered.to("cpu")
    if path is not None:
        written.save_safetensors(dense, path, metadata={"format": "raylm-layout-free"})


def layout_free_locations(src_dir: Path, kind: str = PARAM) -> Dict[str, Location]:
    """Dense name -> where a layout-free checkpoint stores that weight's fp32 master (or Adam moment ``kind``), from every stage file's header."""
    located: Dict[str, Location] = {}
    prefix = f"{kind}/"
    for path in sorted(src_dir.glob("stage_*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            located.update({key[len(prefix):]: (path, key) for key in handle.keys() if key.startswith(prefix)})
    return located


def _create_adam_state(engine, step: int) -> None:
    """AdamW creates its state at the first step; make it now (zeros, ``step`` taken) so it can be filled."""
    inner = inner_optimizer(engine)
    # ZeRO-3 hands AdamW its flat fp32 partitions only for the duration of a step.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [p for g in inner.param_groups for p in g["params"]]
    for flat in flats:
        state = inner.state[flat]
        state["step"] = torch.tensor(float(step))
        for key in ADAM_MOMENTS:
            state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    link_fragments(engine)


def load_layout_free(engine, par: ParallelModel, src_dir: Path) -> int:
    """Fill a fresh engine's Adam moments and schedule from ``src_dir``; returns Adam's step.

    The weights are already in place: the rank's weights were read from
    ``layout_free_locations`` and their fp32 values became the masters
    (``raylm.parallelism.masters.set_master_weights`` under bf16).
    """
    meta = json.loads((src_dir / OPTIMIZER_FILE).read_text())
    step = int(meta["adam_step"])
    _create_adam_state(engine, step)
    moments = {key: layout_free_locations(src_dir, key) for key in ADAM_MOMENTS}
    tp_rank, tp = par.groups.tp_rank, par.tp
    for name, param in trainable_by_name(par).items():
        for key in ADAM_MOMENTS:
            if name not in moments[key]:
                raise ValueError(f"{src_dir} has no {key}/{name}; it was written for another model")
            set_full_local(engine, param, read_part(moments[key][name], split_dim_of(name), tp_rank, tp), key)
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    return step
