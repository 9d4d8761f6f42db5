"""FSDP2 sharding of a trained model (`sharding: fsdp` under torchrun): each rank holds 1/N of
its weights, gradients and optimizer state, and every forward gathers a block's weights for as
long as it runs.

The model a stage loaded stays a plain module: `twin` makes a copy that takes over its tensors
(no second copy in memory), shards each transformer block (the classes its transformers model
names in `_no_split_modules`) and then the root, and leaves the original with its tensors for
the caller to move out of the way (`train` parks it in host memory) or to keep for sampling
(RL). `copy_back` gathers the trained weights into the original, so that what follows training
(sampling, evaluation, `save_pretrained`) sees a plain model, whatever the sharding was.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lmpipe.config import ParamsError

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Checkpoints: the whole state gathered to rank 0's host memory (other ranks get nothing)."""

FULL = StateDictOptions(full_state_dict=True)
"""Resume: every rank reads the whole state and keeps its own shard of it."""


def enabled(sharding: str) -> bool:
    """`sharding: fsdp` in a process group of more than one rank (one process has nothing to
    divide: it trains as without)."""
    dist = torch.distributed
    group = dist.is_available() and dist.is_initialized()
    return sharding == "fsdp" and group and dist.get_world_size() > 1


def block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the transformer blocks: what the transformers models inside `model` name
    in `_no_split_modules` (the unit they never split across devices)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def twin(
    model: torch.nn.Module,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    bf16_params: bool = False,
) -> torch.nn.Module:
    """A sharded copy of `model` (inside `wrap(copy)` when given, so that the root FSDP hooks
    run around a forward that reads the model's parts directly): blocks first, then the root.
    With `bf16_params` the blocks compute in bf16 and reduce gradients in fp32. The copy
    starts from `model`'s tensors; `model` keeps them. Scalar parameters, which FSDP cannot
    shard, stay whole on every rank (`sync_whole_grads` sums their gradients)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    shared = {id(t): t for t in tensors if t.dim() > 0}  # scalars: copies of their own
    module = copy.deepcopy(model, shared)
    root = wrap(module) if wrap is not None else module
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_params
        else MixedPrecisionPolicy()
    )
    blocks = block_classes(model)
    if not blocks:
        raise ParamsError(
            f"{type(model).__name__} names no transformer blocks (`_no_split_modules`): "
            "sharding needs a transformers model; use sharding: none"
        )
    scalars = {p for p in root.parameters() if p.dim() == 0}
    for m in list(root.modules()):
        if type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    fully_shard(root, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    return root


def sync_whole_grads(root: torch.nn.Module, average: bool) -> None:
    """Sum (or `average`) across ranks the gradients of the parameters FSDP left whole, as it
    reduces those of the sharded ones."""
    grads = [
        p.grad
        for p in root.parameters()
        if p.grad is not None and not isinstance(p, DTensor) and not isinstance(p.grad, DTensor)
    ]
    for g in grads:
        torch.distributed.all_reduce(g)
        if average:
            g.div_(torch.distributed.get_world_size())


def sum_gradients(root: torch.nn.Module) -> None:
    """Reduce gradients by sum rather than FSDP's mean over ranks (for losses each rank
    already weights to its share of the whole batch), with a plain sum (gloo has no
    pre-multiplied one)."""
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from every rank (collective), else itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_back(sharded: torch.nn.Module, model: torch.nn.Module, prefix: str = "") -> None:
    """Gather the sharded copy's weights into `model`, one tensor at a time (collective: every
    rank calls it; every rank ends with the whole weights). `prefix`: where `model` sits in
    the sharded root (`model.` inside a wrapper)."""
    params = dict(sharded.named_parameters())
    for name, p in model.named_parameters():
        p.copy_(full(params[prefix + name]))


def model_state(module: torch.nn.Module, sharded: bool) -> dict[str, Any]:
    """The module's state for a checkpoint: with sharding, gathered whole to rank 0
    (collective; the other ranks get {})."""
    if sharded:
        return get_model_state_dict(module, options=FULL_ON_RANK0)
    return module.state_dict()


def load_model_state(module: torch.nn.Module, state: dict[str, Any], sharded: bool) -> None:
    if sharded:
        set_model_state_dict(module, state, options=FULL)
    else:
        module.load_state_dict(state)


def optimizer_state(
    module: torch.nn.Module, opt: torch.optim.Optimizer, by_name: bool
) -> dict[str, Any]:
    """The optimizer's state for a checkpoint. `by_name` (`sharding: fsdp`, on any number of
    ranks): keyed by parameter name and gathered whole to rank 0 (collective), so it resumes
    on any number of processes; else `opt.state_dict()`."""
    if by_name:
        return get_optimizer_state_dict(module, opt, options=FULL_ON_RANK0)
    return opt.state_dict()


def load_optimizer_state(
    module: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], by_name: bool
) -> None:
    if by_name:
        set_optimizer_state_dict(module, opt, state, options=FULL)
    else:
        opt.load_state_dict(state)
