"""A prepared dataloader's position as it goes into checkpoints: global, so it means the same at any
world size.

    {"format": 2, "seed": 1234, "epoch": 3, "samples_consumed": 96, "padding": 0, ...}

`samples_consumed` counts the units of the epoch's global order already dealt out (samples; for a loader
sharded by a batch sampler's batches, `batches_consumed` counts those batches), `padding` the units
repeated to complete the final global batch (`even_batches`). The rest records how they were dealt (the
per-rank batch, processes, accumulation steps, and what the script asked for), so a resume on another
number of processes can keep the global batch, and the state of the user's generators at the start of
the epoch, so that its order is drawn again exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointMismatchError
from .resume import Geometry, Script

FORMAT = 2


@dataclass(frozen=True)
class Position:
    """Where a loader's next iteration starts: epoch `epoch`, after `consumed` units of its order."""

    seed: int
    epoch: int
    consumed: int
    unit: str  # "samples" or "batches"
    geometry: Geometry
    script: Script
    padding: int = 0
    num_units: int | None = None
    trains: bool = False
    generators: list[str] = field(default_factory=list)
    batches_yielded: int = 0
    samples_consumed: int | None = None  # for "batches" units: the samples in those batches, if known

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "seed": self.seed, "epoch": self.epoch}
        if self.unit == "batches":
            out["batches_consumed"] = self.consumed
            out["samples_consumed"] = self.samples_consumed
        else:
            out["samples_consumed"] = self.consumed
        out.update(
            padding=self.padding,
            num_units=self.num_units,
            unit=self.unit,
            batch_size=self.geometry.batch_size,
            world_size=self.geometry.world_size,
            gradient_accumulation_steps=self.geometry.accumulation,
            script_batch_size=self.script.batch_size,
            script_accumulation_steps=self.script.accumulation,
            split_batches=self.script.split_batches,
            trains=self.trains,
            generators=list(self.generators),
            batches_yielded=self.batches_yielded,
        )
        return out


def read_position(state: dict[str, Any], *, unit: str, now: Geometry, script: Script) -> Position:
    """Parse a loader's saved state; `now` and `script` fill in what older checkpoints did not record."""
    try:
        if "samples_consumed" not in state and "batches_consumed" not in state:
            return _legacy(state, unit, now, script)
        saved_unit = str(state.get("unit", "samples"))
        if saved_unit != unit:
            raise CheckpointMismatchError(
                f"the checkpoint's dataloader position counts {saved_unit} and this dataloader deals "
                f"{unit}: prepare the same kind of DataLoader (batch_size with a sampler, or a batch "
                "sampler) as the run that saved it."
            )
        consumed = state["batches_consumed"] if unit == "batches" else state["samples_consumed"]
        return Position(
            seed=int(state["seed"]),
            epoch=int(state["epoch"]),
            consumed=int(consumed),
            unit=unit,
            padding=int(state.get("padding", 0)),
            num_units=None if state.get("num_units") is None else int(state["num_units"]),
            geometry=Geometry(
                int(state["batch_size"]), int(state["world_size"]), int(state["gradient_accumulation_steps"])
            ),
            script=Script(
                None if state.get("script_batch_size") is None else int(state["script_batch_size"]),
                int(state["script_accumulation_steps"]),
                bool(state["split_batches"]),
            ),
            trains=bool(state.get("trains", False)),
            generators=[str(g) for g in state.get("generators", [])],
            batches_yielded=int(state.get("batches_yielded", 0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointMismatchError(
            f"a dataloader position in the checkpoint cannot be read ({type(e).__name__}: {e}); it was not "
            "written by PreparedDataLoader.state_dict()."
        ) from None


def _legacy(state: dict[str, Any], unit: str, now: Geometry, script: Script) -> Position:
    """A position of the first release (batches of this world size): same world size only."""
    batches = int(state["batches_yielded"])
    return Position(
        seed=int(state["seed"]),
        epoch=int(state["epoch"]),
        consumed=batches * now.global_batch,
        unit=unit,
        geometry=now,
        script=script,
        batches_yielded=batches,
    )
