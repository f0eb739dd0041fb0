"""The one `DeviceMesh` of a run: sizes resolved against the world size, named dimensions, flattened views.

Dimensions, outermost first (torchtitan's order, so that the innermost, most talkative dimension, tensor
parallel, spans neighbouring ranks, i.e. one machine): `pp`, `dp_replicate`, `dp_shard`, `cp`, `tp`. Every
dimension is in the mesh even when its size is 1, so `ctx.mesh["tp"]` always works. Flattened views
serve the strategies and collectives: `dp` (`dp_replicate` x `dp_shard`: who gets different batches),
`dp_cp` (plus `cp`: over whom gradients and losses are averaged) and `dp_shard_cp` (what FSDP2 shards over);
two more, with `tp`, let DTensor reduce over FSDP2 x TP meshes in one collective.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._options import MESH_SIZES, ParallelismOptions
from ..errors import DistribWarning, SettingsError

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

    from .._settings import Settings

#: the mesh's dimension names, outermost first
DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
#: flattened views: name -> the dimensions they join
FLAT_VIEWS = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
    "dp_shard_cp": ("dp_shard", "cp"),
    # not used by distrib directly: with them DTensor reduces over FSDP2 x TP meshes (a gradient norm) in
    # one collective instead of one per dimension
    "dp_shard_cp_tp": ("dp_shard", "cp", "tp"),
    "dp_cp_tp": ("dp_replicate", "dp_shard", "cp", "tp"),
}


@dataclass(frozen=True)
class ParallelDims:
    """The five sizes of a run, resolved (no -1 left)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    cp: int = 1
    pp: int = 1

    def size(self, name: str) -> int:
        """The size of a dimension or of a flattened view (`dp`, `dp_cp`, `dp_shard_cp`)."""
        return math.prod(getattr(self, d) for d in FLAT_VIEWS.get(name, (name,)))

    @property
    def world_size(self) -> int:
        return math.prod(getattr(self, name) for name in MESH_SIZES)

    @property
    def splits_models(self) -> bool:
        """True when some rank holds only part of a model's layers or of their weights (tp or pp)."""
        return self.tp > 1 or self.pp > 1


def resolve_dims(options: ParallelismOptions, world_size: int) -> ParallelDims:
    """Replace the -1 by the rest of the world size; raise unless the sizes multiply to it."""
    sizes = options.sizes()
    given = ", ".join(f"{k}={v}" for k, v in sizes.items())
    known = math.prod(v for v in sizes.values() if v != -1)
    rest = [k for k, v in sizes.items() if v == -1]
    if rest:
        if world_size % known:
            raise SettingsError(
                f"parallelism sizes {given} do not fit the world size {world_size}: the sizes other than "
                f"{rest[0]} multiply to {known}, which does not divide {world_size}. Change the sizes or "
                "the number of processes."
            )
        sizes[rest[0]] = world_size // known
    if math.prod(sizes.values()) != world_size:
        raise SettingsError(
            f"parallelism sizes {given} multiply to {math.prod(sizes.values())}, but the world size is "
            f"{world_size}; their product must equal the number of processes (use -1 for one size to take "
            "the rest)."
        )
    return ParallelDims(**sizes)


@dataclass(frozen=True, eq=False)
class ParallelState:
    """The mesh of a run and this rank's place in it (`runtime.parallel`)."""

    dims: ParallelDims
    mesh: DeviceMesh
    options: ParallelismOptions
    views: dict[str, DeviceMesh] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)

    def size(self, name: str) -> int:
        return self.dims.size(name)

    def rank(self, name: str) -> int:
        return self.ranks[name]

    def submesh(self, name: str) -> DeviceMesh:
        """One named dimension (`tp`, ...) or flattened view (`dp`, `dp_cp`, `dp_shard_cp`) as a 1-D mesh;
        `fsdp` is FSDP2's (2-D with `dp_replicate` > 1)."""
        return self.views[name] if name in self.views else self.mesh[name]

    def group(self, name: str) -> ProcessGroup:
        return self.submesh(name).get_group()


def is_requested(options: ParallelismOptions) -> bool:
    """True when the settings ask for a mesh (anything but the default pure data parallelism)."""
    return options != ParallelismOptions()


def check_combination(settings: Settings, dims: ParallelDims, strategy: str, device: torch.device) -> None:
    """Settings that cannot run together with these sizes, each with the fix."""
    parallel = dims.tp > 1 or dims.pp > 1 or dims.cp > 1 or dims.dp_replicate > 1
    if parallel and strategy in ("deepspeed", "xla"):
        raise SettingsError(
            f"parallelism ({_describe(dims)}) runs with strategy 'ddp' or 'fsdp', not {strategy!r}; use "
            "strategy='fsdp' (FSDP2 on the data-shard dimension) or 'ddp'."
        )
    if dims.cp > 1 and device.type != "cuda":
        raise SettingsError(
            f"parallelism cp={dims.cp}: context parallelism runs on CUDA GPUs only (it swaps in ring "
            f"attention for torch's CUDA scaled-dot-product attention), but this run uses {str(device)!r}. "
            "Set cp=1, or run on GPUs."
        )
    if dims.pp > 1 and settings.mixed_precision == "fp16":
        raise SettingsError(
            f"parallelism pp={dims.pp} with mixed_precision='fp16': pipeline stages cannot agree on fp16 loss "
            "scaling; use mixed_precision='bf16' (no scaling needed) or 'no'."
        )
    sharding = settings.fsdp.sharding
    if strategy == "fsdp" and sharding in ("hybrid", "no_shard"):
        replicate, shard = ("N", "M") if sharding == "hybrid" else ("<world size>", "1")
        raise SettingsError(
            f"FSDPOptions(sharding={sharding!r}) and the parallelism setting both choose the data-parallel "
            f"mesh; with parallelism, write parallelism={{'dp_replicate': {replicate}, 'dp_shard': {shard}}} "
            "and FSDPOptions(sharding='full') (or 'grad_op')."
        )


def _describe(dims: ParallelDims) -> str:
    return ", ".join(f"{name}={getattr(dims, name)}" for name in MESH_SIZES if getattr(dims, name) > 1)


def plan(
    settings: Settings, world_size: int, device: torch.device, strategy: str, *, rank: int = 0
) -> ParallelDims | None:
    """The resolved sizes when the settings ask for a mesh, else None; raises before any process group
    exists when the sizes or their combination with other settings cannot run, and warns (rank 0) about
    options their dimension's size of 1 leaves unused."""
    options = settings.parallelism
    if not is_requested(options):
        return None
    dims = resolve_dims(options, world_size)
    check_combination(settings, dims, strategy, device)
    if rank == 0:
        for message in unused_options(options, dims):
            warnings.warn(message, DistribWarning, stacklevel=5)
    return dims


def unused_options(options: ParallelismOptions, dims: ParallelDims) -> list[str]:
    """One message per option that does nothing with these sizes."""
    unused = []
    if dims.tp == 1 and options.tp_plan not in (None, "auto"):
        unused.append("tp_plan")
    if dims.pp == 1:
        defaults = ParallelismOptions()
        unused += [n for n in ("pp_schedule", "pp_microbatches", "pp_split_points")
                   if getattr(options, n) != getattr(defaults, n)]  # fmt: skip
    return [
        f"ParallelismOptions.{name}={getattr(options, name)!r} is ignored: it applies to "
        f"{'tensor' if name == 'tp_plan' else 'pipeline'} parallelism, and "
        f"{'tp' if name == 'tp_plan' else 'pp'}=1. Set the size, or drop the option."
        for name in unused
    ]


def build(dims: ParallelDims | None, settings: Settings, device: torch.device) -> ParallelState | None:
    """The run's mesh (every rank calls this), or None without a mesh or without a process group (one
    process, `single` strategy: every dimension has size 1)."""
    import torch.distributed as dist

    if dims is None or not dist.is_initialized():
        return None
    return _make_state(dims, settings.parallelism, device)


def _make_state(dims: ParallelDims, options: ParallelismOptions, device: torch.device) -> ParallelState:
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if device.type == "cuda" else "cpu"
    mesh = init_device_mesh(
        device_type, tuple(getattr(dims, name) for name in DIM_NAMES), mesh_dim_names=DIM_NAMES
    )
    views: dict[str, Any] = {}
    with warnings.catch_warnings():
        # torch warns when a flattened view is sliced from the root mesh; these are kept here instead
        warnings.simplefilter("ignore", UserWarning)
        for name, joined in FLAT_VIEWS.items():
            views[name] = mesh[joined]._flatten(name)
        # FSDP2's mesh: shard over dp_shard x cp, and replicate over dp_replicate (HSDP) when it is > 1
        views["fsdp"] = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else views["dp_shard_cp"]
    ranks = {name: mesh.get_local_rank(name) for name in DIM_NAMES}
    ranks.update({name: views[name].get_local_rank() for name in FLAT_VIEWS})
    return ParallelState(dims=dims, mesh=mesh, options=options, views=views, ranks=ranks)
