"""`torch.compile` for every strategy (the `compile` setting), applied in place at the right point.

Strategies call `apply` where torchtitan's order puts compilation: after fp8 conversion, tensor
parallelism and activation checkpointing, before FSDP2 or DDP wraps the model. Models are compiled in
place (`nn.Module.compile`), so the prepared model stays the user's object and its state-dict keys keep
their names (no `_orig_mod.` prefix).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any

from torch import nn

from ._options import CompileOptions
from .errors import DistribWarning

if TYPE_CHECKING:
    from ._runtime import Runtime


def options(runtime: Runtime) -> CompileOptions | None:
    """The run's compile options; None when nothing is compiled. `FSDPOptions(compile=True)` counts as
    regional compilation under FSDP."""
    value = runtime.settings.compile
    if isinstance(value, CompileOptions):
        return value
    if value:
        return CompileOptions()
    if runtime.strategy == "fsdp" and runtime.settings.fsdp.compile:
        return CompileOptions(regional=True)
    return None


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Layers of `nn.ModuleList`s whose class repeats there (transformer blocks and the like)."""
    blocks = []
    for holder in model.modules():
        if isinstance(holder, nn.ModuleList):
            classes = Counter(type(child) for child in holder)
            blocks += [child for child in holder if classes[type(child)] > 1]
    return blocks


def apply(runtime: Runtime, model: nn.Module, units: list[nn.Module] | None = None) -> None:
    """Compile `model` in place per the run's options: the whole model, or each repeated block (`units`
    when the strategy chose its own, e.g. FSDP units)."""
    chosen = options(runtime)
    if chosen is None:
        return
    kwargs: dict[str, Any] = {
        "backend": chosen.backend,
        "fullgraph": chosen.fullgraph,
        "dynamic": chosen.dynamic,
    }
    if chosen.mode is not None:
        kwargs["mode"] = chosen.mode
    if not chosen.regional:
        model.compile(**kwargs)
        return
    blocks = units if units else repeated_blocks(model)
    if not blocks:
        if runtime.rank == 0:
            warnings.warn(
                f"compile=CompileOptions(regional=True): {type(model).__name__} has no repeated blocks (layers of "
                "an nn.ModuleList sharing a class), so the whole model is compiled instead.",
                DistribWarning,
                stacklevel=4,
            )
        model.compile(**kwargs)
        return
    for block in blocks:
        block.compile(**kwargs)
