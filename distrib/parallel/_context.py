"""Context parallelism: long sequences split over the `cp` ranks, through torch's `context_parallel`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .._runtime import current
from ..errors import TrainingError


@contextlib.contextmanager
def context_parallel(
    *buffers: torch.Tensor, seq_dims: Sequence[int] | None = None, no_restore: Sequence[torch.Tensor] = ()
) -> Iterator[None]:
    """Split `buffers` along their sequence dimension over the context-parallel ranks for the block.

    Inside the block each rank holds its slices of the buffers (in place; the whole tensors come back
    when the block ends, except those in `no_restore`), and torch's scaled-dot-product attention runs as
    ring attention over the `cp` ranks. Run the forward and the backward inside the block; the loss of
    each rank covers its slice, and gradients are averaged over the data- and context-parallel ranks.
    Sequence lengths must be multiples of `2 * cp`. Needs CUDA (`parallelism={"cp": N}` is refused
    elsewhere); without context parallelism (cp=1) the block does nothing, so one loop serves both.
    Example::

        with distributed(strategy="fsdp", parallelism={"cp": 2}):
            ...
            for batch in loader:
                ids, labels = batch["input_ids"], batch["labels"]
                with context_parallel(ids, labels, seq_dims=(1, 1)):
                    loss = loss_fn(model(ids), labels)
                    backward(loss)
                optimizer.step()
                optimizer.zero_grad()
    """
    runtime = current("context_parallel")
    parallel = runtime.parallel
    if parallel is None or parallel.size("cp") == 1:
        yield
        return
    dims = list(seq_dims) if seq_dims is not None else [1] * len(buffers)
    if len(dims) != len(buffers):
        raise TrainingError(
            f"context_parallel() got {len(buffers)} buffers but {len(dims)} seq_dims; give one sequence "
            "dimension per buffer."
        )
    multiple = 2 * parallel.size("cp")
    for i, (buffer, dim) in enumerate(zip(buffers, dims)):
        if buffer.shape[dim] % multiple:
            raise TrainingError(
                f"context_parallel(): buffer #{i} has sequence length {buffer.shape[dim]} (dim {dim}), which is "
                f"not a multiple of 2 * cp = {multiple}; pad the sequences to a multiple of {multiple}."
            )
    from torch.distributed.tensor.experimental import context_parallel as torch_context_parallel

    with torch_context_parallel(
        parallel.submesh("cp"),
        buffers=list(buffers),
        buffer_seq_dims=dims,
        no_restore_buffers=set(no_restore),
    ):
        yield
