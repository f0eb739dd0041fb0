"""Random number generator states, per rank, in safe formats.

Python's and numpy's global generators are stored as JSON (`rng_<rank>.json`); torch's CPU and CUDA
generator states, which are byte tensors, as safetensors (`rng_<rank>.safetensors`). Nothing here is
pickled, so loading runs no code.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import CheckpointCorruptError

if TYPE_CHECKING:
    from ._reader import CheckpointReader
    from ._writer import CheckpointWriter


def json_name(rank: int) -> str:
    return f"rng_{rank}.json"


def tensors_name(rank: int) -> str:
    return f"rng_{rank}.safetensors"


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "bit_generator": name,
        "keys": [int(k) for k in keys],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _cuda_states() -> dict[str, torch.Tensor]:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}


def save_rng(writer: CheckpointWriter, rank: int) -> None:
    """Write this process's generator states (taken now). Call it before anything that draws random
    numbers."""
    version, internal, gauss_next = random.getstate()
    document = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": _numpy_state(),
    }
    tensors = {"torch.cpu": torch.get_rng_state(), **_cuda_states()}  # fresh copies already
    writer.raw(json_name(rank), json.dumps(document).encode("utf-8"))
    writer.tensors(tensors_name(rank), tensors)


def has_rng(reader: CheckpointReader, rank: int) -> bool:
    return reader.has(json_name(rank))


def load_rng(reader: CheckpointReader, rank: int) -> None:
    """Restore this process's generator states from the checkpoint."""
    document = reader.json(json_name(rank))
    tensors = reader.tensors(tensors_name(rank))
    try:
        _restore(document, tensors)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointCorruptError(
            f"the random state in {str(reader.directory / json_name(rank))!r} is malformed: {e!r}"
        ) from e


def _restore(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = document["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = document["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            np.asarray(npy["keys"], dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        for i, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
