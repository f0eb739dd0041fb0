"""Tensor-parallel styles by name, and torch's column/row styles taught transformers' `Conv1D` (GPT-2).

A `tp_plan` may name styles as text, so that a plan can travel through the launcher and a config file. The
names and what they mean (every one is a torch `ParallelStyle`):

* "colwise": `ColwiseParallel()`: the output features are split; the output stays split (local tensors);
* "rowwise": `RowwiseParallel()`: the input features are split; outputs are summed over the group (for an
  `nn.Embedding`: the vocabulary is split and the ids come in whole);
* "sequence": `SequenceParallel()`: the module (a norm, dropout) runs on its slice of the sequence;
* "colwise_gather_output": column-wise, and the output is gathered whole (a language-model head);
* "colwise_from_sequence": column-wise, with its input gathered from sequence slices first;
* "rowwise_to_sequence": row-wise, with its output reduce-scattered into sequence slices;
* "rowwise_from_replicate": row-wise on an input every rank holds whole (each takes its slice).

Column-wise splits `out_features` (`nn.Linear`), `embedding_dim` (`nn.Embedding`) or `nf` (`Conv1D`);
row-wise splits `in_features`, `num_embeddings` or `nx`; the split dimension must divide evenly.
"""

from __future__ import annotations

from functools import cache, partial
from typing import Any

from torch import nn

from ..errors import PrepareError


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2's linear layers, weight stored as [in, out]), found by its structure."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(weight, "ndim", 0) == 2


def _placements() -> Any:
    from torch.distributed.tensor import Replicate, Shard

    return Replicate, Shard


def make_style(name: str, module: nn.Module) -> Any:
    """The torch `ParallelStyle` for a style name, fitted to the module's type."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    replicate, shard = _placements()
    if name == "sequence":
        return SequenceParallel()
    colwise, rowwise = conv_styles() if is_conv1d(module) else (ColwiseParallel, RowwiseParallel)
    if not isinstance(module, (nn.Linear, nn.Embedding)) and not is_conv1d(module):
        raise PrepareError(
            f"tp_plan style {name!r} splits nn.Linear, nn.Embedding and transformers Conv1D modules, but it "
            f"matched a {type(module).__name__}; narrow the pattern, or give a torch ParallelStyle object."
        )
    embedding_input = {"input_layouts": replicate()} if isinstance(module, nn.Embedding) else {}
    styles = {
        "colwise": lambda: colwise(),
        "colwise_gather_output": lambda: colwise(output_layouts=replicate()),
        "colwise_from_sequence": lambda: colwise(input_layouts=shard(1)),
        "rowwise": lambda: rowwise(**embedding_input),
        "rowwise_to_sequence": lambda: rowwise(output_layouts=shard(1), **embedding_input),
        "rowwise_from_replicate": lambda: rowwise(input_layouts=replicate()),
    }
    return styles[name]()


def split_dimension(style: Any, module: nn.Module) -> tuple[str, int] | None:
    """(what is split, its size) for a column- or row-wise style on this module, else None."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    weight = getattr(module, "weight", None)
    if weight is None or getattr(weight, "ndim", 0) != 2:
        return None
    if isinstance(module, nn.Linear):
        dims = {ColwiseParallel: ("out_features", 0), RowwiseParallel: ("in_features", 1)}
    elif isinstance(module, nn.Embedding):
        dims = {ColwiseParallel: ("embedding_dim", 1), RowwiseParallel: ("num_embeddings", 0)}
    elif is_conv1d(module):
        dims = {ColwiseParallel: ("nf", 1), RowwiseParallel: ("nx", 0)}
    else:
        return None
    for cls, (label, dim) in dims.items():
        if isinstance(style, cls):
            return label, int(weight.shape[dim])
    return None


def _distribute(module: nn.Module, mesh: Any, placements: dict[str, Any], src_data_rank: Any) -> None:
    from torch.distributed.tensor import distribute_tensor

    for name, param in list(module.named_parameters(recurse=False)):
        dist_param = nn.Parameter(
            distribute_tensor(param, mesh, [placements[name]], src_data_rank=src_data_rank),
            requires_grad=param.requires_grad,
        )
        module.register_parameter(name, dist_param)


def _conv_style(base: type, weight_dim: int, bias_sharded: bool, desired_input: str) -> type:
    """A subclass of torch's column/row style that splits a `Conv1D` ([in, out] weight) instead."""
    from torch.distributed.tensor import distribute_module

    class ConvStyle(base):  # type: ignore[misc, valid-type]
        def _partition_conv_fn(self, name: str, module: nn.Module, device_mesh: Any) -> None:
            replicate, shard = _placements()
            placements = {"weight": shard(weight_dim), "bias": shard(0) if bias_sharded else replicate()}
            _distribute(module, device_mesh, placements, self.src_data_rank)

        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            if not is_conv1d(module):
                return super()._apply(module, device_mesh)  # type: ignore[no-any-return]
            replicate, shard = _placements()
            self.desired_input_layouts = (replicate() if desired_input == "replicate" else shard(-1),)
            return distribute_module(  # type: ignore[no-any-return]
                module,
                device_mesh,
                self._partition_conv_fn,
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
            )

    ConvStyle.__name__ = ConvStyle.__qualname__ = f"Conv1D{base.__name__}"
    return ConvStyle


@cache
def conv_styles() -> tuple[type, type]:
    """The column- and row-wise styles that also split `Conv1D` (built once, on first use)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return (
        _conv_style(ColwiseParallel, weight_dim=1, bias_sharded=True, desired_input="replicate"),
        _conv_style(RowwiseParallel, weight_dim=0, bias_sharded=False, desired_input="shard"),
    )
