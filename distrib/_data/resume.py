"""What a resumed dataloader does when the run comes back with another number of processes.

A checkpoint's data position is global (samples consumed of the epoch's order), so the rest of the epoch
can be dealt to any number of ranks. What must not change silently is the *global batch*: the samples per
optimizer step, `per-rank batch x processes x accumulation steps`. `plan_resume` keeps it:

1. on another number of processes, each rank's batch changes so that the global batch per micro-step stays
   the same (the cut of the data into batches is then identical, and so are the optimizer steps);
2. when that is not a whole number, the gradient accumulation steps change instead (each rank keeps the
   script's batch) if that is a whole number;
3. otherwise the resume stops with an error that lists the process counts that work.

When the script itself changed its batch size or accumulation steps since the checkpoint, the script wins
(with a warning naming the new global batch). Loaders that never stepped an optimizer (evaluation) keep
the script's batch when the global one cannot be kept: their position stays exact either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CheckpointMismatchError


@dataclass(frozen=True)
class Geometry:
    """How a loader's units (samples, or a batch sampler's batches) are dealt per optimizer step."""

    batch_size: int  # units per rank and micro-step
    world_size: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def per_step(self) -> int:
        return self.global_batch * self.accumulation


@dataclass(frozen=True)
class Script:
    """What the user's script asks for (before any adjustment by a resume)."""

    batch_size: int | None
    accumulation: int
    split_batches: bool


@dataclass(frozen=True)
class Plan:
    batch_size: int  # units per rank from now on
    accumulation: int | None  # the run's new accumulation steps, or None to leave them
    note: str | None  # what changed, for a warning


def plan_resume(
    saved: Geometry,
    saved_script: Script,
    now: Geometry,
    script: Script,
    *,
    batch_fixed: bool,
    trains: bool,
    name: str,
) -> Plan:
    """How loader `name` continues: `now` holds the per-rank batch the script gives at this world size
    and the run's accumulation steps as they stand."""
    if script != saved_script:
        return _script_changed(saved, now, script, saved_script, trains, name)
    target = saved.per_step
    if now.global_batch == saved.global_batch and now.accumulation == saved.accumulation:
        return Plan(now.batch_size, None, None)
    per_rank = _whole(target, now.world_size * now.accumulation)
    if per_rank is not None and (not batch_fixed or per_rank == now.batch_size):
        note = None if per_rank == now.batch_size else _batch_note(saved, now, per_rank, name)
        return Plan(per_rank, None, note)
    if not trains:
        note = (
            f"{name}: resuming a checkpoint saved by {saved.world_size} processes on {now.world_size}: no "
            f"optimizer has stepped during its iterations (evaluation?), so it keeps the script's batch of "
            f"{now.batch_size} per rank and its global batch goes from {saved.global_batch} to "
            f"{now.global_batch} per step; its position in the data is exact."
        )
        return Plan(now.batch_size, None, note)
    accumulation = _whole(target, now.world_size * now.batch_size)
    if accumulation is not None:
        note = (
            f"{name}: resuming a checkpoint saved by {saved.world_size} processes on {now.world_size}: "
            f"gradient_accumulation_steps is now {accumulation} (the setting says {now.accumulation}), so "
            f"that one optimizer step still takes {target} samples ({now.batch_size} per rank x "
            f"{now.world_size} processes x {accumulation} micro-batches)."
        )
        return Plan(now.batch_size, accumulation, note)
    raise CheckpointMismatchError(_cannot_keep(saved, now, batch_fixed, name))


def _whole(total: int, divisor: int) -> int | None:
    return total // divisor if divisor > 0 and total % divisor == 0 else None


def _batch_note(saved: Geometry, now: Geometry, per_rank: int, name: str) -> str:
    note = (
        f"{name}: resuming a checkpoint saved by {saved.world_size} processes on {now.world_size}: each "
        f"rank's batch is now {per_rank} (the script asks for {now.batch_size}), so the global batch stays "
        f"{per_rank * now.world_size} per micro-step and {saved.per_step} per optimizer step."
    )
    alternative = _whole(saved.per_step, now.world_size * now.batch_size)
    if per_rank > now.batch_size and alternative is not None:
        note += (
            f" If {per_rank} per rank does not fit in memory, set gradient_accumulation_steps="
            f"{alternative} and keep batch_size={now.batch_size}: the same global batch."
        )
    return note


def _script_changed(
    saved: Geometry, now: Geometry, script: Script, before: Script, trains: bool, name: str
) -> Plan:
    note = None
    if trains and now.per_step != saved.per_step:
        note = (
            f"{name}: the script's batch settings changed since the checkpoint (batch_size "
            f"{before.batch_size} -> {script.batch_size}, gradient_accumulation_steps {before.accumulation} "
            f"-> {script.accumulation}, split_batches {before.split_batches} -> {script.split_batches}): the "
            f"global batch goes from {saved.per_step} to {now.per_step} samples per optimizer step. The data "
            "position is exact either way."
        )
    return Plan(now.batch_size, None, note)


def _working_counts(saved: Geometry, now: Geometry, batch_fixed: bool) -> list[int]:
    target = saved.per_step
    limit = max(4 * max(saved.world_size, now.world_size), 8)
    found = []
    for count in range(1, min(limit, target) + 1):
        by_batch = not batch_fixed and target % (count * now.accumulation) == 0
        if by_batch or target % (count * now.batch_size) == 0:
            found.append(count)
    return found


def _cannot_keep(saved: Geometry, now: Geometry, batch_fixed: bool, name: str) -> str:
    counts = ", ".join(str(c) for c in _working_counts(saved, now, batch_fixed)) or "none"
    unit = "batches of the batch sampler" if batch_fixed else "samples"
    return (
        f"{name}: the checkpoint was saved by {saved.world_size} processes with a global batch of "
        f"{saved.per_step} {unit} per optimizer step ({saved.batch_size} per rank x {saved.world_size} "
        f"processes x {saved.accumulation} accumulation steps), and no per-rank batch or number of "
        f"accumulation steps keeps it on {now.world_size} processes. Choices: relaunch with a number of "
        f"processes that keeps it ({counts}); or change batch_size or gradient_accumulation_steps in the "
        "script, and the run continues from the same data position with the global batch they give."
    )
