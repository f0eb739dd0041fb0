"""FSDP2 parameter bookkeeping: models built on the meta device, and optimizers built before sharding.

`fully_shard` replaces every parameter of the module with a new `nn.Parameter` holding a DTensor shard.
An optimizer created from the model before `prepare` still points at the old, full parameters, so
`repoint_optimizer` swaps them for the sharded ones by parameter name, keeping each group's
hyper-parameters.

Meta-device models are materialised after sharding, so no rank ever holds the full model unless it
already did:

* every rank built the model on `meta`: `to_empty` allocates each rank's shards, then each module's
  `reset_parameters()` initialises them (the values are drawn shard by shard, so they differ from an
  unsharded initialisation with the same seed);
* rank 0 holds real weights (e.g. loaded from a checkpoint) and the others built on `meta`: rank 0's
  full state dict is scattered with `set_model_state_dict(..., broadcast_from_rank0=True)` and buffers
  are broadcast from rank 0.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from ..errors import PrepareError

MetaLayout = Literal["none", "all", "rank0"]
#: id(old parameter) -> (weak reference to it, the sharded parameter that replaced it)
ParamMap = dict[int, tuple["weakref.ref[nn.Parameter]", nn.Parameter]]


def meta_layout(model: nn.Module) -> MetaLayout:
    """Which ranks built `model` on the meta device: none, all, or all but rank 0 (a collective)."""
    local = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, local)
    if not any(flags):
        return "none"
    if all(flags):
        return "all"
    if not flags[0] and all(flags[1:]):
        return "rank0"
    raise PrepareError(
        f"prepare() got a model on the meta device on some ranks only ({[bool(f) for f in flags]} by "
        "rank); build it on 'meta' on every rank, or with real weights on rank 0 and 'meta' elsewhere."
    )


def sync_initial_weights(model: nn.Module, device: torch.device) -> bool:
    """Give every rank rank 0's weights before sharding, as DDP does when it wraps a model: each rank
    shards its own copy, so copies initialised with different seeds would make a model of mismatched
    pieces. Digests are compared first (one small all-gather); tensors move only when they differ.
    Returns whether anything was broadcast."""
    from .._replicas import tensor_digest

    tensors = [*model.parameters(), *model.buffers()]
    local = torch.tensor([v for t in tensors for v in tensor_digest(t)], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    if all(torch.equal(other, local) for other in everyone):
        return False
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)
    return True


def names_by_id(model: nn.Module) -> dict[int, tuple[weakref.ref[nn.Parameter], str]]:
    """Every parameter of `model` (tied ones under each name), keyed by object id."""
    return {id(p): (weakref.ref(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


def update_param_map(
    param_map: ParamMap, before: dict[int, tuple[weakref.ref[nn.Parameter], str]], model: nn.Module
) -> None:
    """Record which sharded parameter replaced each old one."""
    after = dict(model.named_parameters(remove_duplicate=False))
    for key, (ref, name) in before.items():
        if name in after and ref() is not after[name]:
            param_map[key] = (ref, after[name])


def repoint_optimizer(optimizer: torch.optim.Optimizer, param_map: ParamMap) -> None:
    """Make `optimizer` step the sharded parameters that replaced the ones it was built with."""
    for group in optimizer.param_groups:
        new_params = []
        for p in group["params"]:
            entry = param_map.get(id(p))
            old = entry[0]() if entry is not None else None
            if entry is not None and old is not None and old is p:
                if optimizer.state.get(old):
                    raise PrepareError(
                        "prepare() got an optimizer that has already stepped (it holds state for the "
                        "unsharded parameters); prepare the model and optimizer before the first "
                        "optimizer.step()."
                    )
                new_params.append(entry[1])
            else:
                new_params.append(p)
        group["params"] = new_params


def materialize(
    model: nn.Module, layout: MetaLayout, device: torch.device, rank0_state: dict[str, Any] | None
) -> None:
    """Allocate and initialise the shards of a sharded meta-device model (see the module docstring)."""
    if layout == "all":
        model.to_empty(device=device)
        _reset_parameters(model)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, rank0_state or {}, options=options)
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def _reset_parameters(model: nn.Module) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # DTensor warns that random ops on a CPU mesh are drawn per shard; the module docstring says so
        warnings.filterwarnings("ignore", message="DTensor random operators")
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
