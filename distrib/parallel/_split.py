"""Cutting a model into pipeline stages, in place, keeping every parameter's name.

The cut runs along the model's stack of layers: an `nn.ModuleList` or `nn.Sequential` (the one holding the
most parameters, or the one whose entries `pp_split_points` name). Stage `s` keeps its share of the layers;
stage 0 also keeps what the model runs before the stack (embeddings), the last stage what it runs after
(final norm, head). What a stage does not keep is taken out:

* layers are removed from their list, which keeps the others under their original indices, so a loop
  `for layer in self.layers` runs only this stage's layers and state-dict names stay those of the whole
  model (a stage's checkpoint shards are the whole model's keys, and load at any pipeline size);
* other modules with parameters are replaced by a stand-in that passes a floating-point input through
  (an embedding on a later stage receives the previous stage's activations), returns zeros for an
  embedding called with integer ids (a position embedding adds nothing there) and raises otherwise.

Modules without parameters (rotary embeddings, dropout) stay on every stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import PrepareError, TrainingError


class SkippedModule(nn.Module):
    """Stands for a module another pipeline stage holds (see the module docstring)."""

    def __init__(self, name: str, original: nn.Module, stage: int) -> None:
        super().__init__()
        self.original_name = name
        self.original_type = type(original).__name__
        self.stage = stage
        self.embedding_dim = original.embedding_dim if isinstance(original, nn.Embedding) else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x
        if isinstance(x, torch.Tensor) and self.embedding_dim is not None:
            return torch.zeros(*x.shape, self.embedding_dim, device=x.device)
        raise TrainingError(
            f"pipeline stage {self.stage} does not hold {self.original_name} ({self.original_type}), but the "
            f"model's forward called it with {type(x).__name__}; another stage owns it. Make the forward "
            "skip modules it does not have, or move this module into the stack of layers."
        )

    def extra_repr(self) -> str:
        return f"held by another stage: {self.original_name} ({self.original_type})"


def find_layers(model: nn.Module, split_points: tuple[str, ...] | None, pp: int) -> tuple[str, nn.Module]:
    """(name, module) of the stack of layers the stages are cut along."""
    if split_points:
        parents = {point.rpartition(".")[0] for point in split_points}
        if len(parents) != 1:
            raise PrepareError(
                f"pp_split_points {list(split_points)} must all be entries of one layer list (e.g. "
                "['layers.4', 'layers.8']); they name entries of different modules."
            )
        name = parents.pop()
        container = _get(model, name, "pp_split_points")
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise PrepareError(
                f"pp_split_points name entries of {name or 'the model'} ({type(container).__name__}); "
                "stages are cut along an nn.ModuleList or nn.Sequential of layers."
            )
        return name, container
    candidates = [
        (sum(p.numel() for p in m.parameters()), -len(n.split(".")) if n else 1, n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= pp
    ]
    if not candidates:
        raise PrepareError(
            f"parallelism pp={pp} cuts a model along its stack of layers (an nn.ModuleList or nn.Sequential "
            f"with at least {pp} entries), but {type(model).__name__} has none; build the model with one, "
            "or name the layers that start each stage with ParallelismOptions(pp_split_points=[...])."
        )
    _, _, name, container = max(candidates, key=lambda c: (c[0], c[1]))
    return name, container


def _get(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise PrepareError(f"{what}: the model has no module named {name!r}.") from None


def stage_layers(
    container: nn.Module, name: str, split_points: tuple[str, ...] | None, pp: int
) -> list[list[str]]:
    """The keys of `container`'s entries each stage holds, in order."""
    keys = list(container._modules)
    if split_points:
        starts = []
        for point in split_points:
            key = point.rpartition(".")[2]
            if key not in keys:
                raise PrepareError(f"pp_split_points: {point!r} is not an entry of {name or 'the model'}.")
            starts.append(keys.index(key))
        if len(starts) != pp - 1 or starts != sorted(set(starts)) or starts[0] == 0:
            raise PrepareError(
                f"pp_split_points needs {pp - 1} entries for pp={pp}, in increasing order, none of them the "
                f"first layer (each starts stage 1, 2, ...); got {list(split_points)}."
            )
        bounds = [0, *starts, len(keys)]
    else:
        base, extra = divmod(len(keys), pp)
        sizes = [base + (1 if s < extra else 0) for s in range(pp)]
        bounds = [sum(sizes[:s]) for s in range(pp + 1)]
    return [keys[bounds[s] : bounds[s + 1]] for s in range(pp)]


def outside_owners(model: nn.Module, layers_name: str, pp: int) -> dict[str, int]:
    """The stage of every module with parameters outside the stack: 0 before it, the last stage after."""
    owners: dict[str, int] = {}
    parts = layers_name.split(".") if layers_name else []
    module, prefix = model, ""
    for depth in range(len(parts)):
        direct = [n for n, _ in module.named_parameters(recurse=False)]
        if direct:
            raise PrepareError(
                f"pipeline split: {prefix or 'the model'} holds parameters directly ({', '.join(direct)}) "
                "next to the stack of layers, and no stage could own them alone; move them into a submodule."
            )
        seen_stack = False
        for child_name, child in module.named_children():
            if child_name == parts[depth]:
                seen_stack = True
                continue
            if any(True for _ in child.parameters()):
                owners[prefix + child_name] = pp - 1 if seen_stack else 0
        module = getattr(module, parts[depth])
        prefix += parts[depth] + "."
    return owners


def split_model(model: nn.Module, *, pp: int, stage: int, split_points: tuple[str, ...] | None) -> set[int]:
    """Remove from `model` (in place) what stage `stage` does not hold; return the removed parameters' ids."""
    layers_name, container = find_layers(model, split_points, pp)
    per_stage = stage_layers(container, layers_name, split_points, pp)
    owners = outside_owners(model, layers_name, pp)
    prefix = layers_name + "." if layers_name else ""
    for s, keys in enumerate(per_stage):
        owners.update({prefix + key: s for key in keys})
    _check_ties(model, owners)
    kept = {id(p) for n, s in owners.items() if s == stage for p in model.get_submodule(n).parameters()}
    removed = {id(p) for p in model.parameters()} - kept
    for name, owner in owners.items():
        if owner == stage:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if parent is container:
            del container._modules[attr]
        else:
            setattr(parent, attr, SkippedModule(name, getattr(parent, attr), stage))
    container.__class__ = _stage_layers_class(type(container))
    container.pipeline_stage = stage  # type: ignore[assignment]
    return removed


class _StageLayers:
    """A layer list holding one stage's layers under their original indices: `layers[i]` for a layer
    another stage holds raises an error that says so (iterating runs this stage's layers)."""

    pipeline_stage: int

    def __getitem__(self, idx: Any) -> Any:
        if not isinstance(idx, int):
            return super().__getitem__(idx)  # type: ignore[misc]
        modules: dict[str, nn.Module] = self._modules  # type: ignore[attr-defined]
        if str(idx) in modules:
            return modules[str(idx)]
        raise TrainingError(
            f"layer {idx} of this list is held by another pipeline stage; stage {self.pipeline_stage} holds "
            f"layers {', '.join(modules)}. Iterate over the list (for layer in self.layers) instead of "
            "indexing it, so each stage runs its own layers."
        )


def _stage_layers_class(cls: type) -> type:
    if issubclass(cls, _StageLayers):
        return cls
    return type(cls.__name__, (_StageLayers, cls), {"__module__": cls.__module__})


def _check_ties(model: nn.Module, owners: dict[str, int]) -> None:
    """A parameter shared by modules of two stages cannot be trained by either alone."""
    first: dict[int, tuple[str, int]] = {}
    for name, owner in owners.items():
        for pname, param in model.get_submodule(name).named_parameters():
            seen = first.setdefault(id(param), (f"{name}.{pname}", owner))
            if seen[1] != owner:
                raise PrepareError(
                    f"pipeline split: {seen[0]} (stage {seen[1]}) and {name}.{pname} (stage {owner}) are one "
                    "tied parameter, and stages cannot share parameters. Untie them (transformers: "
                    "config.tie_word_embeddings=False) or keep both in one stage with pp_split_points."
                )
