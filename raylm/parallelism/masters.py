"""The fp32 master weights and Adam state of each weight, whichever DeepSpeed optimizer holds them.

With bf16 the module's parameters are rounded copies; the truth is the fp32
masters in DeepSpeed's optimizer (BF16_Optimizer, ZeRO-1/2 flat partitions,
ZeRO-3 partitions), reached through its fragment API. Everything that leaves a
stage (final weights, the layout-free checkpoint) is read from them, and a
stage that starts from given weights writes them there too, so nothing is
ever rounded to bf16 on the way. Every tensor handed to a collective here
lives on the engine's device (but an asynchronous checkpoint's host snapshot of
``LocalShares``, summed on its writer thread over gloo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from raylm.models.weights import TIED_HEAD
from raylm.parallelism.apply import ParallelModel
from raylm.parallelism.materialize import WeightSource
from raylm.parallelism.reshard import gather_tp_tensor

StateDict = Dict[str, torch.Tensor]


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


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW whose ``state`` holds the moments (behind DeepSpeed's ZeRO/bf16 wrapper, if any)."""
    wrapped = engine.optimizer
    return wrapped.optimizer if hasattr(wrapped, "optimizer") and isinstance(wrapped.optimizer, torch.optim.Optimizer) else wrapped


def optimizer_state_bytes(engine) -> int:
    """Bytes of the Adam moments this rank holds (ZeRO-1 and up split them over the data-parallel ranks)."""
    return sum(t.numel() * t.element_size() for state in inner_optimizer(engine).state.values()
               for t in state.values() if torch.is_tensor(t) and t.dim() > 0)  # not the step count


def full_local(engine, param: nn.Parameter, key: Optional[str]) -> torch.Tensor:
    """This tensor rank's whole fp32 ``param`` (key None) or optimizer state ``key``; a collective over dp under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        return value.detach()
    # No ZeRO partitioning and no mixed precision: the module's parameter is what AdamW updates.
    return param.detach() if key is None else inner_optimizer(engine).state[param][key].detach()


@dataclass
class Fragment:
    """This rank's part of one weight that ZeRO-1/2 or DeepSpeed's bf16 optimizer splits over the data-parallel ranks."""

    values: torch.Tensor
    """The part's fp32 values (or optimizer state): empty where none of the weight lies in this rank's partition."""
    start: int
    """Where the part starts in the flattened weight."""
    shape: torch.Size
    """The whole weight's shape."""


@dataclass
class LocalShares:
    """What this rank holds of many weights' fp32 values (or of one optimizer state), by name, before the
    data-parallel sum that makes each whole (``whole``): kept apart from the sum so that an asynchronous
    checkpoint can copy the shares to host memory and sum the copy on its writer thread."""

    held: StateDict
    """Weights this rank already holds whole (no ZeRO partitioning, or ZeRO-3's, which DeepSpeed gathers)."""
    fragments: Dict[str, Fragment]
    names: List[str]
    """Every name, in the order ``whole`` returns them."""

    @torch.no_grad()
    def whole(self, dp_group: Optional[dist.ProcessGroup]) -> StateDict:
        """Every weight whole; a collective over ``dp_group`` (the fragments' data-parallel group) if any is split.

        Every rank copies its fragments of all of them into one zeroed buffer and sums it once: each element is
        non-zero on one rank at most, so the sum is exact, and it takes one collective instead of DeepSpeed's
        one per weight.
        """
        out = dict(self.held)
        if self.fragments:
            sizes = [fragment.shape.numel() for fragment in self.fragments.values()]
            flat = torch.zeros(sum(sizes), dtype=torch.float32, device=next(iter(self.fragments.values())).values.device)
            parts = flat.split(sizes)
            for fragment, part in zip(self.fragments.values(), parts):
                part.narrow(0, fragment.start, fragment.values.numel()).copy_(fragment.values.flatten())
            dist.all_reduce(flat, group=dp_group)
            out.update({name: part.view(fragment.shape) for (name, fragment), part in zip(self.fragments.items(), parts)})
        return {name: out[name] for name in self.names}


def _is_fragmented(param: nn.Parameter) -> bool:
    return hasattr(param, "_hp_mapping") and not hasattr(param, "ds_id")


def data_parallel_group(params: Dict[str, nn.Parameter]) -> Optional[dist.ProcessGroup]:
    """The group over which ZeRO-1/2 or DeepSpeed's bf16 optimizer splits ``params`` (None where none is split)."""
    groups = {id(param._dp_group): param._dp_group for param in params.values() if _is_fragmented(param)}
    if len(groups) > 1:
        raise RuntimeError(f"DeepSpeed split this rank's weights over {len(groups)} data-parallel groups; raylm expects one")
    return next(iter(groups.values()), None)


@torch.no_grad()
def local_shares(engine, params: Dict[str, nn.Parameter], key: Optional[str]) -> LocalShares:
    """This rank's shares of ``params``' fp32 values (key None) or optimizer state ``key``: views of the live state
    where they are split (no collective), ``full_local`` where they are not (ZeRO-3's a collective over dp)."""
    fragments: Dict[str, Fragment] = {}
    for name, param in params.items():
        if _is_fragmented(param):
            mapping = param._hp_mapping
            if mapping is None:  # none of this weight lies in this rank's partition
                fragments[name] = Fragment(torch.empty(0, dtype=torch.float32, device=param.device), 0, param.shape)
            else:
                fragments[name] = Fragment(mapping.get_hp_fragment(key), mapping.lp_fragment_address.start, param.shape)
    held = {name: full_local(engine, param, key) for name, param in params.items() if name not in fragments}
    return LocalShares(held, fragments, list(params))


def full_locals(engine, params: Dict[str, nn.Parameter], key: Optional[str]) -> StateDict:
    """``full_local`` of many weights at once, by name; a collective over dp under ZeRO."""
    return local_shares(engine, params, key).whole(data_parallel_group(params))


def link_fragments(engine) -> None:
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


def set_full_local(engine, param: nn.Parameter, value: torch.Tensor, key: Optional[str]) -> None:
    """Set this rank's part of the fp32 ``param`` (key None) or of its optimizer state ``key`` from the tensor rank's whole ``value``."""
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
        inner_optimizer(engine).state[param][key].copy_(value)


def fp32_weights(par: ParallelModel) -> StateDict:
    """Copies of this rank's trainable weights, taken before DeepSpeed rounds the module to bf16 (for weights
    that no ``WeightSource`` can make again: a LoRA stage's freshly drawn adapters)."""
    return {name: param.detach().to(torch.float32, copy=True) for name, param in trainable_by_name(par).items()}


def set_master_weights(engine, par: ParallelModel, weights: WeightSource) -> None:
    """Make the fp32 masters exactly this rank's part of ``weights``; DeepSpeed built them from the bf16-rounded module.

    Each weight is made again from its source, one at a time: a copy of them all kept from before
    ``deepspeed.initialize`` would double the host memory of a rank's start-up.
    """
    for name, param in trainable_by_name(par).items():
        set_full_local(engine, param, weights(name, par.groups.tp_rank, par.tp), None)


def consolidated_state_dict(engine, par: ParallelModel) -> StateDict:
    """The dense fp32 master weights of the whole model on every rank (CPU tensors, a tied head stored once); a collective.

    Each stage gathers only its own weights over its tensor-parallel group (on
    the engine's device), then the stages swap theirs as objects.
    """
    stage = {name: gather_tp_tensor(value.float(), name, par.groups.tp_group).to("cpu", copy=True)
             for name, value in full_locals(engine, trainable_by_name(par), None).items()}
    if par.pp == 1:
        return stage
    parts: list = [None] * par.pp
    dist.all_gather_object(parts, stage, group=par.groups.pp_group)
    return {name: tensor for part in parts for name, tensor in part.items()}
