"""Random number generator states, per rank, in safe formats.

Python's and numpy's global generators are stored as JSON (`rng_<rank>.json`); torch's CPU and CUDA
generator states, which are byte tensors, as safetensors (`rng_<rank>.safetensors`). Nothing here is
pickled, so loading runs no code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._tensors import read_tensors, write_tensors


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


def save_rng(directory: Path, rank: int) -> None:
    """Write this process's generator states. Call it before anything that draws random numbers."""
    version, internal, gauss_next = random.getstate()
    document = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": _numpy_state(),
    }
    tensors = {"torch.cpu": torch.get_rng_state(), **_cuda_states()}
    (directory / json_name(rank)).write_text(json.dumps(document), encoding="utf-8")
    write_tensors(directory / tensors_name(rank), tensors)


def has_rng(directory: Path, rank: int) -> bool:
    return (directory / json_name(rank)).is_file()


def load_rng(directory: Path, rank: int) -> None:
    """Restore this process's generator states from `directory`."""
    document = json.loads((directory / json_name(rank)).read_text(encoding="utf-8"))
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
    tensors = read_tensors(directory / tensors_name(rank))
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        for i, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
