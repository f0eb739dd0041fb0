"""Resume self-verification: what the run will do next, recorded by `save_state`, checked after `load_state`.

Each rank writes `fingerprint_<rank>.json`: hashes of its random generators' states (taken together with
the states themselves), the optimizer step counter, every optimizer's learning rates and internal step,
and, for every prepared dataloader, where its next batch comes from (epoch, units of the epoch's order
consumed, and the sample indices of the next global batch). After `load_state` has restored everything,
the same values are read back and compared, and each dataloader checks the first batch it draws against
the recorded one. Any difference raises `ResumeMismatchError` naming what was expected and what was found,
so a resume that would replay, skip or reorder data, or go on with another learning rate or random state,
stops at once instead of training on silently.

A rank that did not exist when the checkpoint was saved (a resume on more processes) restores the random
states of rank `rank % saved_world_size` and is checked against that rank's fingerprint.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ResumeMismatchError

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ._reader import CheckpointReader
    from ._writer import CheckpointWriter


def file_name(rank: int) -> str:
    return f"fingerprint_{rank}.json"


def rng_source_rank(rank: int, saved_world_size: int) -> int:
    """The saved rank whose random states `rank` restores: itself, or `rank % saved_world_size` for a rank
    that did not exist at save time. Deterministic, and the usual case (every rank seeded alike by the
    seed setting) keeps every rank's random states equal."""
    return rank if rank < saved_world_size else rank % max(1, saved_world_size)


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def rng_hashes() -> dict[str, str]:
    """Hashes of this process's python, numpy, torch and (initialised) CUDA generator states."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    numpy_state = np.asarray(keys).tobytes() + repr((name, int(pos), int(has_gauss), float(cached))).encode()
    out = {
        "python": _hash(repr(random.getstate()).encode()),
        "numpy": _hash(numpy_state),
        "torch": _hash(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = _hash(state.numpy().tobytes())
    return out


def _learning_rates(runtime: Runtime) -> list[list[float]]:
    return [[float(group["lr"]) for group in opt.param_groups] for opt in runtime.state.optimizers]


def _optimizer_step(optimizer: Any) -> float | None:
    """The internal step count of the optimizer's state (Adam's `step`), or None if it keeps none."""
    try:
        steps = [state["step"] for state in optimizer.state.values() if "step" in state]
        if not steps:
            return None
        step = steps[0]
        return float(step.full_tensor() if hasattr(step, "full_tensor") else step)
    except Exception:  # a wrapper without a readable state: nothing to compare
        return None


def _snapshot(runtime: Runtime) -> dict[str, Any]:
    state = runtime.state
    return {
        "optimizer_steps": state.optimizer_steps,
        "learning_rates": _learning_rates(runtime),
        "optimizer_internal_steps": [_optimizer_step(opt) for opt in state.optimizers],
    }


def record(runtime: Runtime, writer: CheckpointWriter) -> None:
    """Write this rank's fingerprint; call it right after the random states are saved."""
    document = {
        "rank": runtime.rank,
        "world_size": runtime.world_size,
        "rng": rng_hashes(),
        **_snapshot(runtime),
        "dataloaders": [_upcoming(loader) for loader in runtime.state.dataloaders],
    }
    writer.json(file_name(runtime.rank), document)


def _upcoming(loader: Any) -> dict[str, Any] | None:
    upcoming = getattr(loader, "upcoming", None)
    return upcoming() if callable(upcoming) else None


def verify(runtime: Runtime, reader: CheckpointReader, saved_world_size: int) -> None:
    """Compare the restored run with the fingerprint saved for this rank; arm the dataloaders' first-batch
    checks. Checkpoints written before fingerprints existed are not checked."""
    name = file_name(rng_source_rank(runtime.rank, saved_world_size))
    if not reader.has(name):
        return
    saved = reader.json(name)
    found = {"rng": rng_hashes(), **_snapshot(runtime)}
    differences = []
    for key in ("optimizer_steps", "learning_rates", "optimizer_internal_steps"):
        if saved.get(key) != found[key]:
            differences.append(f"{key}: expected {saved.get(key)!r}, found {found[key]!r}")
    for name, value in saved.get("rng", {}).items():
        now = found["rng"].get(name)
        if now is None and name.startswith("cuda."):
            continue  # a GPU not visible now, or CUDA not initialised yet (torch applies the state later)
        if now != value:
            differences.append(f"{name} random state: expected hash {value}, found {now}")
    if differences:
        raise ResumeMismatchError(
            f"after load_state({str(reader.directory)!r}) rank {runtime.rank} does not continue where the saved run "
            f"stopped: {'; '.join(differences)}. Something changed these values during or after loading "
            "(a hook, a scheduler or optimizer not passed to prepare(), code that reseeds)."
        )
    for loader, recorded in zip(runtime.state.dataloaders, saved.get("dataloaders", [])):
        expect = getattr(loader, "expect_next", None)
        if recorded is not None and callable(expect):
            expect(recorded)
