"""Pipeline parallelism through `torch.distributed.pipelining`: the prepared model runs the schedule.

`prepare()` cuts the model into stages (`_split.py`) and returns a `PipelinedModel`. Its call runs one
whole pipeline step over the batch, which torch's schedule splits into micro-batches:

* `loss = model(*inputs, target=y, loss_fn=f)`: forward and backward of every micro-batch (GPipe or
  1F1B). Stage 0 feeds `inputs`, the last stage applies `f(output, target)` per micro-batch; gradients
  are those of the mean over micro-batches. Returns the mean loss, detached, on every rank of the
  pipeline; `backward(loss)` on it does nothing (the schedule already did it).
* `out = model(*inputs)` under `torch.no_grad()` or after `model.eval()`: forward only; the last stage's
  output, sent to every rank of the pipeline so each can compute metrics.

A stage's output is its first tensor (a transformers `ModelOutput` gives its `logits` or hidden states);
keyword arguments (an attention mask) reach every stage. A new input shape builds a new torch stage and
schedule once (a few are kept), so a smaller last batch works; the batch must divide into the
micro-batches.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .._tree import leaves, replace_leaves, tree_map
from ..errors import TrainingError

if TYPE_CHECKING:
    from .._runtime import Runtime

#: stages/schedules kept per pipelined model, one per input shape seen last
MAX_SCHEDULES = 4


class _Slot:
    """Stands for a tensor in the output structure the last stage sends ahead of the tensors."""


def first_tensor(output: Any) -> Any:
    """What a stage passes on: the output itself if a tensor, else its first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    found = leaves(output)
    if not found:
        raise TrainingError(
            f"a pipeline stage's forward returned {type(output).__name__} without a tensor; each stage must "
            "return the activations for the next one."
        )
    return found[0]


def _first_tensor_hook(module: nn.Module, args: Any, output: Any) -> Any:
    return first_tensor(output)


class PipelinedModel(nn.Module):
    """What `prepare` returns for a model under pipeline parallelism (`parallelism={"pp": N}`).

    `module` is this rank's stage of your model (parameters keep their names; `unwrap_model` returns it).
    `model(*inputs, target=y, loss_fn=f, **kwargs)` runs one pipeline step over the batch, split into
    `pp_microbatches`: forward and backward of every micro-batch, `f(output, target)` on the last stage.
    It returns the mean loss over micro-batches, detached, on every stage (`backward()` on it does
    nothing: the schedule did it). `model(*inputs)` under `torch.no_grad()` or `model.eval()` runs forward
    only and returns the last stage's output on every stage. Pass the same `loss_fn` object on every
    call; a batch must divide into the micro-batches. Example::

        loss_fn = torch.nn.functional.cross_entropy
        model, optimizer, loader = prepare(model, optimizer, loader)    # parallelism={"pp": 2}
        for x, y in loader:
            loss = model(x, target=y, loss_fn=loss_fn)
            optimizer.step()
            optimizer.zero_grad()
    """

    # set through __dict__ in __init__ (not submodules); declared for type checkers
    _stage_module: nn.Module
    _runtime: Runtime
    _schedules: OrderedDict[Any, tuple[Any, Any, int]]
    _loss_fn: Callable[..., torch.Tensor] | None
    _microbatch_losses: list[torch.Tensor]

    def __init__(self, module: nn.Module, stage_module: nn.Module, runtime: Runtime) -> None:
        super().__init__()
        self.module = module
        # the module torch's stage runs (DDP-wrapped or the module itself); not a child: no double names
        self.__dict__["_stage_module"] = stage_module
        self.__dict__["_runtime"] = runtime
        self.__dict__["_schedules"] = OrderedDict()
        self.__dict__["_loss_fn"] = None
        self.__dict__["_microbatch_losses"] = []

    # -- the call -------------------------------------------------------------------------------------
    def forward(
        self,
        *args: Any,
        target: Any = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        training = target is not None
        if not training and torch.is_grad_enabled() and self.training:
            raise TrainingError(
                "a pipelined model runs forward and backward in one call: pass the targets and the loss, "
                "loss = model(x, target=y, loss_fn=torch.nn.functional.cross_entropy); to evaluate, call it "
                "under torch.no_grad() or after model.eval()."
            )
        if training and loss_fn is None:
            raise TrainingError(
                "model(..., target=y) on a pipelined model needs the loss function too: "
                "model(x, target=y, loss_fn=torch.nn.functional.cross_entropy)."
            )
        if training:
            self._check_loss_fn(loss_fn)
        stage, schedule, microbatches = self._schedule(
            (training, _signature(args, kwargs, target)), args, target
        )
        inputs = args if stage.is_first else ()
        self._microbatch_losses.clear()
        # only while the schedule runs: a stage hands on one tensor, the user's module is left as it was
        hook = self.module.register_forward_hook(_first_tensor_hook)
        try:
            if training:
                schedule.step(*inputs, target=target, **kwargs)
            else:
                out = schedule.step(*inputs, **kwargs)
        finally:
            hook.remove()
        if training:
            return self._share_loss(stage.is_last, microbatches)
        return self._share_output(out if stage.is_last else None)

    def _check_loss_fn(self, loss_fn: Any) -> None:
        if self._loss_fn is None:
            self.__dict__["_loss_fn"] = loss_fn
        elif loss_fn is not self._loss_fn:
            raise TrainingError(
                "a pipelined model got a different loss_fn than in its earlier calls (the schedule is built "
                "around one); define the loss function once, outside the loop, and pass that same object."
            )

    # -- torch's stage and schedule, one pair per input signature -------------------------------------
    def _schedule(self, key: Any, args: tuple[Any, ...], target: Any) -> tuple[Any, Any, int]:
        cached = self._schedules.get(key)
        if cached is not None:
            self._schedules.move_to_end(key)
            return cached
        runtime = self._runtime
        parallel = runtime.parallel
        assert parallel is not None
        options = parallel.options
        microbatches = options.pp_microbatches or parallel.size("pp")
        _check_batch(args, target, microbatches)
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = PipelineStage(
            self._stage_module,
            parallel.rank("pp"),
            parallel.size("pp"),
            runtime.device,
            group=parallel.group("pp"),
        )
        training = key[0]
        kind = Schedule1F1B if training and options.pp_schedule == "1f1b" else ScheduleGPipe
        # scale_grads=False: torch would divide every .grad after the step, gradients accumulated over
        # earlier steps (accumulate()) too; the loss is divided per micro-batch instead (_scaled_loss)
        loss_fn = functools.partial(self._scaled_loss, microbatches=microbatches) if training else None
        schedule = kind(stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
        self._schedules[key] = (stage, schedule, microbatches)
        if len(self._schedules) > MAX_SCHEDULES:
            self._schedules.popitem(last=False)
        return stage, schedule, microbatches

    def _scaled_loss(self, output: Any, target: Any, *, microbatches: int) -> torch.Tensor:
        """The user's loss per micro-batch (recorded), divided so that the gradients are those of the mean
        over micro-batches and over the accumulation window."""
        loss_fn = self._loss_fn
        assert loss_fn is not None
        loss = loss_fn(output, target)
        self._microbatch_losses.append(loss.detach())
        return loss / (microbatches * self._runtime.state.window_size)

    # -- results on every rank of the pipeline --------------------------------------------------------
    def _last_stage_rank(self) -> tuple[Any, int]:
        parallel = self._runtime.parallel
        assert parallel is not None
        group = parallel.group("pp")
        return group, dist.get_global_rank(group, parallel.size("pp") - 1)

    def _share_loss(self, is_last: bool, microbatches: int) -> torch.Tensor:
        device = self._runtime.collective_device
        if is_last:
            # the last ones: torch's first step also runs the loss once to learn the stage's shapes
            recorded = self._microbatch_losses[-microbatches:]
            loss = torch.stack(recorded).float().mean().to(device)
        else:
            loss = torch.zeros((), device=device)
        group, src = self._last_stage_rank()
        dist.broadcast(loss, src=src, group=group)
        loss = loss.to(self._runtime.device)
        loss._distrib_pipeline_loss = True  # type: ignore[attr-defined]  # backward() knows it is done
        return loss

    def _share_output(self, output: Any) -> Any:
        group, src = self._last_stage_rank()
        device = self._runtime.collective_device
        header: list[Any] = [None]
        if output is not None:
            tensors = leaves(output)
            header[0] = (tree_map(lambda _: _Slot(), output), [(t.shape, t.dtype) for t in tensors])
        dist.broadcast_object_list(header, src=src, group=group)
        structure, specs = header[0]
        if output is None:
            tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
        moved = [t.detach().to(device).contiguous() for t in tensors]
        for t in moved:
            dist.broadcast(t, src=src, group=group)
        return replace_leaves(structure, [t.to(self._runtime.device) for t in moved], leaf=_Slot)


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any], target: Any) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype) for t in leaves((args, kwargs, target)))


def _check_batch(args: tuple[Any, ...], target: Any, microbatches: int) -> None:
    tensors = leaves((args, target))
    if not tensors or tensors[0].dim() == 0:
        raise TrainingError(
            "a pipelined model needs batched tensor inputs (the first dimension is the batch)."
        )
    size = tensors[0].shape[0]
    if size % microbatches:
        raise TrainingError(
            f"a pipelined model splits each batch into {microbatches} micro-batches, but got a batch of {size}; "
            "use a batch size that is a multiple of pp_microbatches (drop_last=True keeps the last batch "
            "whole), or change ParallelismOptions(pp_microbatches=...)."
        )


def is_pipeline_loss(loss: torch.Tensor) -> bool:
    """True for the loss a pipelined model returned (its backward already ran inside the schedule)."""
    return bool(getattr(loss, "_distrib_pipeline_loss", False))
