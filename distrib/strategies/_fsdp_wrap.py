"""FSDP2 building blocks: the device mesh, the choice of FSDP units, and `fully_shard` over a model.

Each function takes the model and small option values and does one thing, in the order `shard_model`
applies them (torchtitan's): activation checkpointing on the units, `torch.compile` (the caller's
`compile_units`), then `fully_shard` bottom-up (units, then the root). Activation checkpointing uses torch's composable `checkpoint`, which keeps the
parameter names (no `_checkpoint_wrapped_module.` prefixes), so state dicts stay those of the user's model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import SettingsError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from .._options import FSDPOptions

#: class-name endings of the repeated blocks of common model families (GPT-2 `Block`, Llama
#: `LlamaDecoderLayer`, BERT `BertLayer`, T5 `T5Block`, ViT `ViTLayer`, ...)
BLOCK_SUFFIXES = ("Block", "Layer")


def build_mesh(options: FSDPOptions, world_size: int, local_world_size: int, device_type: str) -> DeviceMesh:
    """The device mesh for the sharding mode: 1-D for full/grad_op, replicate x shard for hybrid/no_shard."""
    from torch.distributed.device_mesh import init_device_mesh

    if options.sharding in ("full", "grad_op"):
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if options.sharding == "no_shard":
        shard = 1
    else:
        shard = options.hybrid_shard_size or local_world_size
        if world_size % shard:
            raise SettingsError(
                f"FSDPOptions(sharding='hybrid', hybrid_shard_size={shard}) needs the number of processes "
                f"({world_size}) to be a multiple of the shard group size; choose a divisor of {world_size}."
            )
    return init_device_mesh(device_type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def find_units(model: nn.Module, options: FSDPOptions) -> list[nn.Module]:
    """The submodules (not the root) that become FSDP units, children before their parents."""
    if options.wrap_classes is not None:
        chosen = _by_class_names(model, options.wrap_classes)
    elif options.min_num_params is not None:
        chosen = _by_size(model, options.min_num_params)
    elif options.auto_wrap_policy is not None:
        chosen = _by_policy(model, options.auto_wrap_policy)
    else:
        chosen = _transformer_blocks(model)
    ids = {id(m) for m in chosen}
    # post-order: fully_shard must see a unit's inner units first
    return [m for m in _post_order(model) if id(m) in ids and m is not model]


def _post_order(module: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for child in module.children():
        out.extend(_post_order(child))
    out.append(module)
    return out


def _by_class_names(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        raise SettingsError(
            f"FSDPOptions.wrap_classes names {', '.join(map(repr, missing))}, which the model does not "
            f"contain; class names in this model: {', '.join(sorted(present))}."
        )
    return [m for m in model.modules() if type(m).__name__ in names]


def _by_size(model: nn.Module, min_num_params: int) -> list[nn.Module]:
    """Greedy bottom-up: a module holding >= min_num_params parameters not yet in a unit becomes one."""
    chosen: list[nn.Module] = []

    def visit(module: nn.Module) -> int:
        remaining = sum(visit(child) for child in module.children())
        remaining += sum(p.numel() for p in module.parameters(recurse=False))
        if module is not model and remaining >= min_num_params:
            chosen.append(module)
            return 0
        return remaining

    visit(model)
    return chosen


def _by_policy(model: nn.Module, policy: Callable[[nn.Module], bool]) -> list[nn.Module]:
    return [m for m in model.modules() if m is not model and policy(m)]


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    return [
        child
        for holder in model.modules()
        if isinstance(holder, nn.ModuleList)
        for child in holder
        if type(child).__name__.endswith(BLOCK_SUFFIXES)
    ]


def mixed_precision_policy(param: torch.dtype | None, reduce_dtype: str | None) -> Any:
    """FSDP2's `MixedPrecisionPolicy` computing in `param` (the precision plan's dtype; None: float32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .._precision import NAMED_DTYPES

    if param is None:
        if reduce_dtype is not None:
            raise SettingsError(
                f"FSDPOptions.reduce_dtype={reduce_dtype!r} needs mixed_precision='bf16' or 'fp16'; with "
                "mixed_precision='no' gradients are reduced in float32. Drop reduce_dtype or set it."
            )
        return None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=NAMED_DTYPES[reduce_dtype or "fp32"])


def shard_model(
    model: nn.Module,
    *,
    mesh: DeviceMesh,
    options: FSDPOptions,
    mp_policy: Any,
    device_type: str,
    compile_units: Callable[[nn.Module, list[nn.Module]], None] | None = None,
) -> list[nn.Module]:
    """Apply activation checkpointing, `compile_units(model, units)` (torch.compile, before sharding as in
    torchtitan), then `fully_shard`; return the units."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    units = find_units(model, options)
    if options.activation_checkpointing:
        apply_activation_checkpointing(units)
    if compile_units is not None:
        compile_units(model, units)
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "offload_policy": (
            CPUOffloadPolicy(pin_memory=device_type == "cuda") if options.cpu_offload else OffloadPolicy()
        ),
    }
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    reshard = options.sharding in ("full", "hybrid")
    if mp_policy is not None:
        _keep_norms_in_float32(model, units, reshard, kwargs)
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard, **kwargs)
    # the root's parameters are needed again at once in backward: never re-shard them after forward
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return units


def _keep_norms_in_float32(
    model: nn.Module, units: list[nn.Module], reshard: bool, kwargs: dict[str, Any]
) -> None:
    """Batch norms run in float32 under a low-precision policy: their running statistics stay float32,
    and batch_norm refuses float32 statistics with bf16 weights. Each becomes its own float32 unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    float32 = {
        **kwargs,
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32),
    }
    for module in model.modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module is not model
            and module not in units
        ):
            fully_shard(module, reshard_after_forward=reshard, **float32)


def apply_activation_checkpointing(units: list[nn.Module]) -> None:
    """Recompute each unit's activations in backward (torch's composable, name-preserving checkpoint)."""
    from torch.distributed._composable import checkpoint

    if not units:
        raise SettingsError(
            "FSDPOptions(activation_checkpointing=True) checkpoints the FSDP units, but this model has none "
            "besides the root; choose them with wrap_classes=[...] or min_num_params=..."
        )
    for unit in units:
        checkpoint(unit)
